"""The README's example runs as written, and CI runs the README's test command."""

import re
import sys
from pathlib import Path

import torch

import lora
import model
from common import tiny_model

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_example_runs(tmp_path, monkeypatch):
    code = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    assert '"llama-2-7b/"' in code
    model.save(tiny_model(max_seq_len=4096), tmp_path / "llama-2-7b")  # Llama 2's context, extended 4x in the example
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["logits"].shape == (1, 4096, scope["m"].args.vocab_size)
    merged = model.load(tmp_path / "merged")
    base = lora.load_trainable(model.load(tmp_path / "llama-2-7b"), tmp_path / "trainable.safetensors")
    tok = torch.randint(0, merged.args.vocab_size, (1, 32))
    with torch.no_grad():
        torch.testing.assert_close(merged(tok), base(tok), rtol=1e-5, atol=1e-5)


def test_ci_runs_the_readme_test_command():
    """The README's test line is `pip install ... && ... && python -m pytest -q`: CI installs the same
    things and runs the same test command."""
    line = re.search(r"^(pip install [^\n]*python -m pytest[^\n#]*?)\s*$", README, re.M).group(1)
    *installs, test = (part.strip() for part in line.split("&&"))
    ci = (ROOT / ".ci" / "run").read_text()
    assert test in ci.splitlines()
    for part in installs:
        assert part.removeprefix("pip install ") in ci, part


def test_the_reading_path_is_measured():
    """The README's reading path (its "Read the code" steps) is as long as scripts/reading_path.py measures,
    with and without the helpers it passes over; every entry names something that exists."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import reading_path

    path = sum(n for *_, n in reading_path.measure(README))
    everything = sum(n for *_, n in reading_path.measure(README, skipped={}))
    assert f"call: {path} lines; {everything} with" in README, (path, everything)
    assert len(reading_path.entries(README)) >= 10 and path < everything
