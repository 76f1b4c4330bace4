"""The repository's own style rules (ruff.toml): 120-character lines, formatted by `ruff format`, no lint."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("cmd", [["check", "."], ["format", "--check", "."]])
def test_ruff_is_satisfied(cmd):
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("pip install ruff")
    r = subprocess.run([ruff, *cmd], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
