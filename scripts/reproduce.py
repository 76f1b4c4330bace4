"""The paper's ablations re-run at a small scale, every trained row with several seeds, written to
REPRODUCTION.md beside results.json: Tables 1 and 2 (attention pattern), 3 (what trains), 11 (group
size), 4 (training length) and a passkey test, each claim of the paper marked holds / does not hold /
within noise.

    python scripts/reproduce.py --out runs/reproduce --report .          # the demo model, a CPU, ~2 hours
    python scripts/reproduce.py --rows pi_x4,s2 --seeds 42 --out /tmp/r --compare results.json  # re-check two rows
    python scripts/smollm2.py --out models/smollm2-135m                  # then, on one GPU: 8k -> 32k
    python scripts/reproduce.py --preset smollm2 --model models/smollm2-135m --out runs/repro-smollm2

The demo preset extends demo/model (trained at 128 tokens) to 512 with the demo's recipe (demo.py), and
to 256 and 1024 for Table 4; the smollm2 preset extends SmolLM2-135M (8192) to 32768 with the paper's
settings. Every row has the same budget: tokens per step, steps, learning rate, schedule, data; a row
changes one thing (ROWS). Training data: data.shakespeare("train"); evaluation: the five held-out plays,
the first --eval-tokens tokens in non-overlapping windows, the same tokens at every length.

Each run is `python train.py ...`, its command kept in results.json. The study resumes: a row and seed
already in results.json is not run again, so an interrupted study goes on where it stopped (a run cut
off mid-way starts again). The report is rewritten from results.json at every step; no number in it is
typed in, apart from the paper's, which stand beside ours.
"""

import argparse
import json
import math
import os
import platform
import random
import shutil
import statistics
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
import train  # noqa: E402

# The recipe of each preset: what every row shares. `group` is the S2 group as a fraction of the length.
PRESETS = {
    # demo.py's recipe, sized for a 3M-parameter model (docs/demo.md tried 15 recipes to choose it)
    "demo": dict(
        model=str(ROOT / "demo" / "model"), seq_len=512, train_lengths=[256, 512, 1024], group=2, lr=1e-3,
        warmup=10, schedule="cosine", steps=400, tokens_per_step=4096, micro_batch=0, seeds=[42, 1],
        eval_lengths=[128, 256, 512, 1024], eval_tokens=65536, dtype="float32",
        flags=["--no-activation-checkpointing", "--export-format", "hf"],
    ),
    # the paper's settings (§4.1: lr 2e-5, constant after 20 warm-up steps, groups of N/4), 100 steps
    "smollm2": dict(
        model=None, seq_len=32768, train_lengths=[16384, 32768], group=4, lr=2e-5, warmup=20,
        schedule="constant", steps=100, tokens_per_step=8 * 32768, micro_batch=1, seeds=[42],
        eval_lengths=[8192, 16384, 32768], eval_tokens=131072, dtype=None, flags=[],
    ),
}  # fmt: skip

# The rows: each changes one setting of the recipe's LongLoRA run (S2-Attn, LoRA rank 8 + embed + norm).
ROWS = {
    "s2": ("S2-Attn, LoRA+ (the recipe)", {}),
    "full": ("full attention, LoRA+", {"attn": "full"}),
    "short": ("short attention (groups, no shift), LoRA+", {"attn": "short"}),
    "lora": ("LoRA", {"trainable": ""}),
    "lora_norm": ("LoRA + norm", {"trainable": "norm"}),
    "lora_embed": ("LoRA + embed", {"trainable": "embed"}),
    "full_ft": ("full fine-tuning", {"rank": 0}),
    "lora_r64": ("LoRA rank 64", {"trainable": "", "rank": 64}),
    "g2": ("S2-Attn, groups of N/2", {"group": 2}),
    "g4": ("S2-Attn, groups of N/4", {"group": 4}),
    "g8": ("S2-Attn, groups of N/8", {"group": 8}),
}
OPTIONAL = ("lora_r64",)  # run when named in --rows


def rows(p):
    """name -> (label, settings) of every trained row of preset `p`; rows equal to the recipe are dropped
    (G = N/2 in the demo is the recipe itself), training lengths add rows lenL."""
    d = train.LongLoRA()  # the paper's LongLoRA run: S2-Attn, LoRA rank 8 + embed + norm
    base = dict(attn=d.attn, group=p["group"], trainable=",".join(d.trainable), rank=d.lora_rank, length=p["seq_len"])
    out = {}
    for name, (label, change) in ROWS.items():
        if name != "s2" and {**base, **change} == base:
            continue
        out[name] = (label, {**base, **change})
    for L in p["train_lengths"]:
        if L != p["seq_len"]:
            out[f"len{L}"] = (f"S2-Attn, LoRA+, trained at {L}", {**base, "length": L})
    return out


def untrained(p, context):
    """name -> (label, interpolation factor) of the rows without fine-tuning."""
    out = {"base": ("the base model, no interpolation", 1)}
    for L in p["train_lengths"]:
        f = math.ceil(L / context)
        out[f"pi_x{f}"] = (f"Position Interpolation x{f}, no fine-tuning", f)
    return out


def train_flags(p, s, seed):
    """train.py's settings of one row `s` and seed: the same budget for every row."""
    L, G = s["length"], s["length"] // s["group"]
    sequences = p["tokens_per_step"] // L
    batch = p["micro_batch"] or sequences  # sequences per micro-step; the rest by gradient accumulation
    f = ["--seq-len", L, "--attn", s["attn"], "--lora-rank", s["rank"], "--trainable", s["trainable"]]
    f += ["--group-size", G] if s["attn"] != "full" else []
    f += ["--lora-alpha", 2 * s["rank"]] if s["rank"] else []  # alpha = 2 x rank, the paper's 16 at rank 8
    f += ["--lr", p["lr"], "--warmup", p["warmup"], "--schedule", p["schedule"], "--steps", p["steps"]]
    f += ["--batch-size", batch, "--grad-accum", sequences // batch, "--seed", seed, "--save-every", 0]
    return [str(x) for x in f] + (["--dtype", p["dtype"]] if p["dtype"] else []) + p["flags"]


def sh(cmd):
    """A command as one would type it in the repository's root."""
    cmd = [c.replace(f"{ROOT}{os.sep}", "") for c in cmd]
    return " ".join(c if c and " " not in c else repr(c) for c in cmd)


def train_run(run, cmd):
    """Train one row and seed into `run` (again from the start if it did not finish)."""
    if run.exists():
        shutil.rmtree(run)
    t = time.time()
    subprocess.run([sys.executable, *cmd], check=True, cwd=ROOT)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return dict(
        command=sh(["python", *cmd]), steps=len(log), tokens=sum(r["tokens"] for r in log),
        train_s=round(time.time() - t, 1), final_loss=log[-1]["loss"],
    )  # fmt: skip


def evaluate(path, p, held, device, pi=1, own=None):
    """Perplexity with full attention at every evaluation length ({"full": {L: ppl}}), and with the
    pattern the model was trained with at its training length (own = (attn, G, L): {"own": {L: ppl}});
    at the study's length N, also by how much context each prediction had (by_context, eval.py's buckets)."""
    t = time.time()
    m = load(path, p, device, pi)
    ppl = lambda L: round(ev.perplexity(m, held, L, stride=L, progress=False), 4)  # noqa: E731
    out = {"full": {}}
    for L in sorted({*p["eval_lengths"], p["seq_len"]}):
        if L == p["seq_len"]:
            out["full"][str(L)], by_context = by_context_at_n(m, p, held)
        else:
            out["full"][str(L)] = ppl(L)
    if own:
        attn, G, L = own
        m.set_attention(G, shift=attn == "s2")
        out["own"] = {str(L): ppl(L)}
    return {"ppl": out, "by_context": by_context, "eval_s": round(time.time() - t, 1)}


def load(path, p, device, pi=1):
    m = ev.load_model(path, dtype=p["dtype"], device=device)
    m.beyond_context = True  # tested past the context: Table 4 and the untouched rows
    return m.extend_context(pi) if pi > 1 else m


def by_context_at_n(m, p, held):
    """(perplexity, {"lo-hi": perplexity of the predictions made with lo to hi - 1 tokens of context}) with
    full attention at the study's length N, from one pass over the windows."""
    N = p["seq_len"]
    ppl, buckets = ev.perplexity(m, held, N, stride=N, progress=False, by_context=True)
    return round(ppl, 4), {f"{lo}-{hi - 1}": round(v, 4) for (lo, hi), v in buckets.items()}


# ----------------------------------------------------------------------------- passkey with words

# The demo model never learned to copy digits (docs/demo.md), and with eval.py's needle it answers
# "The pass key is" with what follows "is" in the filler ("green"): it copies what came after the last
# token it was given. Here the question ends on a word only the needle holds, and the key is a name from
# the plays that is one token of the demo's tokenizer.
WORD_NEEDLE = "The watchword {key}. Remember the watchword {key}."
WORD_QUESTION = "Tell me the watchword"
WORD_KEYS = ["Romeo", "Brutus", "Lear", "Caesar", "Henry", "Richard", "John", "Edward", "Antony", "Kent"]


def passkey_words(m, tok, length, depths, trials, seed=0):
    """{depth: accuracy}: eval.py's task and filler with WORD_NEEDLE and WORD_QUESTION, as long as fits
    in `length` tokens with room for the answer; right when the greedy answer starts with the key."""
    rng = random.Random(seed)
    acc = {}
    for d in depths:
        hits = 0
        for _ in range(trials):
            key = rng.choice(WORD_KEYS)
            ids = ev.passkey_prompt(tok, length, d, key, 4, needle=WORD_NEEDLE, question=WORD_QUESTION)
            hits += tok.decode(ev.generate(m, ids, max_new_tokens=4)).strip().startswith(key)
        acc[str(d)] = hits / trials
    return acc


# ----------------------------------------------------------------------------- the study


def study(args, p):
    out, report = Path(args.out), Path(args.report or args.out)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok_dir = args.tokenizer or p["model"]
    for split in ("train", "held-out"):
        if not (out / "data" / f"{split}.bin").exists():
            data.tokenize(tok_dir, out / "data" / f"{split}.bin", [f"shakespeare:{split}"])
    held = data.read_tokens(out / "data" / "held-out.bin")[0][: p["eval_tokens"]]
    context = model.read_checkpoint(p["model"])[0].max_seq_len
    if min(p["train_lengths"]) <= context:
        raise ValueError(f"--train-lengths {p['train_lengths']} must all extend the model's context {context}")
    res_file = report / "results.json"
    recipe = {k: v for k, v in p.items() if k not in ("seeds", "model")}
    res = json.loads(res_file.read_text()) if res_file.exists() else {"recipe": recipe, "untrained": {}, "runs": {}}
    if res["recipe"] != recipe:
        raise ValueError(
            f"{res_file} holds a study with another recipe ({res['recipe']}): give another --report (or --out) "
            "folder, or the same settings"
        )
    res["machine"] = args.machine
    if not args.rows or "command" not in res:  # the study's command, not that of a --rows addition
        res["command"] = sh(["python", "scripts/reproduce.py", *args.argv])
    trained, bare = rows(p), untrained(p, context)
    wanted = args.rows or [*bare, *(r for r in trained if r not in OPTIONAL), "passkey"]
    unknown = [r for r in wanted if r not in trained and r not in bare and r != "passkey"]
    if unknown:
        raise ValueError(f"--rows: no row {unknown}; the rows are {', '.join([*bare, *trained, 'passkey'])}")

    def save():
        report.mkdir(parents=True, exist_ok=True)
        res_file.write_text(json.dumps(res, indent=1) + "\n")
        (report / "REPRODUCTION.md").write_text(write_report(res, p, args, context))

    for name in [r for r in bare if r in wanted and r not in res["untrained"]]:
        res["untrained"][name] = evaluate(p["model"], p, held, device, pi=bare[name][1])
        save()
    for name in [r for r in trained if r in wanted]:
        s = trained[name][1]
        for seed in p["seeds"]:
            if str(seed) in res["runs"].get(name, {}):
                continue
            run = out / "runs" / f"{name}-seed{seed}"
            paths = ["--model", p["model"], "--data", str(out / "data" / "train.bin"), "--out", str(run)]
            paths += ["--tokenizer", args.tokenizer] if args.tokenizer else []
            info = train_run(run, ["train.py", *paths, *train_flags(p, s, seed)])
            own = (s["attn"], s["length"] // s["group"], s["length"]) if s["attn"] != "full" else None
            res["runs"].setdefault(name, {})[str(seed)] = {**info, **evaluate(run / "merged", p, held, device, own=own)}
            save()
    if "passkey" in wanted and "passkey" not in res and str(p["seeds"][0]) in res["runs"].get("s2", {}):
        res["passkey"] = passkey_study(p, res, out, device, context, words=args.preset == "demo")
    save()
    return res


def passkey_study(p, res, out, device, context, words):
    """{case: {depth: accuracy}} at depths 0, 0.5, 1, 10 keys each: the untouched model at its own context,
    the same model and PI alone at the training length, and every seed of the recipe (s2) and of full
    attention at both. Keys are names (passkey_words) or, with words=False, eval.py's numbers."""
    tok = data.load_tokenizer(p["model"])
    N, f = p["seq_len"], math.ceil(p["seq_len"] / context)
    cases = {
        f"base at {context}": (p["model"], 1, context),
        f"base at {N}": (p["model"], 1, N),
        f"PI x{f} alone at {N}": (p["model"], f, N),
    }
    for name in ("s2", "full"):
        for seed in res["runs"].get(name, {}):
            for L in (context, N):  # at N, and at the base's context: has fine-tuning kept the copying?
                cases[f"{name}, seed {seed}, at {L}"] = (out / "runs" / f"{name}-seed{seed}" / "merged", 1, L)
    depths, acc = [0.0, 0.5, 1.0], {}
    for case, (path, pi, L) in cases.items():
        m = load(path, p, device, pi)
        if words:
            acc[case] = passkey_words(m, tok, L, depths, trials=10)
        else:
            acc[case] = {str(d): a for d, a in ev.passkey(m, tok, [L], depths, 10, progress=False)[L].items()}
    return acc


# ----------------------------------------------------------------------------- the report

# The paper's numbers (Llama 2 7B, PG19 validation, or Proof-pile test in Table 4), beside ours.
PAPER = {
    "Table 1": {"pi_x4": 236.99, "full": 8.04, "short": 9.47, "s2": 8.08},  # 32768 tokens, full fine-tuning
    "Table 2": {("s2", "full"): 8.12, ("s2", "own"): 8.64, ("short", "full"): 8.39, ("short", "own"): 9.17},
    "Table 3": {"full_ft": 8.08, "lora": 11.44, "lora_r64": 11.96, "lora_norm": 10.49, "lora_embed": None, "s2": 8.12},
    "Table 11": {"full": 8.02, "g2": 8.04, "g4": 8.04, "g8": 8.16},  # 8192 tokens
}
# Table 4, Proof-pile, LoRA+ rows: trained at 2x, 4x, 8x the base's 4096, evaluated at 1x, 2x, 4x, 8x of it
PAPER_T4 = {2: [2.91, 2.72, None, None], 4: [2.87, 2.66, 2.51, None], 8: [3.01, 2.78, 2.61, 2.50]}


def stats(res, name, mode, L):
    """(per-seed values, mean, range) of a trained row, or of an untrained row (one value, range 0):
    perplexity at length L with mode "full" or "own" attention, or with mode "by_context", of the
    predictions in bucket L ("128-255") at the study's length."""
    entries = [res["untrained"][name]] if name in res["untrained"] else res["runs"].get(name, {}).values()
    found = [e.get("by_context", {}) if mode == "by_context" else e["ppl"].get(mode, {}) for e in entries]
    vals = [values[L] for values in found if L in values]
    return (vals, statistics.mean(vals), max(vals) - min(vals)) if vals else None


def cell(st):
    if st is None:
        return "not run"
    vals, mean, _ = st
    return f"{mean:.2f}" if len(vals) == 1 else f"**{mean:.2f}** ({', '.join(f'{v:.2f}' for v in vals)})"


def verdict(a, op, b):
    """The claim `a op b` (op '<': a lower perplexity; '≈': no difference), judged against the seeds'
    spread: a difference within the larger range of the two rows is noise."""
    if a is None or b is None:
        return "not run"
    d, noise = b[1] - a[1], max(a[2], b[2])
    if op == "≈":
        return "holds (within noise)" if abs(d) <= noise else f"does not hold ({-d:+.2f}, noise {noise:.2f})"
    if abs(d) <= noise:
        return f"within noise ({-d:+.2f}, noise {noise:.2f})"
    return "holds" if d > 0 else f"does not hold ({-d:+.2f}, noise {noise:.2f})"


def write_report(res, p, args, context):
    N, f = p["seq_len"], math.ceil(p["seq_len"] / context)
    L, pi = str(N), f"pi_x{f}"
    labels = {**{k: v[0] for k, v in rows(p).items()}, **{k: v[0] for k, v in untrained(p, context).items()}}
    st = lambda name, mode="full", at=L: stats(res, name, mode, at)  # noqa: E731
    runs = res["runs"]
    first = next(iter(runs.get("s2", {}).values()), None)
    seeds = ", ".join(dict.fromkeys(seed for rs in runs.values() for seed in rs))  # as run, in order
    wall = sum(r["train_s"] + r["eval_s"] for n, rs in runs.items() for r in rs.values() if n not in OPTIONAL)
    wall += sum(r["eval_s"] for r in res["untrained"].values())
    lines = [
        "# LongLoRA's claims, re-checked at a small scale",
        "",
        f"`{p['model'] if args.preset != 'demo' else 'demo/model'}` (trained at {context} tokens) extended to {N}. "
        f"Every trained row: {p['steps']} steps of {p['tokens_per_step']:,} tokens, lr {p['lr']:g}, "
        f"{p['warmup']} warm-up steps then {p['schedule']}, LoRA rank 8 (alpha 16) with the embedding and norms "
        f"trained (LoRA+), S2-Attn groups of N/{p['group']}, seeds {seeds}; a row changes one of these. "
        f"Perplexity of the first {p['eval_tokens']:,} tokens of five held-out plays in non-overlapping windows, "
        "with full attention unless said. A cell is the mean (bold) and each seed's value, or a single run's value. "
        "Verdicts: a difference within the larger seed range of the two rows is noise; in brackets, the left side "
        "minus the right, and that range.",
        "",
        f"Machine: {res['machine']}. The runs and evaluations of the default rows took {wall / 60:.0f} min. "
        f"Command: `{res['command']}`; each run's own command is in results.json"
        + (f" (the recipe's: `{first['command']}`)." if first else "."),
    ]
    if args.preset == "demo":
        lines += ["", "What these numbers say, and why some claims do not hold at this scale: [docs/demo.md]"
                  "(docs/demo.md#what-the-study-says)."]  # fmt: skip

    def table(title, head, body, claims):
        lines.extend(["", f"## {title}", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"])
        lines.extend("| " + " | ".join(str(c) for c in r) + " |" for r in body)
        lines.extend([""] + [f"- {text}: {verdict(a, op, b)}" for text, a, op, b in claims])

    paper = lambda t, k: "" if PAPER[t].get(k) is None else f"{PAPER[t][k]:.2f}"  # noqa: E731
    t1 = [pi, "full", "short", "s2"]
    table(
        f"Table 1: attention pattern while fine-tuning (LoRA+; the paper fine-tuned fully), at {N} tokens",
        ["training", "paper, 32768", f"ours, {N}"],
        [[labels[r], paper("Table 1", "pi_x4" if r == pi else r), cell(st(r))] for r in t1],
        [
            (f"fine-tuning repairs PI (paper 8.04 against 236.99): full attention < PI x{f} alone",
             st("full"), "<", st(pi)),
            ("short attention is worse (9.47 against 8.04): full < short", st("full"), "<", st("short")),
            ("the shift closes the gap (8.08 against 9.47): S2 < short", st("s2"), "<", st("short")),
            ("S2-Attn is close to full attention (8.08 against 8.04): S2 ≈ full", st("s2"), "≈", st("full")),
        ],
    )  # fmt: skip
    table(
        f"Table 2: tested with full attention or with the training pattern, at {N} tokens",
        ["training", "paper: full", "paper: own", "ours: full attention", "ours: own pattern"],
        [
            [labels[r], paper("Table 2", (r, "full")), paper("Table 2", (r, "own")), cell(st(r)), cell(st(r, "own"))]
            for r in ("s2", "short")
        ],
        [
            ("S2-Attn's model tests better with full attention (8.12 against 8.64)", st("s2"), "<", st("s2", "own")),
            ("so does short attention's, 'only pattern 1' (8.39 against 9.17)", st("short"), "<", st("short", "own")),
        ],
    )
    lines.append("- 'Only pattern 2' (every head shifted) is not a setting of train.py; not run.")
    at_n = ["base", pi] + [r for r, (_, s) in rows(p).items() if s["length"] == N and r in runs]
    buckets = list(next((e["by_context"] for e in res["untrained"].values() if "by_context" in e), {}))[-4:]
    lines += [
        "",
        f"### Where the difference is: perplexity at {N} tokens, full attention, by the context a prediction had",
        "",
        "| model | " + " | ".join(f"{b} tokens" for b in buckets) + " |",
        "|---" * (len(buckets) + 1) + "|",
    ]
    lines += [f"| {labels[r]} | " + " | ".join(cell(st(r, "by_context", b)) for b in buckets) + " |" for r in at_n]
    t3 = [r for r in ("full_ft", "lora", "lora_r64", "lora_norm", "lora_embed", "s2") if r in runs or r != "lora_r64"]
    table(
        f"Table 3: what trains (S2-Attn), at {N} tokens",
        ["trained", "paper, 32768", f"ours, {N}", f"ours, {context} (the base's context)"],
        [[labels[r], paper("Table 3", r), cell(st(r)), cell(st(r, at=str(context)))] for r in t3],
        [
            ("LoRA+ beats plain LoRA (8.12 against 11.44)", st("s2"), "<", st("lora")),
            ("trained norms help plain LoRA (10.49 against 11.44)", st("lora_norm"), "<", st("lora")),
            ("LoRA+ is close to full fine-tuning (8.12 against 8.08)", st("s2"), "≈", st("full_ft")),
        ]
        + ([("a higher rank does not close the gap (11.44 at rank 8 against 11.96 at 64): rank 8 < rank 64",
             st("lora"), "<", st("lora_r64"))] if "lora_r64" in runs else []),
    )  # fmt: skip
    g = {2: "g2", 4: "g4", 8: "g8"}
    g[p["group"]] = "s2"
    table(
        f"Table 11: S2-Attn group size, at {N} tokens",
        ["group", "paper, 8192", f"ours, {N}"],
        [["full attention", paper("Table 11", "full"), cell(st("full"))]]
        + [[f"N/{k} = {N // k}", paper("Table 11", f"g{k}"), cell(st(g[k]))] for k in (2, 4, 8)],
        [
            ("N/2 is close to full attention (8.04 against 8.02)", st(g[2]), "≈", st("full")),
            ("N/4 is close to full attention (8.04 against 8.02)", st(g[4]), "≈", st("full")),
            ("N/8 costs perplexity against N/4 (8.16 against 8.04)", st(g[4]), "<", st(g[8])),
        ],
    )
    lens = [str(x) for x in p["eval_lengths"]]
    t4 = {T: ("s2" if T == N else f"len{T}") for T in p["train_lengths"]}
    t4_paper = lambda T: PAPER_T4.get(T // context, [None] * 4)  # noqa: E731
    table(
        "Table 4: training length; every model tested at every length (paper: LoRA+ rows, x1 to x8 of 4096)",
        ["trained at", *lens, "paper, x1 .. x8"],
        [
            [f"{T} (x{T // context})", *(cell(st(r, at=x)) for x in lens), " / ".join(
                "-" if v is None else f"{v:.2f}" for v in t4_paper(T))]
            for T, r in t4.items()
        ]
        + [[labels[k], *(cell(st(k, at=x)) for x in lens), ""] for k in untrained(p, context)],
        [(f"trained at {T}, perplexity falls from {T // 2} to {T} tokens", st(r, at=str(T)), "<",
          st(r, at=str(T // 2))) for T, r in t4.items() if str(T // 2) in lens and str(T) in lens]
        + [(f"trained at {b} beats trained at {a}, at {b} tokens", st(t4[b], at=str(b)), "<", st(t4[a], at=str(b)))
           for a, b in zip(p["train_lengths"], p["train_lengths"][1:]) if str(b) in lens],
    )  # fmt: skip
    if "passkey" in res:
        depths = list(next(iter(res["passkey"].values())))
        lines += [
            "",
            "## Passkey"
            + (
                ": a variant, the key a name from the plays (the demo never learned to copy digits)"
                if args.preset == "demo"
                else ""
            ),
            "",
            "Accuracy of 10 keys per depth (the needle's place in the filler), greedy decoding, full attention"
            + (f'; needle "{WORD_NEEDLE}", question "{WORD_QUESTION}".' if args.preset == "demo" else "."),
            "",
            "| model | " + " | ".join(f"depth {d}" for d in depths) + " |",
            "|---" * (len(depths) + 1) + "|",
        ]
        lines += [
            f"| {case} | " + " | ".join(f"{a:.0%}" for a in acc.values()) + " |" for case, acc in res["passkey"].items()
        ]
    return "\n".join(lines) + "\n"


def compare(res, ref_file):
    """Our rows beside a committed results.json's: the relative difference of every value both hold."""
    ref = json.loads(Path(ref_file).read_text())
    print(f"{'row':12} {'seed':>5} {'length':>7} {'ours':>9} {'committed':>9} {'diff':>8}")
    for kind in ("untrained", "runs"):
        for name, entry in res[kind].items():
            by_seed = {"-": entry} if kind == "untrained" else entry
            for seed, r in by_seed.items():
                theirs = ref[kind].get(name, {}) if kind == "untrained" else ref[kind].get(name, {}).get(seed, {})
                for L, v in r["ppl"]["full"].items():
                    w = theirs.get("ppl", {}).get("full", {}).get(L)
                    if w is not None:
                        print(f"{name:12} {seed:>5} {L:>7} {v:9.2f} {w:9.2f} {100 * (v / w - 1):+7.2f}%")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ints = ev.ints
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default="demo", help="demo (a CPU, default) or smollm2 (one GPU)")
    p.add_argument("--model", help="the base model folder (default: the demo's; smollm2: scripts/smollm2.py's output)")
    p.add_argument("--tokenizer", help="its tokenizer (default: the one in --model)")
    p.add_argument("--out", required=True, help="study folder: token files and runs")
    p.add_argument("--report", help="where results.json and REPRODUCTION.md go (default: --out)")
    p.add_argument("--rows", type=lambda s: s.split(","), help="only these rows (results.json's names; passkey)")
    p.add_argument("--seeds", type=ints, help="seeds of every trained row (demo: 42,1)")
    p.add_argument("--compare", help="a committed results.json: print our values beside its values")
    for k in ("seq_len", "steps", "tokens_per_step", "eval_tokens", "warmup"):
        p.add_argument("--" + k.replace("_", "-"), type=int, help="(overrides the preset: toy runs, tests)")
    p.add_argument("--lr", type=float, help="(overrides the preset)")
    p.add_argument("--train-lengths", type=ints, help="(overrides the preset)")
    p.add_argument("--eval-lengths", type=ints, help="(overrides the preset)")
    args = p.parse_args(argv)
    args.argv = argv
    preset = dict(PRESETS[args.preset])
    for k in (*preset, "model"):
        if getattr(args, k, None) is not None:
            preset[k] = getattr(args, k)
    if preset["model"] is None:
        p.error(f"--preset {args.preset} needs --model (python scripts/smollm2.py --out models/smollm2-135m)")
    preset["model"] = str(preset["model"])
    gpu = torch.cuda.is_available()
    try:  # Linux names the CPU model here; elsewhere platform does, less well
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    args.machine = torch.cuda.get_device_name() if gpu else f"{cpu}, {os.cpu_count()} cores"
    args.machine += f", torch {torch.__version__}"
    try:
        res = study(args, preset)
    except (FileNotFoundError, ValueError, ImportError, subprocess.CalledProcessError) as e:
        sys.exit(f"error: {e}")
    if args.compare:
        compare(res, args.compare)
    print(f"wrote {Path(args.report or args.out) / 'REPRODUCTION.md'}")


if __name__ == "__main__":
    main()
