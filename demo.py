"""The demo: LongLoRA end to end on a laptop, in minutes. `python train.py` with no arguments runs it.

    python demo.py                    # or: python train.py
    torchrun --nproc-per-node 2 demo.py

It takes the small Llama shipped in demo/ (3M parameters, trained at a 128-token context on 67 of
Shakespeare's plays and poems by demo/make.sh) and extends its context 4x, to 512 tokens, with the
paper's three switches: Position Interpolation (m.extend_context), S2-Attn (--attn s2) and LoRA+
(adapters, embedding and norms). It then compares perplexity on five plays the model never saw,
before and after; after, with full attention and with S2-Attn (the paper's Table 2 tests both).
The recipe is sized for a 3M-parameter model, not the paper's 7B: lr 1e-3 with a cosine decay, 400
steps of 4096 tokens, S2 groups of half the length (Table 11's N/2). docs/demo.md reads the numbers.
"""

import json
import signal
import sys
import time
from pathlib import Path

import torch.distributed as dist

import data
import eval as ev
import model
import parallel
import train

DEMO = Path(__file__).resolve().parent / "demo"  # model/ (weights and tokenizer), made by demo/make.sh


def demo(
    rank, world, device, out=None, steps=400, lr=1e-3, group_size=None, eval_tokens=65536, schedule="cosine", attn="s2"
):
    """Run the demo into `out` (default runs/demo-<time>/); returns the perplexities it prints."""
    out = Path(out or time.strftime("runs/demo-%Y%m%d-%H%M%S"))
    old = model.read_checkpoint(DEMO / "model")[0].max_seq_len
    new = 4 * old
    G = group_size or new // 2
    if rank == 0:
        print(
            f"LongLoRA demo: a {old}-token Shakespeare model (demo/model) learns to read {new} tokens. Output in "
            f"{out}/",
            flush=True,
        )
        for split in ("train", "held-out"):
            data.tokenize(DEMO / "model", out / "data" / f"{split}.bin", [f"shakespeare:{split}"])
    dist.barrier()
    held = data.read_tokens(out / "data" / "held-out.bin")[0][:eval_tokens]
    ppl = lambda m, n: ev.perplexity(m, held, n, stride=n, progress=False)  # noqa: E731  non-overlapping windows
    results = {}
    if rank == 0:
        print(f"perplexity of the shipped model at {old} and {new} tokens, and with positions / 4 ...", flush=True)
        base = ev.load_model(DEMO / "model", dtype="float32", device=device)
        base.beyond_context = True  # measured at 4x its context: that is the problem LongLoRA solves
        results["base"] = {old: ppl(base, old), new: ppl(base, new)}
        results["pi_only"] = {new: ppl(base.extend_context(4), new)}
    dtype = model.default_dtype(device)
    paths = ["--model", str(DEMO / "model"), "--data", str(out / "data" / "train.bin"), "--out", str(out)]
    settings = f"--seq-len {new} --attn {attn} --group-size {G} --lr {lr} --warmup 10 --steps {steps}"
    settings += (
        f" --schedule {schedule} --batch-size {max(1, 4096 // new)} --grad-accum 1 --dtype {dtype} --save-every 0"
    )
    argv = paths + settings.split() + ["--no-activation-checkpointing", "--export-format", "hf"]
    if rank == 0:
        print("python train.py " + " ".join(argv), flush=True)
    try:  # Ctrl-C or SIGTERM in training: a checkpoint after the step in progress, then a line to resume with
        train.train(train.parse_args(argv), rank, world, device, parallel.Stop())
    except parallel.Stopped as e:
        e.args = (f"{e}: python train.py {' '.join(argv)} --resume, then python demo.py for the table",)
        raise
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # evaluation: stopped at once again
        signal.signal(signal.SIGTERM, terminate)
    if rank == 0:
        print(f"perplexity after LongLoRA at {old} and {new} tokens ...", flush=True)
        after = ev.load_model(out / "merged", dtype="float32", device=device)
        results["after"] = {old: ppl(after, old), new: ppl(after, new)}
        if attn == "s2":  # the paper's Table 2: the same model tested with the S2-Attn it was trained with
            results["after_s2"] = {new: ppl(after.set_attention(G), new)}
        (out / "demo.json").write_text(
            json.dumps({k: {str(n): v for n, v in r.items()} for k, r in results.items()}, indent=2)
        )
        print(report(results, old, new, len(held), G), flush=True)
    return results


def report(r, old, new, n_tokens, group_size):
    """The table, and two sentences that say what its numbers say."""
    b, pi, a, s2 = r["base"], r["pi_only"], r["after"], r.get("after_s2", {}).get(new)
    rows = [
        (f"the shipped model, trained at {old} tokens", b[old], b[new]),
        ("  + Position Interpolation alone", None, pi[new]),
        ("  + LongLoRA fine-tuning (S2-Attn, LoRA+)", a[old], a[new]),
    ]
    if s2 is not None:
        rows.append((f"    tested with S2-Attn, groups of {group_size}", None, s2))
    cell = lambda v: f"{v:>10.2f}" if v is not None else f"{'':>10}"  # noqa: E731
    lines = [f"\nperplexity on {n_tokens:,} tokens of held-out plays (lower is better)", f"{'':44}{old:>10}{new:>10}"]
    lines += [f"{name:44}{cell(x)}{cell(y)}" for name, x, y in rows] + [""]
    best = min(a[new], s2 if s2 is not None else a[new])
    lines.append(
        f"At {new} tokens: {b[new]:.1f} untouched, {pi[new]:.1f} with interpolated positions alone, "
        f"{best:.1f} after LongLoRA."
    )
    lines.append(
        f"After LongLoRA, {new}-token windows score {'better' if best < b[old] else 'worse'} than the "
        f"original model at its own {old} tokens ({b[old]:.1f})."
    )
    return "\n".join(lines)


def terminate(signum, frame):
    sys.exit(128 + signum)


def main():
    """The demo, ended by Ctrl-C or SIGTERM with one line (and, in training, a checkpoint to resume from)."""
    signal.signal(signal.SIGTERM, terminate)  # (training takes SIGTERM and Ctrl-C over, and gives them back)
    rank, world, device = parallel.setup_distributed()
    code = 0
    try:
        demo(rank, world, device)
    except parallel.Stopped as e:
        print(e, file=sys.stderr, flush=True)
        code = e.exit
    except KeyboardInterrupt:
        print("\nstopped (Ctrl-C): python train.py starts the demo again", file=sys.stderr, flush=True)
        code = 130
    except SystemExit as e:  # SIGTERM outside training
        print("\nstopped (SIGTERM): python train.py starts the demo again", file=sys.stderr, flush=True)
        code = e.code
    dist.destroy_process_group()
    sys.exit(code)


if __name__ == "__main__":
    main()
