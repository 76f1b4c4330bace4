"""bench.py runs end to end on a CPU and prints complete tables (the figures themselves are not judged:
timings belong in BENCHMARKS.md, not in tests)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from test_s2attn import use_stand_in_flash

import bench
import s2attn

ROOT = Path(__file__).resolve().parent.parent


def test_attention_flops_count_the_causal_half():
    assert bench.attn_flops(1024, 1024, 1, 64) == 3 * 4 * (1024 * 1024 / 2) * 64
    assert bench.attn_flops(1024, 256, 8, 64) == bench.attn_flops(1024, 1024, 8, 64) / 4
    assert bench.attn_flops(1000, 256, 1, 64) == 3 * 4 * ((3 * 256 * 256 + 232 * 232) / 2) * 64


def table(text, heading):
    """The rows of the table under the `### heading...` line of bench.py's output, as lists of cells."""
    section = text.split(f"### {heading}", 1)[1].split("\n### ", 1)[0]
    rows = [line.split("|")[1:-1] for line in section.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in row] for row in rows[1:]]  # without the header


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
            "--rounds",
            "1",
            "--quantize",
            "nf4",
            "--sdpa-kernels",
            "flash,cudnn",
            "--length",
            "128",
            "--examples",
            "6",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    attn = table(r.stdout, "Attention kernels")
    assert [row[0] for row in attn] == ["sdpa", "sdpa (flash forced)", "sdpa (cudnn forced)"]
    # what ran, full / S2: the CPU's fused kernel, also when forced to flash; cuDNN is CUDA-only
    assert attn[0][1] == attn[1][1] == "flash-cpu / flash-cpu" and attn[2][1].startswith("not available")
    assert float(attn[0][4]) > 0 and attn[0][6].endswith("x")
    steps = table(r.stdout, "One LoRA+ training step")
    with_peft = importlib.util.find_spec("peft") is not None and importlib.util.find_spec("transformers") is not None
    ours = [(f"ours (sdpa{q})", attn) for q in ("", ", nf4") for attn in ("full", "s2")]
    assert [(row[1], row[2]) for row in steps] == ours + ([("transformers + PEFT (sdpa)", "full")] if with_peft else [])
    # ms, peak GB; no MFU on CPU
    assert all(float(row[3]) > 0 and float(row[7]) > 0 and row[6] == "n/a" for row in steps)
    assert steps[1][8].endswith("x") and steps[3][8].endswith("x")  # the S2 speed-up, against its own full row
    assert "`fit` needs a CUDA GPU" in r.stdout
    pack = table(r.stdout, "Packed sequences")
    assert [row[0] for row in pack] == ["one example per step", "padded batches of 4", "--pack"]
    assert pack[0][3] == pack[2][3] == "0.0%" and float(pack[1][3].rstrip("%")) > 0  # padding: only the batches
    assert int(pack[0][1]) == 6 and int(pack[2][1]) < 6 and pack[2][5] == "1.00x"  # fewer, fuller rows


def test_step_rounds_interleave_and_rows_are_medians(monkeypatch, capsys):
    """bench.py step without running a step (run_one replaced): each round runs every configuration once,
    in the same order (ours, ..., theirs), so drift moves them alike; a row's ms is the median of its
    rounds; --compile adds our compiled rows and prints their first step (the compilation) once."""
    calls, results = [], []

    def fake(cfg):
        calls.append(cfg)
        rnd = (len(calls) - 1) // n_cfgs  # round 1 is slow, round 2 fast: the median is round 3's
        ms = {0: 30.0, 1: 10.0, 2: 14.0}[rnd]  # mean 18
        compiled = ", compiled" if cfg.get("compile") else ""
        impl = f"ours (sdpa{compiled})" if cfg["impl"] == "ours" else "transformers + PEFT (sdpa)"
        figures = dict(tokens_per_s=1e3 / ms, tflops=1e-3, mfu=None, peak_gb=len(calls) / 10, first_s=7.0)
        results.append({**cfg, "impl": impl, "ms": ms, **figures})
        return results[-1]

    with_peft = importlib.util.find_spec("peft") is not None and importlib.util.find_spec("transformers") is not None
    n_cfgs = 4 + with_peft
    monkeypatch.setattr(bench, "run_one", fake)
    bench.main(["step", "--device", "cpu", "--step-lengths", "128", "--rounds", "3", "--compile"])
    out = capsys.readouterr().out
    kinds = [(c["impl"], c["attn"], c.get("compile", False)) for c in calls]
    first = [("ours", "full", False), ("ours", "s2", False), ("ours", "full", True), ("ours", "s2", True)]
    assert kinds == (first + [("hf", "full", False)] * with_peft) * 3
    rows = table(out, "One LoRA+ training step")
    ours = [(f"ours (sdpa{c})", a) for c in ("", ", compiled") for a in ("full", "s2")]
    assert [(r[1], r[2]) for r in rows][:4] == ours
    assert all(r[3] == "14" for r in rows)  # the median round's ms
    assert all(float(r[7]) == max(c["peak_gb"] for c in results[i::n_cfgs]) for i, r in enumerate(rows))  # the highest
    assert out.count("the compiled rows' first step (compilation included, not in ms / step): full 7 s, s2 7 s") == 1


def test_attention_kernels_names_what_ran():
    import torch

    q = torch.randn(1, 64, 4, 16)
    assert bench.attention_kernels(lambda: s2attn.full_attention(q, q, q, backend="sdpa")) == ["flash-cpu"]
    with bench.forced("math"):
        assert bench.attention_kernels(lambda: s2attn.s2_attention(q, q, q, 16, backend="sdpa")) == ["math"]
    assert bench.attention_kernels(lambda: s2attn.full_attention(q, q, q, backend="naive")) == []


def saved_bytes_of_one_block(shape, N, dtype, halo=False, backend="sdpa"):
    """What autograd keeps for backward in one LoRA+ S2 block (groups of N/4) at N tokens, in bytes: every
    saved tensor's storage once, leaving out the weights (FSDP2's gathered copies, counted apart), the
    RoPE table (one for all blocks) and integer tensors (cu_seqlens and RNG states: bytes per call, not
    per token)."""
    import torch

    import lora
    import model
    import parallel

    a = model.ModelArgs(**shape, n_layers=1, vocab_size=64, max_seq_len=N)
    m = model.Transformer(a)
    lora.add_lora(m, 8, 16)
    lora.set_trainable(m, extra=("embed", "norm"))
    m.to(dtype)  # FSDP2 computes in its param_dtype
    last = {}

    def fake_halo(tail):  # a slice that is not the first: the "previous" tail is this one's
        return last.setdefault("tail", tail.detach().clone().requires_grad_())

    m.set_attention(group_size=N // 4, backend=backend)
    if halo:
        parallel.split_sequences(m, fake_halo)
    x = torch.randn(1, N, a.dim, dtype=dtype, requires_grad=True)
    freqs = torch.view_as_real(model.precompute_freqs_cis(a, N))  # what the blocks take
    skip = {p.untyped_storage().data_ptr() for p in m.parameters()} | {freqs.untyped_storage().data_ptr()}
    seen = {}

    def pack(t):
        if t.is_floating_point():
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m.layers[0](x, freqs)
    skip |= {last["tail"].untyped_storage().data_ptr()} if halo else set()  # received: in the "halo" part
    return sum(b for ptr, b in seen.items() if ptr not in skip), a


SHAPES = [dict(dim=256, n_heads=4, hidden_dim=704), dict(dim=256, n_heads=4, n_kv_heads=2, hidden_dim=704)]
SHAPES += [dict(dim=192, n_heads=3, n_kv_heads=1, hidden_dim=512), dict(dim=512, n_heads=8, hidden_dim=1376)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("halo", [False, True])
def test_memory_model_counts_what_a_block_keeps(shape, dtype, halo):
    """The memory model's largest term, one block's recompute, equals what autograd saves (sdpa, CPU)."""
    import torch

    N = 512
    measured, a = saved_bytes_of_one_block(shape, N, getattr(torch, dtype), halo)
    e = torch.finfo(getattr(torch, dtype)).bits // 8
    assert measured == pytest.approx(N * bench.block_bytes_per_token(a, N, N // 4, e, "sdpa", halo), rel=1e-9)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kernel", ["flash_attn", "varlen_213", "varlen_211"])
@pytest.mark.parametrize("halo", [False, True])
def test_memory_model_counts_what_the_flash_path_keeps(monkeypatch, shape, kernel, halo):
    """The same for the flash backend, through stand-ins that keep what the real kernels keep: with torch
    2.11's varlen kernel (no GQA) each half keeps its own k and v repeated per query head."""
    import torch

    use_stand_in_flash(monkeypatch, kernel)
    N = 512
    measured, a = saved_bytes_of_one_block(shape, N, torch.bfloat16, halo, backend="flash")
    assert measured == pytest.approx(N * bench.block_bytes_per_token(a, N, N // 4, 2, "flash", halo), rel=1e-9)


def test_memory_command_and_its_limits(capsys):
    """`bench.py memory` prints every part and a longest context; offload moves the block inputs to the host
    and lengthens it; a context-parallel split that cuts S2 groups is refused."""
    bench.main(["memory", "--shape", "7b", "--dtype", "bfloat16", "--seq-len", "100000"])
    plain = capsys.readouterr().out
    bench.main(["memory", "--shape", "7b", "--dtype", "bfloat16", "--seq-len", "100000", "--offload"])
    offloaded = capsys.readouterr().out
    bench.main(["memory", "--shape", "7b", "--dtype", "bfloat16", "--seq-len", "100000", "--quantize", "nf4"])
    quantized = capsys.readouterr().out
    assert "one dequantized weight" in quantized and "one dequantized weight" not in plain
    for part in ("weights (shards)", "block inputs", "one block's recompute", "loss", "device total"):
        assert part in plain and part in offloaded

    def longest(text):
        return int(text.split("per GPU: ")[1].split(" tokens")[0].replace(",", ""))

    assert longest(offloaded) > longest(plain) > 0 and longest(quantized) > longest(plain)
    a = bench.shape(bench.argparse.Namespace(shape="7b"), 100_000)
    parts = bench.memory_model(a, 100_000, offload=True)
    assert parts["block inputs"] == 0 and parts["host"] == 32 * 100_000 * 4096 * 2
    with pytest.raises(ValueError, match="P must divide 4"):
        bench.memory_model(a, 100_000, world=8, P=8)
    with pytest.raises(SystemExit):  # the command line says so in one line, with no traceback
        bench.main(["memory", "--world", "8", "--context-parallel", "8"])
    assert "P must divide 4" in capsys.readouterr().err
