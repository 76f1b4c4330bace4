"""scripts/reproduce.py end to end at a toy scale: the demo model (context 128) extended to 512 with one
step per row. Checks the plumbing: every row trained with the same budget, every table filled from the
files the runs wrote, and a re-run that regenerates the same REPRODUCTION.md without training again."""

import json
import subprocess
import sys
from pathlib import Path

from common import needs_shakespeare

ROOT = Path(__file__).resolve().parent.parent
pytestmark = needs_shakespeare


def test_study_at_toy_scale(tmp_path):
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "reproduce.py"),
        "--model",
        str(ROOT / "demo" / "model"),
        "--tokenizer",
        str(ROOT / "demo" / "model"),
        "--out",
        str(tmp_path),
        "--seq-len",
        "512",
        "--eval-lengths",
        "128,512",
        "--eval-tokens",
        "2048",
        "--steps",
        "1",
        "--grad-accum",
        "1",
        "--lr",
        "1e-4",
        "--warmup",
        "1",
        "--passkey-lengths",
        "512",
        "--depths",
        "0.5",
        "--trials",
        "1",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    trained = [k for k, v in res.items() if "steps" in v]
    assert (
        len(trained) == 8 and {res[k]["tokens"] for k in trained} == {512} and {res[k]["steps"] for k in trained} == {1}
    )
    assert set(res["base"]["ppl"]) == {"128"} and all(
        set(res[k]["ppl"]) == {"128", "512"} for k in trained + ["pi_only"]
    )
    report = (tmp_path / "REPRODUCTION.md").read_text()
    for name in (
        "Table 1",
        "Table 3",
        "Table 11",
        "Passkey",
        "short attention (no shift), LoRA+",
        "--attn short",
        "--trainable norm",
    ):
        assert name in report
    assert f"{res['s2_lora+']['ppl']['512']:.2f}" in report
    mtime = (tmp_path / "runs" / "s2_lora+" / "log.jsonl").stat().st_mtime
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and (tmp_path / "REPRODUCTION.md").read_text() == report
    assert (tmp_path / "runs" / "s2_lora+" / "log.jsonl").stat().st_mtime == mtime  # nothing trained again
