"""train.py end to end on CPU: 1 process vs 2 under torchrun (FSDP2 over gloo), kill and resume, the
merged model, and bad input. Runs are tiny (a 2-layer model, 128-token sequences) and judged by what
they wrote (log.jsonl, safetensors), not only by their exit code."""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import data
import hf
import lora
import model
import parallel
import s2attn
import train
from common import hf_model, tiny_model

ROOT = Path(__file__).resolve().parent.parent
WORDS = (
    "the a of and to in is was he that it his her with as for had you not be on at by which but from have or".split()
)


def synthetic_text(n_words, seed):
    """Text with learnable structure: frequent words, and short phrases that repeat."""
    g = torch.Generator().manual_seed(seed)
    phrases = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (4,), generator=g)) for _ in range(12)]
    picks = torch.randint(0, len(phrases), (n_words // 4,), generator=g)
    return ". ".join(phrases[i] for i in picks) + ".\n"


def toy_run_folder(d, n_docs=4, max_seq_len=64):
    """`d` with texts/, a 320-token tokenizer (tok/), their tokens (train.bin) and a tiny base model."""
    (d / "texts").mkdir()
    for i in range(n_docs):
        (d / "texts" / f"doc{i}.txt").write_text(synthetic_text(3000, seed=i))
    tok = data.train_tokenizer(sorted((d / "texts").glob("*.txt")), vocab_size=320, out=d / "tok")
    data.tokenize(tok, d / "train.bin", [d / "texts"])
    model.save(tiny_model(vocab_size=320, max_seq_len=max_seq_len), d / "base")
    return d


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return toy_run_folder(tmp_path_factory.mktemp("run"))


def run_train(setup, out, *flags, nproc=1, check=True):
    common = ["--model", str(setup / "base"), "--data", str(setup / "train.bin"), "--out", str(out)]
    common += "--seq-len 128 --dtype float32 --warmup 2 --lr 3e-3 --grad-accum 2 --save-every 2 --device cpu".split()
    r = train_cli(*common, *flags, nproc=nproc)
    if check:  # judge what the run wrote: gloo may abort a rank after a clean finish (see DESIGN)
        assert (out / "merged").exists(), f"run failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


def test_one_and_two_processes_agree(setup, tmp_path):
    """Same global batch (2 sequences per micro-step): 1 process x batch 2 == 2 processes x batch 1.
    Plain SGD, since AdamW amplifies float-rounding differences in near-zero gradients."""
    run_train(setup, tmp_path / "one", "--steps", "3", "--batch-size", "2", "--optim", "sgd", "--lr", "0.5")
    run_train(setup, tmp_path / "two", "--steps", "3", "--batch-size", "1", "--optim", "sgd", "--lr", "0.5", nproc=2)
    torch.testing.assert_close(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-5, atol=1e-6)
    a, b = load_file(tmp_path / "one" / "trainable.safetensors"), load_file(tmp_path / "two" / "trainable.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)


def test_loss_falls_and_outputs_load(setup, tmp_path):
    out = tmp_path / "run"
    run_train(setup, out, "--steps", "8", "--batch-size", "2")
    ls, log = losses(out), [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert len(ls) == 8 and ls[-1] < ls[0] - 0.3, ls
    assert all(r["tokens_per_s"] > 0 and r["peak_mem_gb"] > 0 for r in log)
    assert [r["lr"] for r in log[:3]] == [1.5e-3, 3e-3, 3e-3]  # linear warm-up over 2 steps, then constant
    merged = model.load(out / "merged")
    # ceil(128 / 64): Position Interpolation
    assert (merged.args.rope_interpolation, merged.args.max_seq_len) == (
        2.0,
        128,
    )
    # merged == base + trainable weights
    rebuilt = lora.merge_lora(lora.load_trainable(model.load(setup / "base"), out / "trainable.safetensors"))
    tok = torch.randint(0, 320, (1, 128), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(tok), rebuilt(tok))
    trained = load_file(out / "trainable.safetensors")
    assert "tok_embeddings.weight" in trained and "norm.weight" in trained and "output.weight" not in trained


@pytest.mark.compile
def test_resume_equals_uninterrupted(setup, tmp_path):
    """A compiled run (--compile) stopped after step 2 and resumed gives the uninterrupted run's losses and
    weights bit for bit. (Eager runs resume exactly too: the SIGTERM and packed-SFT tests.)"""
    run_train(setup, tmp_path / "full", "--steps", "4", "--batch-size", "2", "--compile")
    run_train(setup, tmp_path / "cut", "--steps", "2", "--batch-size", "2", "--compile")
    (tmp_path / "cut" / "checkpoints" / ".partial-step-0000003").mkdir()  # a save that a kill interrupted
    r = run_train(setup, tmp_path / "cut", "--steps", "4", "--batch-size", "2", "--resume", "--compile")
    assert r.stdout.count("compiling the blocks included (--compile)") == 1 and "step 3: " in r.stdout
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")  # bit-identical, optimizer state included
    a, b = load_file(tmp_path / "full" / "trainable.safetensors"), load_file(tmp_path / "cut" / "trainable.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_killed_run_resumes_from_its_last_checkpoint(setup, tmp_path):
    out = tmp_path / "run"
    flags = [
        "--model",
        str(setup / "base"),
        "--data",
        str(setup / "train.bin"),
        "--out",
        str(out),
        "--seq-len",
        "128",
        "--dtype",
        "float32",
        "--grad-accum",
        "1",
        "--save-every",
        "1",
        "--keep",
        "2",
        "--device",
        "cpu",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *flags, "--steps", "10000"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "checkpoints").glob("step-*"))) < 2:
        time.sleep(0.05)
    time.sleep(0.3)  # somewhere in the middle of a step or of a save
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    last = int(sorted((out / "checkpoints").glob("step-*"))[-1].name.split("-")[1])
    r = run_train(setup, out, "--steps", str(last + 1), "--grad-accum", "1", "--resume")
    assert f"resuming after step {last}" in r.stdout
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, last + 2))  # the steps done after the last checkpoint were dropped, then redone


BAD_FLAGS = ["missing-model", "vocab", "group", "both-data", "backend", "group-zero", "tokenizer-2proc"]
BAD_FLAGS += ["context-slices", "context-full", "context-world-2proc", "qwen-as-meta", "sliding-window", "yarn-on-pi"]
BAD_FLAGS += ["rope-scale-0", "alpha-0", "clip", "warmup", "save-every", "lr", "seq-len", "out-file", "data-json"]
BAD_FLAGS += ["eval-nothing", "eval-data-tokenizer"]
BAD_FOLDERS = ["existing-out", "existing-out-2proc", "corrupt-checkpoint", "resume-nothing", "resume-no-checkpoint"]
BAD_FOLDERS += ["resume-past-steps", "resume-finished"]


@pytest.mark.parametrize("case", BAD_FLAGS + BAD_FOLDERS + ["corrupt-tokenizer-2proc"])
def test_bad_input_gets_a_clear_error_and_keeps_files(setup, tmp_path, case):
    """Refused with a one-line error naming the fix, on every process (none is left hanging), before
    anything in --out is changed: flags before the model loads, the run folder before anything is written;
    a new --out is not left behind."""
    out = tmp_path / "run"
    flags, nproc = ["--steps", "2"], 2 if case.endswith("2proc") else 1
    if case == "missing-model":
        flags += ["--model", str(tmp_path / "nope")]
        expect = "is not a folder"
    elif case == "vocab":
        model.save(tiny_model(vocab_size=200), tmp_path / "small")
        flags += ["--model", str(tmp_path / "small")]
        expect = "but the model's vocabulary has 200: it was tokenized with another tokenizer"
    elif case == "group":
        flags += ["--group-size", "256"]
        expect = "--group-size 256 is larger than --seq-len 128"
    elif case == "both-data":
        flags += ["--sft", "x.json"]
        expect = "give exactly one of --data"
    elif case.startswith("existing-out"):
        run_train(setup, out, "--steps", "2")
        expect = "already holds a run; pass --resume"
    elif case == "corrupt-checkpoint":
        run_train(setup, out, "--steps", "2")
        shard = next((out / "checkpoints").glob("step-*/*.distcp"))
        shard.write_bytes(shard.read_bytes()[:100])
        flags = ["--steps", "4", "--resume"]
        expect = "cannot be read"
    elif case == "backend":
        flags += ["--backend", "flash"]
        expect = "--backend flash runs on CUDA only: use --backend sdpa on CPU"
    elif case == "group-zero":
        flags += ["--group-size", "0"]
        expect = "--group-size 0: an S2-Attn group holds at least 1 token"
    elif case in ("rope-scale-0", "alpha-0", "clip", "warmup", "save-every", "lr", "seq-len"):
        flag, value, expect = {
            "rope-scale-0": ("--rope-scale", "0", "--rope-scale 0: positions are divided by it, so at least 1"),
            "alpha-0": ("--lora-alpha", "0", "--lora-alpha 0: a rank of at least 0 (0: full fine-tuning) and an alpha"),
            "clip": ("--clip", "-1", "--clip -1 must be at least 0"),
            "warmup": ("--warmup", "-5", "--warmup -5 must be at least 0"),
            "save-every": ("--save-every", "-1", "--save-every -1 must be at least 0"),
            "lr": ("--lr", "-1", "--lr -1: the learning rate must be above 0"),
            "seq-len": ("--seq-len", "-512", "--seq-len -512: the training length is at least 1 token"),
        }[case]
        flags += [flag, value]
    elif case == "eval-nothing":
        flags += ["--eval-every", "2"]
        expect = "--eval-every takes one of --eval-data (a file) and --eval-split (a fraction between 0 and 1)"
    elif case == "eval-data-tokenizer":  # held-out tokens made with another tokenizer: checked as --data is
        meta = json.loads((setup / "train.json").read_text())
        shutil.copyfile(setup / "train.bin", tmp_path / "held.bin")
        (tmp_path / "held.json").write_text(json.dumps({**meta, "tokenizer_sha256": "0" * 64, "tokenizer": "x.model"}))
        flags += ["--eval-every", "2", "--eval-data", str(tmp_path / "held.bin"), "--tokenizer", str(setup / "tok")]
        expect = "held.bin: it was tokenized with another tokenizer (x.model), not with --tokenizer"
    elif case == "out-file":
        out.write_text("a file")
        expect = f"--out {out} is a file: --out names the run's folder"
    elif case == "data-json":
        flags += ["--data", str(setup / "train.json")]
        expect = f"{setup / 'train.json'} is a token file's description: give the tokens, {setup / 'train.bin'}"
    elif case == "context-slices":
        flags += ["--context-parallel", "3"]
        expect = "--seq-len 128 in --context-parallel 3 slices: each slice must be a whole number of --group-size 32"
    elif case == "context-full":
        flags += ["--context-parallel", "2", "--attn", "full"]
        expect = "full attention needs the whole sequence in every process: use --attn s2"
    elif case == "context-world-2proc":
        flags += ["--context-parallel", "4"]
        expect = "--context-parallel 4 does not divide the 2 processes"
    elif case == "qwen-as-meta":
        pytest.importorskip("transformers", reason="pip install transformers")
        hf_model("Qwen2Config", vocab_size=320, num_key_value_heads=2).save_pretrained(tmp_path / "qwen")
        flags += ["--model", str(tmp_path / "qwen"), "--export-format", "meta"]
        expect = "Meta's format holds Llamas; a qwen2 model exports with --export-format hf"
    elif case == "sliding-window":
        pytest.importorskip("transformers", reason="pip install transformers")
        hf_model("MistralConfig", vocab_size=320, sliding_window=32).save_pretrained(tmp_path / "mistral")
        flags += ["--model", str(tmp_path / "mistral")]
        expect = "sliding-window attention (sliding_window 32) is not implemented"
    elif case == "yarn-on-pi":
        model.save(tiny_model(vocab_size=320, rope_interpolation=2.0, max_seq_len=64), tmp_path / "pi")
        flags += ["--model", str(tmp_path / "pi"), "--rope-method", "yarn"]
        expect = "YaRN does not stack on Position Interpolation"
    elif case == "resume-nothing":  # a run that stopped before its first checkpoint left only its log
        out.mkdir()
        (out / "log.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
        flags += ["--resume"]
        expect = f"--resume: {out} holds no checkpoint to continue from; run without --resume"
    elif case in ("resume-past-steps", "resume-finished"):  # --resume with --steps the run is at or past
        run_train(setup, out, "--steps", "3", "--save-every", "1")
        flags = ["--steps", "2" if case == "resume-past-steps" else "3", "--resume"]
        expect = f"is at step 3 and exported, so --steps {flags[1]} leaves nothing to train: pass a larger --steps"
    elif case == "resume-no-checkpoint":  # a finished run whose checkpoints were deleted
        run_train(setup, out, "--steps", "1", "--save-every", "0")
        shutil.rmtree(out / "checkpoints")
        flags += ["--resume"]
        expect = "holds no checkpoint to continue from (it holds an export but no checkpoint)"
    elif case == "corrupt-tokenizer-2proc":  # an unreadable file: tokenizers raises a plain Exception on rank 0
        (tmp_path / "bad.json").write_text("{ not a tokenizer")
        flags += ["--tokenizer", str(tmp_path / "bad.json")]
        expect = "Exception:"
    else:  # tokenizer-2proc: a missing --tokenizer, found by rank 0 before training; every rank stops
        flags += ["--tokenizer", str(tmp_path / "nope.model")]
        expect = "does not exist"
    before, existed = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}, out.exists()
    r = run_train(setup, out, *flags, check=False, nproc=nproc)
    assert out.exists() == existed  # a run refused before its first step leaves no new folder behind
    assert r.returncode != 0 and expect in r.stderr, r.stderr[-3000:]
    assert f'{ROOT / "train.py"}", line' not in r.stderr  # no traceback through our code (torchrun adds one of its own)
    assert nproc > 1 or (r.returncode == 2 and "Traceback" not in r.stderr)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    if case == "resume-nothing":  # the same folder, without --resume, starts over and replaces the log
        r = run_train(setup, out, "--steps", "2")
        assert "replacing" in r.stdout and len(losses(out)) == 2


def test_offloaded_activations_train_the_same(setup, tmp_path):
    """--offload-activations keeps the checkpointed block inputs in host memory: the same losses and weights."""
    run_train(setup, tmp_path / "a", "--steps", "2", "--save-every", "0")
    run_train(setup, tmp_path / "b", "--steps", "2", "--save-every", "0", "--offload-activations")
    assert losses(tmp_path / "b") == losses(tmp_path / "a")
    a, b = load_file(tmp_path / "a" / "trainable.safetensors"), load_file(tmp_path / "b" / "trainable.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    r = run_train(setup, tmp_path / "c", "--offload-activations", "--no-activation-checkpointing", check=False)
    assert r.returncode == 2 and "drop --no-activation-checkpointing" in r.stderr


SGD = ["--steps", "2", "--optim", "sgd", "--lr", "0.5", "--save-every", "0"]
COMPILED = ("--compile", "--offload-activations")


@pytest.fixture(scope="module")
def one_process_sgd(setup, tmp_path_factory):
    """base -> (its --model flags, the run of two SGD steps of batch 2 in one process that context-parallel
    runs must equal). "gqa": the setup's base, 4 query heads and 2 kv heads; "odd": 3 query heads and 1 kv
    head, so a kv head serves both halves of the heads."""
    runs = {}

    def run(base):
        if base not in runs:
            folder = tmp_path_factory.mktemp(base)
            if base == "odd":
                model.save(tiny_model(vocab_size=320, max_seq_len=64, dim=48, n_heads=3, n_kv_heads=1), folder / "base")
            flags = ["--model", str(folder / "base" if base == "odd" else setup / "base")]
            run_train(setup, folder / "one", *SGD, *flags, "--batch-size", "2")
            runs[base] = flags, folder / "one"
        return runs[base]

    return run


@pytest.mark.parametrize(
    "nproc,P,base,extra",
    [(2, 2, "gqa", ()), (4, 4, "gqa", ()), (4, 2, "gqa", ()), (2, 2, "odd", ())]
    + [pytest.param(2, 2, "gqa", COMPILED, marks=pytest.mark.compile, id="2-2-gqa-compiled")],
)
def test_context_parallel_trains_like_one_process(setup, one_process_sgd, tmp_path, nproc, P, base, extra):
    """Each sequence split into P slices over P processes (--seq-len 128, groups of 32: P = 2 gives slices of
    two groups, P = 4 of one, and the shifted groups straddle every border), beside data parallelism over
    nproc / P groups: the same losses and trained weights as one process with the same global batch.
    Plain SGD, as in test_one_and_two_processes_agree. COMPILED: also each block compiled, with the halo's
    collectives inside the compiled forward and the checkpointed inputs offloaded (to float32 rounding)."""
    flags, one = one_process_sgd(base)
    out = tmp_path / "run"
    r = run_train(
        setup, out, *SGD, *flags, *extra, "--batch-size", str(2 * P // nproc), "--context-parallel", str(P), nproc=nproc
    )
    assert f"{nproc // P} data-parallel x {P} context-parallel: slices of {128 // P} tokens" in r.stdout
    torch.testing.assert_close(losses(out), losses(one), rtol=1e-5, atol=1e-6)
    a, b = load_file(one / "trainable.safetensors"), load_file(out / "trainable.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)


def test_context_parallel_slices_are_the_padded_batch():
    """Samples of different lengths (supervised examples) are padded to --seq-len, and the P processes of a
    data-parallel group take its P consecutive slices: put back together, the batch that group would train on."""
    ds = [(torch.arange(n), torch.arange(1, n + 1)) for n in (5, 12, 9, 16, 3, 7, 16, 1)]
    kw = dict(pad_id=0, grad_accum=2, batch_size=2, world=2)
    for rank in (0, 1):
        whole = train.micro_batches(ds, 1, rank=rank, **kw)
        parts = [train.micro_batches(ds, 1, rank=rank, part=p, parts=4, seq_len=16, **kw) for p in range(4)]
        for i, (x, t, _, _) in enumerate(whole):
            joined = [torch.cat([part[i][j] for part in parts], dim=1) for j in (0, 1)]
            n = x.shape[1]
            assert all(p[i][0].shape == (2, 4) for p in parts)
            assert torch.equal(joined[0][:, :n], x) and torch.equal(joined[1][:, :n], t)
            assert (joined[0][:, n:] == 0).all() and (joined[1][:, n:] == data.IGNORE).all()


HALO_SCRIPT = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
import bench, model, parallel, train
from s2attn import s2_attention
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
for P, (N, G, H, Hkv) in ((2, (32, 8, 4, 2)), (4, (48, 6, 3, 1))):
    group = parallel.context_group(P)
    halo, part = parallel.halo_exchange(group), rank % P
    g = torch.Generator().manual_seed(rank // P)  # one sequence per data-parallel group
    q, k, v = (torch.randn(2, N, h, 8, generator=g, dtype=torch.float64).requires_grad_() for h in (H, Hkv, Hkv))
    w = torch.randn(2, N, H, 8, generator=g, dtype=torch.float64)
    n = N // P
    mine = slice(part * n, (part + 1) * n)
    out = parallel.s2_attention_on_slice(q[:, mine], k[:, mine], v[:, mine], G, halo=halo)
    (out * w[:, mine]).sum().backward()
    grads = [x.grad.clone() for x in (q, k, v)]
    for t in grads:
        dist.all_reduce(t, group=group)  # each process holds its slice's gradients (halo included)
    for x in (q, k, v):
        x.grad = None
    whole = s2_attention(q, k, v, G)
    (whole * w).sum().backward()
    torch.testing.assert_close(out, whole[:, mine], rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    message = bench.halo_bytes(model.ModelArgs(dim=8 * H, n_heads=H, n_kv_heads=Hkv), 2, G, 8)
    expected = message * ((part < P - 1) + (part > 0))  # forward to the next slice, gradient to the previous
    assert halo.sent == expected, (P, rank, halo.sent, expected)
    print(f"rank {{rank}} P {{P}}: {{halo.sent}} bytes", flush=True)
"""


def test_halo_exchange_between_processes(tmp_path):
    """parallel.halo_exchange over gloo, 4 processes in context groups of 2 and then of 4: each slice's
    output, and the gradients of q, k and v summed over the group (the halo's travel back to the process
    that sent it), equal the unsplit attention's in float64; each process sends the bytes the memory
    model predicts (bench.halo_bytes): one message forward unless it holds the last slice, one back unless
    it holds the first."""
    script = tmp_path / "halo.py"
    script.write_text(HALO_SCRIPT.format(root=str(ROOT)))
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4", str(script)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert r.stdout.count("bytes") == 8


def test_offload_takes_exactly_the_checkpointed_inputs():
    """Under checkpointed(), the only tensor autograd saves is the block's input; with offload it goes
    through save_on_cpu's hooks (so an outer hook sees nothing), and the gradients are unchanged."""
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    grads = []
    for offload in (False, True):
        seen = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(tuple(t.shape)) or t, lambda t: t):
            y = parallel.checkpointed(lambda h: torch.relu(lin(h)) * 2, x, offload=offload)
        assert seen == ([] if offload else [(4, 8)])
        grads.append(torch.autograd.grad(y.sum(), [x, lin.weight]))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_resume_refuses_changed_settings(setup, tmp_path):
    run_train(setup, tmp_path / "run", "--steps", "2")
    r = run_train(setup, tmp_path / "run", "--steps", "4", "--resume", "--lora-rank", "4", check=False)
    assert r.returncode != 0 and "--lora-rank 8 -> 4" in r.stderr, r.stderr[-2000:]


def test_full_fine_tuning(setup, tmp_path):
    out = tmp_path / "run"
    run_train(setup, out, "--steps", "2", "--lora-rank", "0", "--attn", "full")
    assert not (out / "trainable.safetensors").exists()
    base, merged = model.load(setup / "base"), model.load(out / "merged")
    changed = [k for k, v in merged.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert "output.weight" in changed and "layers.1.feed_forward.w2.weight" in changed  # every weight trains


def test_supervised_fine_tuning(setup, tmp_path):
    # one example: its loss must fall
    examples = [{"instruction": "Say the phrase.", "input": "", "output": synthetic_text(40, seed=0)}]
    (tmp_path / "sft.json").write_text(json.dumps(examples))
    out = tmp_path / "run"
    cmd = [
        "--model",
        str(setup / "base"),
        "--sft",
        str(tmp_path / "sft.json"),
        "--tokenizer",
        str(setup / "tok"),
        "--out",
        str(out),
        "--seq-len",
        "64",
        "--dtype",
        "float32",
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--grad-accum",
        "1",
        "--lr",
        "3e-3",
        "--warmup",
        "1",
        "--device",
        "cpu",
    ]
    r = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *cmd],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=ROOT,
        timeout=600,
    )
    assert (out / "merged").exists(), r.stderr[-3000:]
    assert len(losses(out)) == 3 and losses(out)[-1] < losses(out)[0]


def test_packed_sft_trains_and_resumes_exactly(setup, tmp_path):
    """--sft --pack: examples of many lengths packed into rows of --seq-len tokens. The log says how many
    real tokens each step held and what fraction was padding (less than unpacked batches'), and a run
    killed after its second checkpoint and resumed gives the uninterrupted run's losses, bit for bit."""
    words = [4, 40, 12, 90, 8, 25, 60, 5, 16, 33, 3, 70, 20, 9]
    examples = [{"instruction": f"Say it {i}.", "output": synthetic_text(n, seed=i)} for i, n in enumerate(words)]
    (tmp_path / "sft.json").write_text(json.dumps(examples))
    common = ["--model", setup / "base", "--sft", tmp_path / "sft.json", "--tokenizer", setup / "tok", "--seq-len", 128]
    common += "--dtype float32 --batch-size 2 --grad-accum 2 --lr 3e-3 --warmup 1 --device cpu".split()

    def run(out, *flags):
        r = train_cli(*common, "--out", out, *flags)
        assert (out / "checkpoints").exists(), r.stderr[-3000:]
        return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]

    packed = run(tmp_path / "full", "--pack", "--steps", "8")
    cut = tmp_path / "cut"
    with open(tmp_path / "cut.out", "w") as log:
        proc = train_cli(*common, "--out", cut, "--pack", "--steps", 1000, "--save-every", 1, background=True, log=log)
        deadline = time.time() + 120
        while time.time() < deadline and len(list((cut / "checkpoints").glob("step-*"))) < 2:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert len(list((cut / "checkpoints").glob("step-*"))) >= 2, (tmp_path / "cut.out").read_text()[-3000:]
    resumed = run(cut, "--pack", "--steps", "8", "--resume")
    assert [r["loss"] for r in resumed] == [r["loss"] for r in packed]
    unpacked = run(tmp_path / "unpacked", "--steps", "2")
    assert all(0 < r["real_tokens"] <= r["tokens"] <= 4 * 128 for r in packed + unpacked)  # 2 x 2 rows of <= 128
    assert max(r["padding"] for r in packed) < min(r["padding"] for r in unpacked)
    assert packed[-1]["loss"] < packed[0]["loss"]


# ----------------------------------------------------------------------------- the distributed path


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_each_process_holds_only_its_share(setup, tmp_path, mode):
    """Host memory after loading an fp16 Hugging Face checkpoint (135M parameters, float32 in training):
    with 2 processes, the fullest one holds at most 60% of what one process alone holds above the
    baseline, where a rank that built the whole model before sharding would hold all of it. LoRA: the
    frozen weights; full fine-tuning: the trainable ones (no reference to the unsharded originals)."""
    margs = model.ModelArgs(dim=1024, n_layers=8, n_heads=8, vocab_size=320, hidden_dim=4096, max_seq_len=64)
    model.save(model.build(*parallel.random_weights(margs)).to(torch.float16), tmp_path / "base", format="hf")
    full = sum(t.numel() for t in model.read_checkpoint(tmp_path / "base")[1].shapes.values()) * 4  # bytes in float32
    flags = [
        "--model",
        str(tmp_path / "base"),
        "--seq-len",
        "16",
        "--steps",
        "1",
        "--grad-accum",
        "1",
        "--save-every",
        "0",
        "--no-activation-checkpointing",
    ] + (["--trainable", "norm"] if mode == "lora" else ["--lora-rank", "0", "--attn", "full"])
    gb = {}
    for n in (1, 2):  # each run is stopped once it has said what it holds: its step and export are not needed here
        out = tmp_path / f"run{n}"
        common = ["--data", setup / "train.bin", "--out", out, "--dtype", "float32", "--device", "cpu", "--warmup", 2]
        with open(tmp_path / f"run{n}.out", "w") as log:
            proc = train_cli(*common, *flags, nproc=n, background=True, log=log)
        text, deadline = "", time.time() + 300
        while "after loading" not in text and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
            text = (tmp_path / f"run{n}.out").read_text()
        # torchrun's workers live in sessions of their own, and save a checkpoint when it dies: killed first
        if proc.poll() is None:
            workers = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split() if n > 1 else []
            for pid in [*map(int, workers), proc.pid]:
                os.kill(pid, signal.SIGKILL)
            proc.wait()
        assert "after loading" in text, text[-3000:]
        gb[n] = float(text.split(" GB host memory per process after loading")[0].rsplit(" ", 1)[1])
    saved = (gb[1] - gb[2]) * 2**30
    assert saved > 0.4 * full, (gb, full / 2**30)  # ideally half of `full`


def test_device_choice_errors(monkeypatch):
    """--device cuda with no GPU, or more processes on a node than GPUs: a clear error before any process
    group exists (so nothing hangs), naming the fix."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ValueError, match="sees no GPU.*use --device cpu"):
        parallel.setup_distributed("cuda")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(
        ValueError,
        match=r"2 processes on this node but 1 GPU\(s\) visible: run one process per GPU "
        r"\(torchrun --nproc-per-node 1;.*\), or --device cpu",
    ):
        parallel.setup_distributed("auto")
    assert not torch.distributed.is_initialized()


RANK_SCRIPT = """
import sys, torch.distributed as dist
sys.path.insert(0, {root!r})
import parallel
rank, world, device = parallel.setup_distributed("cpu")
assert parallel.decide(f"rank {{rank}}'s view") == "rank 0's view"
try:
    parallel.check_all(rank != 1, "rank 1 disagrees")
except ValueError as e:
    open(f"{out}/rank{{rank}}.txt", "w").write(str(e))  # a file each: two ranks' prints to one pipe interleave
dist.destroy_process_group()
"""


def test_rank_zero_decides_and_errors_reach_every_rank(tmp_path):
    (tmp_path / "ranks.py").write_text(RANK_SCRIPT.format(root=str(ROOT), out=str(tmp_path)))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(tmp_path / "ranks.py"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert [(tmp_path / f"rank{i}.txt").read_text() for i in (0, 1)] == ["rank 1 disagrees (processes 1)"] * 2


def test_non_finite_loss_stops_before_the_update(setup, tmp_path):
    """SGD at lr 1e30 blows the weights up after step 1: step 2's loss is not finite. The run stops there,
    names the step and the checkpoint to resume from, and writes no checkpoint, log line or export after."""
    out = tmp_path / "run"
    r = run_train(
        setup, out, "--steps", "4", "--optim", "sgd", "--lr", "1e30", "--warmup", "0", "--save-every", "1", check=False
    )
    assert (
        r.returncode == 2
        and "error: step 2: the loss is" in r.stderr
        and "--resume restarts from the checkpoint of step 1" in r.stderr
    ), r.stderr[-2000:]
    assert [p.name for p in (out / "checkpoints").glob("step-*")] == ["step-0000001"] and not (out / "merged").exists()
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1]


def padded_batch_and_alone(backend, group_size, dtype, device):
    """(per-sample losses, gradients) of three samples of different lengths right-padded into one batch,
    and the same of the samples run one by one (losses concatenated, gradients summed)."""
    m = tiny_model(dtype=dtype).to(device).set_attention(group_size, backend=backend)
    seqs = [torch.randint(0, 96, (n + 1,), generator=torch.Generator().manual_seed(n)) for n in (24, 13, 5)]
    samples = [(s[:-1], s[1:]) for s in seqs]

    def loss_and_grads(x, t):
        m.zero_grad()
        m.loss_chunk = 5
        per_token = m(x.to(device), t.to(device), reduction="none")  # (B, N)
        per_token.sum().backward()
        return per_token.sum(1).double(), {k: p.grad.double() for k, p in m.named_parameters()}

    batch = loss_and_grads(*data.collate(samples, pad_id=7))
    alone = [loss_and_grads(x[None], t[None]) for x, t in samples]
    return batch, (torch.cat([loss for loss, _ in alone]), {k: sum(grads[k] for _, grads in alone) for k in batch[1]})


@pytest.mark.parametrize("backend", ["naive", "sdpa"])
@pytest.mark.parametrize("group_size", [None, 8])
def test_right_padded_batch_equals_its_samples_alone(backend, group_size):
    """Samples of different lengths right-padded into one batch: each one's loss, and the gradients of
    the whole batch, are those of the samples run one by one (padding is never read by a real token). The
    model runs in float64 but RoPE and the loss's logits in float32, so they agree to float32 rounding;
    a sample reading padding or another sample would be off by far more."""
    (loss, grads), (loss_alone, grads_alone) = padded_batch_and_alone(backend, group_size, torch.float64, "cpu")
    torch.testing.assert_close(loss, loss_alone, rtol=1e-6, atol=0)
    for k, g in grads.items():
        torch.testing.assert_close(g, grads_alone[k], rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["sdpa", "flash"])
@pytest.mark.parametrize("group_size", [None, 8])
def test_right_padded_batch_equals_its_samples_alone_cuda(backend, group_size):
    """The same in bfloat16 on CUDA, through the kernels training uses: equal to bfloat16 rounding."""
    if backend not in s2attn.BACKENDS:
        pytest.skip("needs flash-attn or torch's varlen kernel")
    (loss, grads), (loss_alone, grads_alone) = padded_batch_and_alone(backend, group_size, torch.bfloat16, "cuda")
    torch.testing.assert_close(loss, loss_alone, rtol=2e-2, atol=0)
    for k, g in grads.items():
        assert (g - grads_alone[k]).norm() <= 3e-2 * grads_alone[k].norm(), k


def test_peak_table_tells_variants_apart():
    """torch.cuda.get_device_name strings: NVL and PCIe cards are not their SXM siblings, GB200 is not B200."""
    names = {
        "NVIDIA H100 80GB HBM3": 989.4,
        "NVIDIA H100 NVL": 835.5,
        "NVIDIA H100 PCIe": 756.0,
        "NVIDIA H800": 989.4,
        "NVIDIA H200": 989.4,
        "NVIDIA H200 NVL": 835.5,
        "NVIDIA GH200 480GB": 989.4,
        "NVIDIA B200": 2250.0,
        "NVIDIA GB200": 2500.0,
        "NVIDIA A100-SXM4-80GB": 312.0,
        "NVIDIA A800-SXM4-80GB": 312.0,
        "Tesla V100-SXM2-16GB": None,
    }
    assert {n: parallel.known_peak(n) for n in names} == names


# ----------------------------------------------------------------------------- exports for transformers and PEFT


def hf_logits(path, x, **kwargs):
    transformers = pytest.importorskip("transformers", reason="pip install transformers")
    with torch.no_grad():
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)(x).logits


def peft_logits(base, adapter, x):
    """Logits of PEFT's `adapter` on the Hugging Face model `base`, loaded with the adapter's base_config.json."""
    transformers = pytest.importorskip("transformers", reason="pip install transformers")
    peft = pytest.importorskip("peft", reason="pip install peft")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        base, dtype=torch.float32, **json.loads((adapter / "base_config.json").read_text())
    )
    with torch.no_grad():
        return peft.PeftModel.from_pretrained(hf, adapter)(x).logits


def test_hf_run_exports_what_transformers_peft_and_eval_open(setup, tmp_path):
    """An HF base gives an HF merged/ with the tokenizer beside it, and a PEFT adapter: transformers,
    PEFT and eval.py open them with no extra flag, and all compute the merged model's logits."""
    transformers = pytest.importorskip("transformers", reason="pip install transformers")
    pytest.importorskip(
        "google.protobuf", reason="AutoTokenizer reads a sentencepiece file with protobuf: pip install protobuf"
    )
    model.save(tiny_model(vocab_size=320, tie_embeddings=True), tmp_path / "base", format="hf")
    data.save_tokenizer(setup / "tok", tmp_path / "base")
    out = tmp_path / "run"
    run_train(
        setup,
        out,
        "--model",
        str(tmp_path / "base"),
        "--steps",
        "3",
        "--lr",
        "3e-2",
        "--warmup",
        "0",
        "--save-every",
        "0",
    )
    assert (out / "merged" / "config.json").exists() and (out / "merged" / "tokenizer_config.json").exists()
    x = torch.randint(0, 320, (2, 100), generator=torch.Generator().manual_seed(0))
    ours = model.load(out / "merged")(x).detach()
    base = model.load(tmp_path / "base")
    base.beyond_context = True  # 100 tokens, past its 64
    assert (ours - base(x)).abs().max() > 1e-2  # training changed the model
    torch.testing.assert_close(hf_logits(out / "merged", x), ours, rtol=0, atol=1e-4)
    torch.testing.assert_close(peft_logits(tmp_path / "base", out / "adapter", x), ours, rtol=0, atol=1e-4)
    text = synthetic_text(50, seed=9)
    assert transformers.AutoTokenizer.from_pretrained(out / "merged")(text).input_ids == data.load_tokenizer(
        setup / "tok"
    ).encode(text)
    r = subprocess.run(
        [
            sys.executable,
            "eval.py",
            "passkey",
            "--model",
            str(out / "merged"),
            "--lengths",
            "256",
            "--trials",
            "1",
            "--depths",
            "0",
            "--beyond-context",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert r.returncode == 0 and r.stdout.splitlines()[0].split() == ["length", "depth", "0%"], r.stderr[-2000:]


@pytest.mark.parametrize(
    "config,kw,flags",
    [
        ("LlamaConfig", {"head_dim": 24}, ()),
        ("MistralConfig", {"sliding_window": None, "num_key_value_heads": 1}, ()),
        ("Qwen2Config", {"tie_word_embeddings": True}, ()),
        ("Qwen3Config", {"head_dim": 24}, ()),
        ("Qwen3Config", {"head_dim": 24}, ("--rope-method", "yarn")),
    ],
    ids=["llama-head-dim", "mistral", "qwen2-tied", "qwen3", "qwen3-yarn"],
)
def test_each_architecture_trains_and_exports_as_itself(setup, tmp_path, config, kw, flags):
    """A 2-step LongLoRA run (S2, LoRA+, RoPE x2) from a transformers base of each architecture: merged/ opens
    in transformers as the base's class with model.load's logits, adapter/ in PEFT on the base with merged/'s;
    merged/ keeps the base's BOS, EOS and padding ids and its generation_config.json, so generate() stops
    where the base's does (Qwen's and Mistral's transformers defaults have no EOS: None never stops)."""
    transformers = pytest.importorskip("transformers", reason="pip install transformers")
    ids = dict(bos_token_id=None if config.startswith("Qwen") else 4, eos_token_id=[5, 7], pad_token_id=3)
    base = hf_model(config, vocab_size=320, **{"num_key_value_heads": 2, **ids, **kw})
    base.save_pretrained(tmp_path / "base")
    generation = {**ids, "do_sample": True, "temperature": 0.6, "top_p": 0.9}
    (tmp_path / "base" / "generation_config.json").write_text(json.dumps(generation))
    out = tmp_path / "run"
    run_train(setup, out, "--model", str(tmp_path / "base"), *"--steps 2 --lr 3e-2 --save-every 0".split(), *flags)
    cfg = json.loads((out / "merged" / "config.json").read_text())
    assert cfg["architectures"] == [type(base).__name__] and cfg["max_position_embeddings"] == 128
    assert cfg["rope_parameters"]["rope_type"] == ("yarn" if flags else "linear")
    merged = transformers.AutoModelForCausalLM.from_pretrained(out / "merged")
    assert type(merged) is type(base)
    assert {k: cfg.get(k) for k in ids} == ids
    assert json.loads((out / "merged" / "generation_config.json").read_text()) == generation
    assert (merged.generation_config.eos_token_id, merged.generation_config.temperature) == ([5, 7], 0.6)
    x = torch.randint(0, 320, (2, 100), generator=torch.Generator().manual_seed(0))
    ours = model.load(out / "merged")(x).detach()
    start = model.load(tmp_path / "base").extend_context(2, method="yarn" if flags else "pi")(x).detach()
    assert (ours - start).abs().max() > 1e-2  # training changed the model
    torch.testing.assert_close(hf_logits(out / "merged", x), ours, rtol=0, atol=1e-4)
    torch.testing.assert_close(peft_logits(tmp_path / "base", out / "adapter", x), ours, rtol=0, atol=1e-4)


def test_meta_run_exports_meta_with_the_data_tokenizer(setup, tmp_path):
    """A Meta base gives a Meta merged/, or HF with --export-format hf; the tokenizer is the one the token
    file was made with when the model folder has none, and its BOS and EOS ids are the HF config's."""
    out = tmp_path / "run"
    run_train(setup, out, "--steps", "1", "--save-every", "0", "--export-format", "hf")
    assert sorted(p.name for p in (out / "merged").iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    tok, cfg = data.load_tokenizer(setup / "tok"), json.loads((out / "merged" / "config.json").read_text())
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id}  # a Meta base has none: the tokenizer's
    assert {k: cfg[k] for k in ids} == ids == json.loads((out / "merged" / "generation_config.json").read_text())
    assert data.load_tokenizer(out / "merged").encode("the a of") == data.load_tokenizer(setup / "tok").encode(
        "the a of"
    )


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize(
    "targets,extra",
    [(("wq", "wk", "wv", "wo"), ("embed", "norm")), (("wq", "w1", "w2", "w3"), ("norm",)), (("wk", "wo"), ())],
)
def test_peft_adapter_equals_the_merged_model(tmp_path, tied, targets, extra):
    """save_peft on random adapters, embedding and norms, GQA, with and without tied embeddings and a
    context extension: PEFT on the HF base computes what merge_lora computes."""
    base = tiny_model(tie_embeddings=tied)
    model.save(base, tmp_path / "base", format="hf")
    m = lora.add_lora(model.load(tmp_path / "base"), rank=4, alpha=8, targets=targets)
    lora.set_trainable(m, extra=extra)
    m.args.rope_interpolation, m.args.max_seq_len = 2.0, 128
    torch.manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    state = {k: p.detach() for k, p in m.named_parameters() if p.requires_grad}
    assert hf.save_peft(m.args, lora.lora_config(m), state, tmp_path / "adapter")
    x = torch.randint(0, m.args.vocab_size, (2, 100), generator=torch.Generator().manual_seed(0))
    merged = lora.merge_lora(m)(x).detach()
    torch.testing.assert_close(peft_logits(tmp_path / "base", tmp_path / "adapter", x), merged, rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------- a user's mistakes, a cluster's faults


def train_cli(*args, nproc=1, background=False, log=None):
    """train.py with exactly `args` (one process, or `nproc` under torchrun); background: a Popen whose
    output goes to the file `log`."""
    launcher = [sys.executable] + (
        ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] * (nproc > 1)
    )
    cmd = launcher + [str(ROOT / "train.py"), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if background:
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)


def run_until(setup, out, steps, *flags, nproc=1):
    """A long run in the background, returned once its log holds `steps` steps: (process, its output file)."""
    log = open(out.parent / f"{out.name}.out", "w")
    common = ["--model", setup / "base", "--data", setup / "train.bin", "--out", out, "--steps", 100000]
    common += "--seq-len 128 --dtype float32 --warmup 2 --lr 3e-3 --grad-accum 2 --save-every 0 --device cpu".split()
    proc = train_cli(*common, *flags, nproc=nproc, background=True, log=log)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and len(logged_steps(out)) < steps:
        time.sleep(0.05)
    assert proc.poll() is None, (out.parent / f"{out.name}.out").read_text()[-3000:]
    return proc, out.parent / f"{out.name}.out"


def logged_steps(out):
    path = out / "log.jsonl"
    return (
        [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]
        if path.exists()
        else []
    )


def test_a_run_owns_its_folder_and_workers_stop_when_their_launcher_dies(setup, tmp_path):
    """A second run on a folder in use, fresh or --resume, is refused at once naming the process; torchrun
    killed with -9 leaves its workers in sessions of their own: they save a checkpoint and stop."""
    out = tmp_path / "run"
    proc, output = run_until(setup, out, 2, nproc=2)
    workers = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    for flags in ([], ["--resume"]):
        r = run_train(setup, out, "--steps", "3", *flags, check=False)
        assert r.returncode == 2 and "is in use by process" in r.stderr and "train.py" in r.stderr, r.stderr[-2000:]
    proc.kill()
    proc.wait()
    deadline = time.time() + 120
    while time.time() < deadline and any(Path(f"/proc/{w}").exists() for w in workers):
        time.sleep(0.1)
    n = logged_steps(out)[-1]
    assert not any(Path(f"/proc/{w}").exists() for w in workers), "the workers trained on without their launcher"
    assert f"stopped at step {n} (its launcher is gone): --resume continues from step {n}" in output.read_text()
    assert logged_steps(out) == list(range(1, n + 1)) and (out / "checkpoints" / f"step-{n:07d}").is_dir()
    run_train(setup, out, "--steps", str(n + 1), "--save-every", "0", "--resume", nproc=2)  # the folder is free again
    assert logged_steps(out) == list(range(1, n + 2))


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_saves_the_step_and_resume_gives_the_uninterrupted_losses(setup, tmp_path, nproc):
    out = tmp_path / "run"
    proc, output = run_until(setup, out, 3, nproc=nproc)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    n, text = logged_steps(out)[-1], output.read_text()
    assert f"stopped at step {n} (SIGTERM): --resume continues from step {n}" in text, text[-3000:]
    assert (out / "checkpoints" / f"step-{n:07d}").is_dir() and not (out / "merged").exists()
    assert f'{ROOT / "train.py"}", line' not in text  # no traceback through our code (torchrun prints its own)
    assert nproc > 1 or proc.returncode == 128 + signal.SIGTERM
    flags = ["--steps", str(n + 2), "--save-every", "0"]
    run_train(setup, out, *flags, "--resume", nproc=nproc)
    run_train(setup, tmp_path / "whole", *flags, nproc=nproc)
    assert losses(out) == pytest.approx(losses(tmp_path / "whole"), rel=1e-6)


def test_damaged_files_are_named_in_one_line(setup, tmp_path):
    """A truncated model.safetensors (train.py and eval.py) and a token file of an odd size: one line that
    names the file and says what to do, exit 2, no traceback (a damaged DCP checkpoint: the bad-input test)."""
    model.save(tiny_model(vocab_size=320), tmp_path / "base", format="hf")
    weights = tmp_path / "base" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    odd = tmp_path / "odd.bin"
    odd.write_bytes((setup / "train.bin").read_bytes() + b"\0")
    shutil.copy(setup / "train.json", tmp_path / "odd.json")
    evaluate = [sys.executable, str(ROOT / "eval.py"), "ppl", "--model", str(tmp_path / "base")]
    evaluate += ["--data", str(setup / "train.bin"), "--seq-len", "32"]
    runs = [
        (f"cannot read {weights}", run_train(setup, tmp_path / "a", "--model", str(tmp_path / "base"), check=False)),
        (f"cannot read {weights}", subprocess.run(evaluate, capture_output=True, text=True, timeout=300)),
        (f"{odd} is ", run_train(setup, tmp_path / "b", "--data", str(odd), check=False)),
    ]
    for expect, r in runs:
        assert r.returncode != 0 and expect in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert "download or save it again" in r.stderr or "not a whole number of uint16 tokens" in r.stderr


def test_data_is_checked_before_the_model_loads(setup, tmp_path):
    """The 13th of 20 SFT examples lacks its output: refused before any step, naming the file and the
    example. A token file made with another tokenizer of the same size: refused, naming both; an explicit
    --tokenizer decides."""
    examples = [{"instruction": "Say it.", "output": synthetic_text(20, seed=i)} for i in range(20)]
    del examples[12]["output"]
    (tmp_path / "sft.json").write_text(json.dumps(examples))
    out = tmp_path / "sft"
    flags = ["--model", setup / "base", "--tokenizer", setup / "tok", "--out", out, "--seq-len", 64, "--device", "cpu"]
    r = train_cli(*flags, "--sft", tmp_path / "sft.json", "--dtype", "float32")
    assert r.returncode == 2 and f"{tmp_path / 'sft.json'}, example 13: an SFT example needs" in r.stderr, r.stderr
    assert not (out / "log.jsonl").exists()
    other = data.train_tokenizer(sorted((setup / "texts").glob("*.txt"))[::-1], vocab_size=320, out=tmp_path / "tok2")
    data.tokenize(other, tmp_path / "other.bin", [setup / "texts"])
    model.save(tiny_model(vocab_size=320), tmp_path / "base")
    data.save_tokenizer(setup / "tok", tmp_path / "base")  # the model's own tokenizer, beside it
    r = run_train(
        setup, tmp_path / "a", "--model", str(tmp_path / "base"), "--data", str(tmp_path / "other.bin"), check=False
    )
    assert (
        r.returncode == 2
        and "it was tokenized with another tokenizer" in r.stderr
        and str(tmp_path / "base") in r.stderr
    )
    run_train(
        setup,
        tmp_path / "b",
        "--model",
        str(tmp_path / "base"),
        "--data",
        str(tmp_path / "other.bin"),
        "--tokenizer",
        str(other),
        "--steps",
        "1",
    )


def test_outputs_follow_the_umask_and_save_every_0_can_be_extended(setup, tmp_path):
    out, old = tmp_path / "run", os.umask(0o022)
    try:
        run_train(setup, out, "--steps", "2", "--save-every", "0")
    finally:
        os.umask(old)
    assert (out / "checkpoints" / "step-0000002").is_dir()  # the last step's checkpoint, with --save-every 0
    unreadable = [p for p in out.rglob("*") if p.is_file() and p.stat().st_mode & 0o044 != 0o044]
    assert not unreadable
    run_train(setup, out, "--steps", "3", "--resume")
    assert logged_steps(out) == [1, 2, 3]


# ----------------------------------------------------------------------------- mixed precision under FSDP2

PRECISION_SCRIPT = """
import copy, sys, torch
sys.path[:0] = [{root!r}, {tests!r}]
import parallel
from common import tiny_model, tokens
parallel.setup_distributed("cpu")
m = tiny_model(max_seq_len=256)  # float32 weights, gathered in bf16 by FSDP2
plain = copy.deepcopy(m).to(torch.bfloat16)  # the same bf16 weights, no FSDP2
parallel.parallelize(m, device=torch.device("cpu"), world=1, dtype="bfloat16", checkpointing=False)
x = tokens(n=2, N=256)
with torch.no_grad():
    a, b = plain(x).float(), m(x).float()
print("relative", ((a - b).abs().max() / a.abs().max()).item())
"""


def test_fsdp_blocks_rotate_with_float32_rope(tmp_path):
    """FSDP2 casts a sharded module's floating-point inputs to its param_dtype unless told not to
    (MixedPrecisionPolicy.cast_forward_inputs, torch 2.11 _fsdp_state.py:258-266), and RoPE's cos and sin
    reach each block as an input: in bf16 they would rotate q and k differently from eval.py, which runs
    without FSDP2. A bf16 model under parallel.parallelize gives the logits of the same bf16 model alone."""
    script = tmp_path / "precision.py"
    script.write_text(PRECISION_SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests")))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split()[-2:] == ["relative", "0.0"], r.stdout


@pytest.mark.parametrize("layout", ["longalpaca", "messages"])
def test_sft_trains_in_the_bases_chat_template(tmp_path, layout):
    """--sft on a Qwen3-style HF base whose tokenizer has a chat template (ChatML), in both layouts: the run
    says which format it trains in, and merged/ carries the template, so transformers writes a conversation
    on merged/ as training did."""
    transformers = pytest.importorskip("transformers", reason="pip install transformers")
    from test_data import CONVERSATION, TEXTS, chat_tokenizer_folder

    base = tmp_path / "base"
    hf_model("Qwen3Config", vocab_size=320, num_key_value_heads=2, head_dim=24).save_pretrained(base)
    chat_tokenizer_folder(base, "chatml")
    if layout == "messages":
        examples = [{"messages": CONVERSATION[: 2 + 2 * (i % 2)]} for i in range(6)]
    else:
        examples = [
            {"instruction": TEXTS[i % 3], "input": TEXTS[(i + 1) % 3], "output": TEXTS[(i + 2) % 3]} for i in range(6)
        ]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(ex) + "\n" for ex in examples))
    out = tmp_path / "run"
    flags = "--seq-len 128 --steps 2 --warmup 1 --grad-accum 1 --dtype float32 --save-every 0 --device cpu".split()
    r = train_cli("--model", base, "--sft", tmp_path / "sft.jsonl", "--out", out, *flags)
    assert (out / "merged").exists(), r.stderr[-3000:]
    assert "SFT examples in the 'template' chat format (the tokenizer's chat template)" in r.stdout
    ours, theirs = data.load_tokenizer(out / "merged"), transformers.AutoTokenizer.from_pretrained(out / "merged")
    assert ours.chat_format == "template"
    assert theirs.apply_chat_template(CONVERSATION, tokenize=True)["input_ids"] == data.chat_ids(ours, CONVERSATION)[0]
    (tmp_path / "doc.txt").write_text(TEXTS[0] * 3)
    ask = [
        "ask",
        "--model",
        out / "merged",
        "--file",
        tmp_path / "doc.txt",
        "--question",
        "Why?",
        "--max-new-tokens",
        8,
    ]
    r = subprocess.run([sys.executable, ROOT / "eval.py", *map(str, ask)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "tokens/s" in r.stderr, r.stderr[-2000:]  # merged/ answers in its template


def test_sft_export_carries_the_format_it_trained_in(setup, tmp_path):
    """A Meta base without a chat template trains --sft in Llama 2's [INST] turns; its HF merged/ carries that
    format as a template, which transformers renders as the text of those turns."""
    transformers = pytest.importorskip("transformers", reason="pip install transformers")
    pytest.importorskip(
        "google.protobuf", reason="AutoTokenizer reads a sentencepiece file with protobuf: pip install protobuf"
    )
    examples = [{"instruction": "Say it.", "output": synthetic_text(20, seed=i)} for i in range(4)]
    (tmp_path / "sft.json").write_text(json.dumps(examples))
    out = tmp_path / "run"
    flags = (
        "--seq-len 128 --steps 1 --grad-accum 1 --dtype float32 --save-every 0 --device cpu --export-format hf".split()
    )
    r = train_cli(
        "--model", setup / "base", "--tokenizer", setup / "tok", "--sft", tmp_path / "sft.json", "--out", out, *flags
    )
    assert (out / "merged").exists(), r.stderr[-3000:]
    assert "SFT examples in the 'inst' chat format" in r.stdout
    assert (
        json.loads((out / "merged" / "tokenizer_config.json").read_text())["chat_template"]
        == data.CHAT_TEMPLATES["inst"]
    )
    messages = [{"role": "user", "content": "Say it."}, {"role": "assistant", "content": "It."}]
    text = transformers.AutoTokenizer.from_pretrained(out / "merged").apply_chat_template(messages, tokenize=False)
    assert text == "<s>[INST] Say it. [/INST] It.</s>"


def test_dtype_defaults_to_the_devices(monkeypatch):
    """--dtype left out: float32 on a CPU, as eval.py's (bf16 matmuls are slow there), bf16 on CUDA."""
    flags = ["--model", "m", "--data", "d.bin", "--out", "o"]
    assert train.parse_args(flags + ["--device", "cpu"]).dtype == "float32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert train.parse_args(flags).dtype == "bfloat16"
    assert train.parse_args(flags + ["--dtype", "float32"]).dtype == "float32"


def test_a_bases_null_eos_takes_the_tokenizers(tmp_path):
    """A base config.json saying "eos_token_id": null would leave generate() without an end: the tokenizer's
    EOS fills it; a null BOS (Qwen's) stays null."""
    (tmp_path / "base").mkdir()
    (tmp_path / "merged").mkdir()
    (tmp_path / "base" / "config.json").write_text(json.dumps({"bos_token_id": None, "eos_token_id": None}))
    (tmp_path / "merged" / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    hf.carry_generation_config(tmp_path / "base", tmp_path / "merged", bos_id=1, eos_id=2)
    ids = {"bos_token_id": None, "eos_token_id": 2}
    assert json.loads((tmp_path / "merged" / "config.json").read_text()) == {"model_type": "qwen3", **ids}
    assert json.loads((tmp_path / "merged" / "generation_config.json").read_text()) == ids


def test_a_second_signal_says_what_was_saved(monkeypatch, capfd):
    """A second SIGINT or SIGTERM (2 s after the first) stops the process at once, saying what --resume can
    continue from: the last checkpoint's step, or that none was written, so start again without --resume."""
    exits, clock = [], iter([0.0, 3.0, 10.0, 13.0])
    monkeypatch.setattr(os, "_exit", exits.append)
    monkeypatch.setattr(time, "monotonic", lambda: next(clock))
    for saved in (None, 20):
        stop = parallel.Stop(signals=False)
        stop.saved = saved
        stop._handle(signal.SIGINT, None)
        stop._handle(signal.SIGINT, None)
    err = capfd.readouterr().err
    assert "SIGINT again: stopping at once; no checkpoint was written: start the run again, without --resume" in err
    assert "SIGINT again: stopping at once; --resume continues from the checkpoint of step 20" in err
    assert exits == [128 + signal.SIGINT] * 2


def test_a_runs_log_plots(setup, tmp_path):
    """eval.py log draws a run's log.jsonl (loss, learning rate, tokens/s) into a PNG, or says to install
    matplotlib; a folder without a log is one line naming what to give."""
    out = tmp_path / "run"
    run_train(setup, out, "--steps", "3", "--save-every", "0")
    cmd = [sys.executable, str(ROOT / "eval.py"), "log", str(out), "--plot", str(tmp_path / "run.png")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if importlib.util.find_spec("matplotlib") is None:
        assert r.returncode == 2 and "pip install matplotlib" in r.stderr
    else:
        assert r.returncode == 0 and (tmp_path / "run.png").stat().st_size > 10_000, r.stderr[-2000:]
    r = subprocess.run(cmd[:3] + [str(tmp_path), "--plot", "x.png"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "give a run folder (train.py --out) or its log.jsonl" in r.stderr


def test_held_out_loss_is_the_same_for_one_and_two_processes(setup, tmp_path):
    """--eval-every: a held-out loss with S2-Attn (training's) and with full attention, logged every K steps
    and at the last, with its time; the same for 1 process x 2 rows and 2 processes x 1 row (within float32
    rounding), the held-out windows split off the training file; with full attention in training, one loss."""
    flags = ["--steps", "3", "--eval-every", "2", "--eval-split", "0.2", "--eval-windows", "5", "--save-every", "0"]
    run_train(setup, tmp_path / "one", *flags, "--batch-size", "2", "--optim", "sgd", "--lr", "0.5")
    run_train(setup, tmp_path / "two", *flags, "--batch-size", "1", "--optim", "sgd", "--lr", "0.5", nproc=2)
    logs = [
        [json.loads(line) for line in (tmp_path / r / "log.jsonl").read_text().splitlines()] for r in ("one", "two")
    ]
    held = [[(x["step"], x["eval_loss"], x["eval_full_loss"]) for x in log if "eval_loss" in x] for log in logs]
    assert [s for s, *_ in held[0]] == [2, 3] and all(0 < a < 10 and 0 < b < 10 and a != b for _, a, b in held[0])
    torch.testing.assert_close(held[1], held[0], rtol=1e-5, atol=1e-5)
    assert all(x["eval_s"] > 0 for x in logs[0] if "eval_loss" in x)
    run_train(setup, tmp_path / "full", *flags, "--attn", "full")
    log = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert [("eval_loss" in x, "eval_full_loss" in x) for x in log] == [(False, False), (True, False), (True, False)]
