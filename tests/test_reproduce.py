"""scripts/reproduce.py end to end at a toy scale: the demo preset (128 -> 256, 512, 1024) with one step
of 1024 tokens per row. Checks the plumbing: every row trained with the same budget, every table
filled from results.json, a second seed added to one row, a re-run that trains nothing and writes the
same report, a study of another recipe refused without touching the files; and the verdict rule."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from common import needs_shakespeare

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("reproduce", ROOT / "scripts" / "reproduce.py")
reproduce = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reproduce)

TOY = ["--steps", "1", "--tokens-per-step", "1024", "--warmup", "1", "--eval-tokens", "2048"]


def run(tmp_path, *args):
    cmd = [sys.executable, str(ROOT / "scripts" / "reproduce.py"), "--out", str(tmp_path), *TOY, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


@needs_shakespeare
def test_study_at_toy_scale(tmp_path):
    r = run(tmp_path, "--seeds", "42")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run(tmp_path, "--seeds", "1", "--rows", "s2")  # a second seed of one row: its mean and spread
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    trained = {f"{name}/{seed}": v for name, seeds in res["runs"].items() for seed, v in seeds.items()}
    assert set(res["runs"]) == set(reproduce.rows(reproduce.PRESETS["demo"])) - set(reproduce.OPTIONAL)
    assert {v["steps"] for v in trained.values()} == {1} and {v["tokens"] for v in trained.values()} == {1024}
    assert set(res["runs"]["s2"]) == {"42", "1"} and set(res["runs"]["full"]) == {"42"}
    assert set(res["untrained"]) == {"base", "pi_x2", "pi_x4", "pi_x8"}
    assert all(set(v["ppl"]["full"]) == {"128", "256", "512", "1024"} for v in trained.values())
    assert set(res["runs"]["len1024"]["42"]["ppl"]["own"]) == {"1024"} and "own" not in res["runs"]["full"]["42"]["ppl"]
    assert "--group-size 512" in res["runs"]["len1024"]["42"]["command"]
    assert "--seq-len 256" in res["runs"]["len256"]["42"]["command"]
    assert set(res["passkey"]) == {
        "base at 128",
        "base at 512",
        "PI x4 alone at 512",
        "s2, seed 42, at 512",
        "full, seed 42, at 512",
        "s2, seed 42, at 128",
        "full, seed 42, at 128",
    }

    report = (tmp_path / "REPRODUCTION.md").read_text()
    for title in ("Table 1", "Table 2", "Table 3", "Table 11", "Table 4", "Passkey"):
        assert f"## {title}" in report
    s2 = [res["runs"]["s2"][seed]["ppl"]["full"]["512"] for seed in ("42", "1")]
    assert f"**{(s2[0] + s2[1]) / 2:.2f}** ({s2[0]:.2f}, {s2[1]:.2f})" in report  # the mean, then each seed
    assert f"| {res['untrained']['pi_x4']['ppl']['full']['512']:.2f} |" in report
    assert "not run" not in report.replace("is not a setting of train.py; not run", "")

    r = run(tmp_path, "--seeds", "42")
    assert r.returncode == 0 and (tmp_path / "REPRODUCTION.md").read_text() == report
    assert json.loads((tmp_path / "results.json").read_text())["runs"] == res["runs"]  # nothing trained again
    mtime = (tmp_path / "results.json").stat().st_mtime
    r = run(tmp_path / "again", "--rows", "pi_x4", "--compare", str(tmp_path / "results.json"))  # another machine
    assert r.returncode == 0 and all(line.endswith("+0.00%") for line in r.stdout.splitlines() if "pi_x4" in line)
    assert len([line for line in r.stdout.splitlines() if line.startswith("pi_x4")]) == 4  # 128, 256, 512, 1024
    r = run(tmp_path, "--seeds", "42", "--lr", "5e-4")  # another recipe into the same folder
    assert r.returncode != 0 and "another recipe" in r.stderr and "--report" in r.stderr
    assert (tmp_path / "REPRODUCTION.md").read_text() == report and (tmp_path / "results.json").stat().st_mtime == mtime


def test_verdicts_weigh_the_difference_against_the_seeds_spread():
    v = reproduce.verdict
    st = lambda mean, spread: ([mean], mean, spread)  # noqa: E731
    assert v(st(50.0, 0.4), "<", st(51.0, 0.2)) == "holds"
    assert v(st(50.0, 0.4), "<", st(50.3, 0.2)).startswith("within noise (-0.30")
    assert v(st(51.0, 0.4), "<", st(50.0, 0.2)).startswith("does not hold (+1.00, noise 0.40")
    assert v(st(50.0, 0.4), "≈", st(50.3, 0.0)) == "holds (within noise)"
    assert v(st(51.0, 0.4), "≈", st(50.0, 0.0)).startswith("does not hold (+1.00")
    assert v(None, "<", st(50.0, 0.0)) == "not run"


def test_every_row_changes_one_setting_of_the_recipe():
    p = reproduce.PRESETS["demo"]
    rows = reproduce.rows(p)
    recipe = rows["s2"][1]
    assert "g2" not in rows  # groups of N/2 are the demo's recipe: the row is s2 itself
    for name, (_, s) in rows.items():
        changed = {k for k in s if s[k] != recipe[k]}
        assert len(changed) == (name != "s2") or name == "lora_r64", (name, changed)
        flags = reproduce.train_flags(p, s, 42)
        L = s["length"]
        sequences = int(flags[flags.index("--batch-size") + 1]) * int(flags[flags.index("--grad-accum") + 1])
        assert sequences * L == p["tokens_per_step"]  # the same tokens per step at every training length
