"""--compile: each block through torch.compile (parallel.parallelize), under FSDP2 and activation checkpointing
as train.py runs it. Compiling takes tens of seconds on the CPU, so the compiled paths are checked by few tests,
each marked `compile` (`-m "not compile"` leaves them out): these (the eager model's loss and gradients, and what
recompiles), and in test_train the exact resume and context parallelism with offload."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.compile

COMPARE = """
import json, torch, model, parallel, train
from torch._dynamo.utils import counters

parallel.setup_distributed(DEVICE)
dev = torch.device(DEVICE)
a = model.ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=32, max_seq_len=128)
base = parallel.random_weights(a, 1, dev)
out = {}
for attn, backend in [(attn, b) for b in BACKENDS for attn in ("s2", "full")]:
    runs = []
    for compile in (False, True):
        cfg = train.LongLoRA(seq_len=128, attn=attn)
        m = train.build_model(base, cfg, 0, 1, dev, backend=backend, dtype=DTYPE, compile=compile)
        for n, p in m.named_parameters():  # LoRA's B starts at zero: moved, so that every gradient is not zero
            if "lora_b" in n:
                with torch.no_grad():
                    p.to_local().copy_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
        losses = []
        for N in (128, 64, 96):  # gradients summed over three lengths
            x = torch.randint(0, 96, (1, N + 1), generator=torch.Generator().manual_seed(N)).to(dev)
            loss = m(x[:, :-1], x[:, 1:])
            loss.backward()
            losses.append(loss.item())
        runs.append((losses, {n: p.grad.full_tensor() for n, p in m.named_parameters() if p.requires_grad}))
    (le, ge), (lc, gc) = runs
    out[f"{attn} {backend}"] = dict(
        loss=max(abs(x - y) / abs(x) for x, y in zip(le, lc)),
        grad=max(((ge[n] - gc[n]).float().norm() / ge[n].float().norm()).item() for n in ge),
        names=sorted(ge),
        zero=[n for n in ge if ge[n].float().norm() == 0],
    )
out["graphs"] = counters["stats"]["unique_graphs"]
print(json.dumps(out))
"""


def compare(device, dtype, backends):
    code = f"DEVICE, DTYPE, BACKENDS = {device!r}, {dtype!r}, {backends!r}\n" + COMPARE
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.splitlines()[-1])
    for key, o in out.items():
        if key != "graphs":
            assert "tok_embeddings.weight" in o["names"] and any("lora_a" in n for n in o["names"]), o["names"]
            assert not o["zero"], (key, o["zero"])
    return out


def test_compiled_blocks_give_the_eager_loss_and_gradients():
    """LoRA+ (adapters, embedding, norms) on a GQA model in float32, S2-Attn and full attention, at three lengths:
    the compiled model's losses and gradients are the eager model's to float32 rounding (inductor fuses and
    reorders sums: relative 1e-6 on the losses, 1e-5 on each gradient's norm of the difference). The first
    length compiles the block, the second recompiles it with a dynamic length, the third reuses that; full
    attention then needs one graph more (3 in all, where compiling for every length would make 6)."""
    out = compare("cpu", "float32", ["sdpa"])
    for key in ("s2 sdpa", "full sdpa"):
        assert out[key]["loss"] <= 1e-6 and out[key]["grad"] <= 1e-5, (key, out[key])
    assert out["graphs"] == 3, out["graphs"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA: inductor's triton kernels and the flash backend")
def test_compiled_blocks_on_cuda_in_bfloat16():
    """The same on CUDA in bf16, train.py's default there, for both backends (flash: flash-attn's or torch's
    own varlen kernel). bf16 rounds each op to 8 bits of mantissa, and inductor keeps fused intermediates in
    float32: relative 2e-2 on the losses, 1e-1 on each gradient (a wrong kernel is off by far more)."""
    import model

    backends = ["sdpa"] + ["flash"] * ("flash" in model.BACKENDS)
    out = compare("cuda", "bfloat16", backends)
    for key, o in out.items():
        if key != "graphs":
            assert o["loss"] <= 2e-2 and o["grad"] <= 1e-1, (key, o)
