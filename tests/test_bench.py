"""bench.py runs end to end on a CPU and prints complete tables (the figures themselves are not judged:
timings belong in BENCHMARKS.md, not in tests)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import bench

ROOT = Path(__file__).resolve().parent.parent


def test_attention_flops_count_the_causal_half():
    assert bench.attn_flops(1024, 1024, 1, 64) == 3 * 4 * (1024 * 1024 / 2) * 64
    assert bench.attn_flops(1024, 256, 8, 64) == bench.attn_flops(1024, 1024, 8, 64) / 4
    assert bench.attn_flops(1000, 256, 1, 64) == 3 * 4 * ((3 * 256 * 256 + 232 * 232) / 2) * 64


def test_all_tables_on_a_cpu():
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench.py"),
            "all",
            "--device",
            "cpu",
            "--attn-lengths",
            "256",
            "--step-lengths",
            "128",
            "--reps",
            "1",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [
        line.split("|")[1:-1]
        for line in r.stdout.splitlines()
        if line.startswith("| ") and not line.startswith("| backend") and not line.startswith("| N ")
    ]
    attn = [row for row in rows if len(row) == 8]
    assert [row[0].strip() for row in attn] == ["sdpa"] and float(attn[0][3]) > 0 and attn[0][5].strip().endswith("x")
    steps = [row for row in rows if len(row) == 9]
    with_peft = importlib.util.find_spec("peft") is not None and importlib.util.find_spec("transformers") is not None
    assert [(row[1].strip(), row[2].strip()) for row in steps] == [("ours (sdpa)", "full"), ("ours (sdpa)", "s2")] + (
        [("transformers + PEFT (sdpa)", "full")] if with_peft else []
    )
    # ms, peak GB; no MFU on CPU
    assert all(float(row[3]) > 0 and float(row[7]) > 0 and row[6].strip() == "n/a" for row in steps)
    assert steps[1][8].strip().endswith("x")  # the S2 speed-up
    assert "`fit` needs a CUDA GPU" in r.stdout
