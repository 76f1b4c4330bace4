"""scripts/gpu_check.py on a CPU: every part but the CUDA tests runs at toy size (a tiny model, 512-token
windows) and the summary says what each did. On a GPU the same script runs at SmolLM2 size."""

import json
import os
import subprocess
import sys
from pathlib import Path

from test_train import toy_run_folder

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_runs_every_part_on_a_cpu(tmp_path):
    toy_run_folder(tmp_path, n_docs=6, max_seq_len=256)
    tok = tmp_path / "tok" / "tokenizer.model"
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "gpu_check.py"),
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "check"),
        "--model",
        str(tmp_path / "base"),
        "--tokenizer",
        str(tok),
        "--data",
        str(tmp_path / "train.bin"),
        "--seq-len",
        "512",
        "--steps",
        "6",
        "--attn-lengths",
        "256",
    ]
    r = subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600
    )
    summary = json.loads((tmp_path / "check" / "summary.json").read_text())["parts"]
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert all(p["ok"] for p in summary.values()) and summary["cuda-tests"]["skipped"]
    train = summary["train"]
    # killed after its first checkpoint, then resumed
    assert 2 <= train["killed after step"] < 6 and train["peak host GB"] > 0
    assert set(summary["eval"]["ppl trained"]) == {"256", "512"} and summary["eval"]["passkey"].keys() == {"512"}
    assert any("| sdpa | 256 |" in row for row in summary["bench"]["table"])
    assert "- **train**: pass" in (tmp_path / "check" / "summary.md").read_text()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=60)  # never over an earlier check
    assert r.returncode != 0 and "already holds a check" in r.stderr
