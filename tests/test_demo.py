"""demo.py (`python train.py` with no arguments): the shipped demo model, its data split, the demo on a reduced
budget, and its plain-language report; plus the pretraining options that made the model."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import demo
import model
import parallel
import train
from common import needs_shakespeare

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo"


def test_shipped_model_is_small_and_loads():
    m = model.load(DEMO / "model")
    assert m.args.max_seq_len == 128 and m.args.rope_interpolation == 1.0
    assert sum(f.stat().st_size for f in (DEMO / "model").iterdir()) < 8 * 2**20  # a few MB
    tok = data.load_tokenizer(DEMO / "model")
    assert tok.vocab_size == m.args.vocab_size
    assert json.loads((DEMO / "params.json").read_text())["dim"] == m.args.dim  # what demo/make.sh started from


@needs_shakespeare
def test_held_out_plays_are_never_trained_on():
    train_files, held = data.shakespeare("train"), data.shakespeare("held-out")
    assert len(held) == len(data.SHAKESPEARE_HELD_OUT) and not set(train_files) & set(held)

    def stem(f):  # the play, whatever the edition
        return f.stem.removesuffix("_f").removesuffix("_gut").replace("twelfe-night", "twelfth_night")

    assert not {stem(f) for f in train_files} & {stem(f) for f in held}  # no edition of a held-out play trains
    assert "metadata" not in " ".join(f.name for f in train_files + held)
    with pytest.raises(ValueError, match="shakespeare:train and shakespeare:held-out"):
        data.shakespeare("test")


@needs_shakespeare
def test_demo_runs_end_to_end_on_a_small_budget(tmp_path):
    out = tmp_path / "demo"
    code = (
        "import sys, demo, parallel; r, w, d = parallel.setup_distributed(); "
        "demo.demo(r, w, d, out=sys.argv[1], steps=2, eval_tokens=4096)"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [sys.executable, "-c", code, str(out)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "demo.json").read_text())
    assert (
        set(res) == {"base", "pi_only", "after", "after_s2"}
        and set(res["after"]) == {"128", "512"}
        and set(res["after_s2"]) == {"512"}
    )
    assert all(1 < v < 2048 for row in res.values() for v in row.values())  # perplexities below the vocabulary size
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and log[0]["tokens"] == 8 * 512
    after = model.load(out / "merged")
    assert after.args.rope_interpolation == 4.0 and after.args.max_seq_len == 512
    assert "perplexity on 4,096 tokens of held-out plays" in r.stdout


def test_demo_report_says_what_the_numbers_say():
    s2_better = {
        "base": {128: 54.2, 512: 97.5},
        "pi_only": {512: 152.9},
        "after": {128: 55.5, 512: 55.0},
        "after_s2": {512: 53.6},
    }
    text = demo.report(s2_better, 128, 512, 65536, 256)
    assert "tested with S2-Attn, groups of 256" in text and "53.60" in text
    assert text.splitlines()[-2:] == [
        "At 512 tokens: 97.5 untouched, 152.9 with interpolated positions alone, 53.6 after LongLoRA.",
        "After LongLoRA, 512-token windows score better than the original model at its own 128 tokens (54.2).",
    ]
    worse = {"base": {256: 52.7, 1024: 78.2}, "pi_only": {1024: 91.2}, "after": {256: 57.0, 1024: 58.0}}
    text = demo.report(worse, 256, 1024, 65536, 512)
    assert (
        "tested with S2-Attn" not in text
        and "58.0 after LongLoRA" in text
        and "score worse than the original model" in text
    )


def test_learning_rate_schedules():
    lr = lambda s, schedule: train.learning_rate(s, lr=1e-3, warmup=10, steps=110, schedule=schedule)  # noqa: E731
    assert [lr(s, "constant") for s in (1, 5, 10, 60, 110)] == pytest.approx([1e-4, 5e-4, 1e-3, 1e-3, 1e-3])
    assert [lr(s, "cosine") for s in (5, 10, 60, 110)] == pytest.approx([5e-4, 1e-3, 0.55e-3, 1e-4])


def test_init_pretrains_from_a_params_file(tmp_path):
    params = {
        "dim": 64,
        "n_layers": 2,
        "n_heads": 4,
        "vocab_size": 320,
        "multiple_of": 32,
        "max_seq_len": 64,
        "tie_embeddings": True,
    }
    (tmp_path / "params.json").write_text(json.dumps(params))
    m = model.build(*parallel.random_weights(tmp_path / "params.json", seed=3))
    assert torch.equal(
        m.layers[0].attention.wq.weight,
        model.build(*parallel.random_weights(tmp_path, seed=3)).layers[0].attention.wq.weight,
    )
    assert abs(m.layers[0].attention.wq.weight.std().item() - 0.02) < 0.002
    assert abs(m.layers[0].feed_forward.w2.weight.std().item() - 0.01) < 0.001  # 0.02 / sqrt(2 * 2 layers)
    text = "".join(f"the {w} of a {w} and " for w in "cat dog king queen sword crown".split() * 400)
    (tmp_path / "t.txt").write_text(text)
    tok = data.train_tokenizer([tmp_path / "t.txt"], vocab_size=320, out=tmp_path / "tok")
    data.tokenize(tok, tmp_path / "t.bin", [tmp_path / "t.txt"])
    paths = [
        "--model",
        str(tmp_path / "params.json"),
        "--data",
        str(tmp_path / "t.bin"),
        "--out",
        str(tmp_path / "run"),
    ]
    settings = "--seq-len 64 --attn full --dtype float32 --lr 3e-3 --warmup 2 --steps 12 --grad-accum 1 --batch-size 4"
    settings += " --schedule cosine --save-every 0"

    def run(*flags):
        cmd = [sys.executable, str(ROOT / "train.py"), "--init", *paths, *settings.split(), *flags]
        return subprocess.run(
            cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300
        )

    r = run("--lora-rank", "8")
    assert r.returncode == 2 and "--lora-rank 0 and --attn full" in r.stderr
    r = run("--lora-rank", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"] - 1 and log[-1]["lr"] == pytest.approx(3e-4)
    assert log[0]["tflops"] > 0 and log[0]["mfu"] is None  # no known peak on a CPU
    assert model.load(tmp_path / "run" / "merged").args.dim == 64


def load_repeats():
    """demo/repeats.py (a script beside demo/make.sh; `demo` is demo.py's name)."""
    spec = importlib.util.spec_from_file_location("repeats", ROOT / "demo" / "repeats.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_with_repeats_mixes_text_and_passages_said_three_times(tmp_path):
    repeats = load_repeats()
    text = np.arange(1000, 1000 + 64 * 40, dtype=np.uint16)  # distinct ids, so every token says where it came from
    text.tofile(tmp_path / "t.bin")
    (tmp_path / "t.json").write_text(json.dumps({"dtype": "uint16", "tokens": len(text), "vocab_size": 4096}))
    meta = repeats.with_repeats(tmp_path / "t.bin", tmp_path / "r.bin", 64, every=4, seed=0)
    ids = data.read_tokens(tmp_path / "r.bin")[0].astype(np.int64)
    assert meta["tokens"] == len(ids) and meta["repeats"]["every"] == 4
    natural, i, kinds = [], 0, []
    while i < len(ids):  # walk the chunks: text continues where it left off, or a passage is said 3 times
        if natural and ids[i] == natural[-1] + 1 or not natural and ids[i] == 1000:
            natural += list(ids[i : i + 64])
            i += 64
            continue
        m = next(
            m for m in range(8, 49) if np.array_equal(ids[i + m : i + min(3 * m, 64)], ids[i : i + min(3 * m, 64) - m])
        )
        kinds.append(bool((np.diff(ids[i : i + m]) == 1).all()))  # a stretch of the text, or random tokens
        i = i + min(3 * m, 64)
    assert natural == list(range(1000, 1000 + 64 * 40))  # all of the text, in order
    assert 5 <= len(kinds) <= 25 and set(kinds) == {True, False}  # about one chunk in four, of both kinds
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "demo" / "repeats.py"),
            str(tmp_path / "t.bin"),
            "--out",
            str(tmp_path / "r2.bin"),
            "--seq-len",
            "64",
            "--every",
            "1",
            "--windows",
            "7",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert data.read_tokens(tmp_path / "r2.bin")[1]["tokens"] <= 7 * 64 and "tokens" in r.stdout
    with pytest.raises(FileExistsError, match="--overwrite"):
        repeats.with_repeats(tmp_path / "t.bin", tmp_path / "r.bin", 64)
    with pytest.raises(ValueError, match="give the number of windows"):
        repeats.with_repeats(tmp_path / "t.bin", tmp_path / "r3.bin", 64, every=1)
    assert not (tmp_path / "r3.bin").exists()


@needs_shakespeare
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_demo_stops_with_one_line(tmp_path, sig):
    """Ctrl-C or SIGTERM while the demo evaluates the shipped model: one line on stderr saying how to start
    again, no traceback, exit 130 or 143 (in training, train.py's checkpoint and resume line: test_train)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "demo.py")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        cwd=tmp_path,
    )  # fmt: skip
    for line in proc.stdout:  # the demo is at work on the shipped model's perplexity
        if line.startswith("perplexity of the shipped model"):
            break
    time.sleep(1)
    proc.send_signal(getattr(signal, sig))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + getattr(signal, sig) and "Traceback" not in err, err[-3000:]
    assert (
        err.strip().splitlines()[-1]
        == f"stopped ({'Ctrl-C' if sig == 'SIGINT' else sig}): python train.py starts the demo again"
    )
