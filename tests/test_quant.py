"""quant.py: NF4 against bitsandbytes (when installed) and against its own dequantized copy; QLoRA runs."""

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import peft_logits, run_train, setup  # noqa: F401  (the toy run folder fixture)

import bench
import lora
import model
import quant
import train
from common import tiny_model

ROOT = Path(__file__).resolve().parent.parent

needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="pip install bitsandbytes")


def test_code_book_is_the_normal_quantiles():
    """NF4_CODE is QLoRA's construction: 8 positive and 7 negative quantiles of N(0, 1) (offset 0.9677083),
    zero, scaled into [-1, 1] (the published constants round the float32 quantiles within one ulp)."""
    p = torch.linspace(0.9677083, 0.5, 9)[:-1].double()
    n = torch.linspace(0.9677083, 0.5, 8)[:-1].double()
    v = torch.cat([torch.special.ndtri(p), torch.zeros(1, dtype=torch.float64), -torch.special.ndtri(n)]).sort().values
    torch.testing.assert_close(quant.NF4_CODE, (v / v.abs().max()).float(), rtol=0, atol=1.2e-7)
    assert quant.NF4_CODE[7] == 0 and quant.NF4_CODE[0] == -1 and quant.NF4_CODE[-1] == 1


WEIGHTS = {  # (out, in) matrices like trained ones: normal, heavy-tailed, rows of different scales
    "normal": lambda g: torch.randn(256, 1024, generator=g) * 0.02,
    "student-t": lambda g: torch.distributions.StudentT(2.5).sample((256, 1024)) * 0.02,
    "scaled rows": lambda g: torch.randn(256, 1024, generator=g) * torch.rand(256, 1, generator=g) * 0.05,
}


@needs_bnb
@pytest.mark.parametrize("shape", [(128, 256), (172, 64), (3, 70), (64, 11)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_equals_bitsandbytes(shape, dtype):
    """Without double quantization: bitsandbytes' codes byte for byte and its dequantized weights element for
    element (a last block shorter than 64 included)."""
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    w = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype)
    packed, state = quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    ours = quant.quantize_nf4(w, double_quant=False)
    assert torch.equal(ours.codes[: packed.numel()], packed.view(-1))
    assert torch.equal(ours.dequantize(), dequantize_4bit(packed, state))  # in w's dtype, as bitsandbytes


@needs_bnb
@pytest.mark.parametrize("kind", WEIGHTS)
def test_double_quantization_no_worse_than_bitsandbytes(kind):
    """Double quantization (ours: 8-bit sqrt(absmax) per group of 256): mean squared reconstruction error no
    more than bitsandbytes' compress_statistics=True, in at most 4.2 bits per weight."""
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    torch.manual_seed(0)
    w = WEIGHTS[kind](torch.Generator().manual_seed(0))
    packed, state = quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    theirs = (dequantize_4bit(packed, state) - w).pow(2).mean()
    q = quant.quantize_nf4(w)
    assert (q.dequantize() - w).pow(2).mean() <= theirs
    assert q.nbytes * 8 / w.numel() <= 4.2


def test_zero_blocks_and_constant_groups_stay_exact():
    """Blocks of zeros dequantize to zeros, and a group whose absmax are all equal keeps them."""
    w = torch.randn(8, 128)
    w[2:4] = 0
    q, single = quant.quantize_nf4(w).dequantize(), quant.quantize_nf4(w, double_quant=False).dequantize()
    assert torch.equal(q[2:4], w[2:4]) and (q - w).pow(2).mean() <= 1.01 * (single - w).pow(2).mean()
    c = torch.ones(4, 64)
    assert torch.equal(quant.quantize_nf4(c).dequantize(), c)


def qlora_pair(seed=0, **kw):
    """A quantized LoRA+ model with non-zero adapters, and its dequantize_model copy."""
    m = tiny_model(seed, **kw)
    q = quant.quantize_model(m)
    lora.add_lora(q, 4, 8, targets=("wq", "wk", "wv", "wo", "w2"))
    lora.set_trainable(q)
    with torch.no_grad():
        for name, p in q.named_parameters():
            if "lora_b" in name:
                p.normal_(0, 0.1)
    return q, quant.dequantize_model(copy.deepcopy(q))


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_quantized_model_equals_its_dequantized_copy(kv_heads):
    """Logits, loss and every trainable gradient of a quantized LoRA+ model equal its dequantize_model copy's
    (float32, within 1e-6 relative); only the embedding, norms and output head stay dense."""
    q, d = qlora_pair(n_kv_heads=kv_heads)
    tok = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(1))
    assert torch.equal(q(tok), d(tok))
    q(tok, tok).backward()
    d(tok, tok).backward()
    gq = {n: p.grad for n, p in q.named_parameters() if p.requires_grad}
    gd = {n: p.grad for n, p in d.named_parameters() if p.requires_grad}
    assert gq.keys() == gd.keys() and len(gq) > 10
    for k in gq:
        torch.testing.assert_close(gq[k], gd[k], rtol=1e-6, atol=1e-7)
    dense = {n for n, p in q.named_parameters() if p.is_floating_point() and not p.requires_grad}
    assert dense == {"output.weight"}
    assert all(t.dtype == torch.uint8 for n, t in q.state_dict().items() if ".weight." in n)


def test_quantize_before_or_after_add_lora_and_merge():
    """quantize_model then add_lora == add_lora then quantize_model; merge_lora(dequantize_model(m)) gives m's
    logits (within float32 rounding of the fold)."""
    q, _ = qlora_pair()
    m = tiny_model(0)
    lora.add_lora(m, 4, 8, targets=("wq", "wk", "wv", "wo", "w2"))
    m.load_state_dict({k: v for k, v in q.state_dict().items() if "lora" in k}, strict=False)
    quant.quantize_model(m)
    tok = torch.randint(0, 96, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(m(tok), q(tok))
        merged = lora.merge_lora(quant.dequantize_model(m))
        torch.testing.assert_close(merged(tok), q(tok), rtol=1e-5, atol=1e-5)
    assert not any(isinstance(x, quant.NF4Weight) for x in merged.modules())


def test_backward_keeps_no_dense_weight():
    """What autograd saves for backward of a quantized model holds no dense (out, in) block weight: they are
    dequantized again in backward (a plain nn.Linear saves its weight)."""
    q, d = qlora_pair()
    tok = torch.randint(0, 96, (1, 16))
    shapes = {tuple(w.weight.shape) for w in d.modules() if isinstance(w, torch.nn.Linear)} - {(96, 64)}

    def saved_shapes(m):
        seen = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(tuple(t.shape)) or t, lambda t: t):
            m(tok, tok)
        return set(seen) & shapes

    assert saved_shapes(d) and not saved_shapes(q)


DEQUANTIZE_PEAK = """
import torch, quant
n = 4096
q = quant.NF4Weight((n, n), torch.bfloat16)
q.codes.data = torch.randint(0, 256, q.codes.shape, dtype=torch.uint8)
q.absmax.data = torch.randint(0, 256, q.absmax.shape, dtype=torch.uint8)
q.absmax_step.fill_(1e-3)
quant.NF4Weight((64, 64), torch.bfloat16).dequantize()  # the lookup table made, the allocator warm
def status(key):  # KiB
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key))
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from what is resident now
start = status("VmRSS:")
w = q.dequantize(torch.bfloat16)
print((status("VmHWM:") - start) * 1024 / n**2)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="reads the process's memory from /proc (Linux)")
def test_dequantize_peaks_at_eight_bytes_per_weight():
    """Dequantizing one weight holds at most 8 bytes per weight at once (int64 indices of its bytes, float32
    weights), as bench.memory_model counts it: measured as the peak resident memory of a fresh process."""
    r = subprocess.run([sys.executable, "-c", DEQUANTIZE_PEAK], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 7.5 < float(r.stdout) < 8.5  # the two 16M-weight tensors: 8 bytes; the old stack-and-index path: 16


def test_memory_model_counts_what_nf4_stores():
    """bench.memory_model(quantize="nf4") at one process: the weights are what a quantized LoRA+ model
    holds (NF4Weight.nbytes for the block linears, the run's dtype for the other frozen tensors, float32
    for the trained), the gathered block is its NF4 bytes, and one dequantized weight is 8 bytes per weight
    of the largest."""
    a = model.ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=32, max_seq_len=64)
    m = quant.quantize_model(train.apply_longlora(model.Transformer(a), train.LongLoRA(seq_len=64)))
    nf4 = [w for w in m.modules() if isinstance(w, quant.NF4Weight)]
    frozen = [p for n, p in m.named_parameters() if not p.requires_grad and ".weight." not in n]  # not in nf4
    trained = [p for p in m.parameters() if p.requires_grad]
    parts = bench.memory_model(a, 64, dtype="bfloat16", quantize="nf4")
    buffers = sum(b.numel() * 4 for w in nf4 for b in w.buffers())
    assert parts["weights (shards)"] + parts["NF4 scales (every process)"] == (
        sum(w.nbytes for w in nf4) + 2 * sum(p.numel() for p in frozen) + 4 * sum(p.numel() for p in trained)
    )
    assert parts["NF4 scales (every process)"] == buffers > 0
    block = m.layers[0]
    in_nf4 = sum(w.nbytes for w in block.modules() if isinstance(w, quant.NF4Weight))
    rest = sum(p.numel() for n, p in block.named_parameters() if ".weight." not in n)
    head = 2 * 96 * 128 * 2
    assert parts["gathered weights"] == head + 2 * (in_nf4 - sum(b.numel() * 4 for b in block.buffers()) + 2 * rest)
    assert parts["one dequantized weight"] == 8 * a.dim * m.layers[0].feed_forward.w1.weight.shape[0]
    assert "one dequantized weight" not in bench.memory_model(a, 64)


def test_reader_quantizes_a_meta_model_as_quantize_model_does():
    """quant.reader fills a model quantized on the meta device (what train.py shards) with the tensors
    quantize_model makes from the same weights."""
    m = tiny_model(3)
    with torch.device("meta"):
        empty = quant.quantize_model(model.Transformer(m.args))
    empty.to_empty(device="cpu")
    weights = m.state_dict()
    read = quant.reader(empty, weights.__getitem__)
    with torch.no_grad():
        for name, t in [*empty.named_parameters(), *empty.named_buffers()]:
            t.copy_(read(name))
    tok = torch.randint(0, 96, (1, 20))
    assert torch.equal(empty(tok), quant.quantize_model(m)(tok))


def test_qlora_run_trains_resumes_and_exports(setup, tmp_path):  # noqa: F811
    """train.py --quantize nf4, LoRA+: the loss falls; a run cut after 2 steps and resumed gives the
    uninterrupted losses bit for bit; merged/ is the dequantized base with the adapters folded in; the
    checkpoints and trainable file hold no quantized tensor; --lora-rank 0 is refused."""
    losses = {}
    for name, steps, more in [("full", 6, []), ("cut", 2, []), ("cut", 6, ["--resume"])]:
        run_train(setup, tmp_path / name, "--steps", str(steps), "--batch-size", "2", "--quantize", "nf4", *more)
        losses[name] = [json.loads(x)["loss"] for x in (tmp_path / name / "log.jsonl").read_text().splitlines()]
    assert losses["cut"] == losses["full"] and losses["full"][-1] < losses["full"][0] - 0.3, losses
    base = quant.dequantize_model(quant.quantize_model(model.load(setup / "base")))
    rebuilt = lora.merge_lora(lora.load_trainable(base, tmp_path / "full" / "trainable.safetensors"))
    tok = torch.randint(0, 320, (1, 128), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.load(tmp_path / "full" / "merged")(tok), rebuilt(tok))
        plain = lora.merge_lora(
            lora.load_trainable(model.load(setup / "base"), tmp_path / "full" / "trainable.safetensors")
        )
        assert not torch.allclose(plain(tok), rebuilt(tok))  # the export did merge into the quantized base
    from safetensors.torch import load_file

    assert not any(".weight." in k for k in load_file(tmp_path / "full" / "trainable.safetensors"))
    r = run_train(setup, tmp_path / "refused", "--steps", "1", "--quantize", "nf4", "--lora-rank", "0", check=False)
    assert r.returncode == 2 and "--lora-rank 8" in r.stderr


def test_qlora_adapter_opens_in_peft_on_the_unquantized_base(setup, tmp_path):  # noqa: F811
    """A --quantize nf4 run on a Hugging Face base writes adapter/ as other LoRA runs do: PEFT puts it on the
    unquantized base (no bitsandbytes needed) and computes our unquantized base + merged adapters, to 1e-4.
    (merged/ is made from the dequantized base instead: test_qlora_run_trains_resumes_and_exports.)"""
    model.save(tiny_model(vocab_size=320), tmp_path / "base", format="hf")
    out = tmp_path / "run"
    flags = ["--model", str(tmp_path / "base"), "--steps", "3", "--lr", "3e-2", "--warmup", "0", "--save-every", "0"]
    run_train(setup, out, *flags, "--quantize", "nf4")
    x = torch.randint(0, 320, (2, 100), generator=torch.Generator().manual_seed(0))
    base = model.load(tmp_path / "base")
    base.beyond_context = True  # 100 tokens, past its 64
    with torch.no_grad():
        before = base(x)
        plain = lora.merge_lora(lora.load_trainable(base, out / "trainable.safetensors"))(x)  # merges into base
    assert (plain - before).abs().max() > 1e-2  # training changed the model
    torch.testing.assert_close(peft_logits(tmp_path / "base", out / "adapter", x), plain, rtol=0, atol=1e-4)


GATHER_SCRIPT = """
import sys, torch
sys.path[:0] = [{root!r}, {tests!r}]
from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam
import model, parallel, quant, train


def init_dtype_attrs_2_11(self, mp_policy):  # torch 2.11's _fsdp_param.py:438-450, as it is
    param_dtype, reduce_dtype = (mp_policy.param_dtype, mp_policy.reduce_dtype)
    self.orig_dtype = self.sharded_param.dtype
    if reduce_dtype == param_dtype:
        reduce_dtype = None
    if param_dtype == self.orig_dtype:
        param_dtype = None
    self.param_dtype = param_dtype
    self.reduce_dtype = reduce_dtype


FSDPParam.init_dtype_attrs = init_dtype_attrs_2_11
rank, world, device = parallel.setup_distributed("cpu")
a = model.ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=32, max_seq_len=64)
base = parallel.random_weights(a, 0, device)
m = train.build_model(base, train.LongLoRA(seq_len=64), rank, world, device, quantize="nf4", checkpointing=False)
seen = set()
dequantize = quant.NF4Weight.dequantize
quant.NF4Weight.dequantize = lambda w, dtype=None: seen.add((w.codes.dtype, w.absmax.dtype)) or dequantize(w, dtype)
m(torch.randint(0, 96, (1, 64)), torch.randint(0, 96, (1, 64))).backward()
block = m.layers[0]
nf4 = sum(t.numel() for w in block.modules() if isinstance(w, quant.NF4Weight) for t in w.parameters())
floats = sum(p.numel() for n, p in block.named_parameters() if p.is_floating_point())
sent = [t for p in block._get_fsdp_state()._fsdp_param_group.fsdp_params for t in p.all_gather_inputs]
print("dtypes", *sorted(set(str(d) for pair in seen for d in pair)))
print("block", nf4 + 2 * floats, sum(t.numel() * t.element_size() for t in sent))
"""


def test_nf4_codes_are_gathered_in_one_byte(tmp_path):
    """torch 2.11's FSDP2 gives integer parameters the policy's param_dtype (FSDPParam.init_dtype_attrs), so
    NF4 codes would be gathered as bf16: exact, but twice their bytes. Under 2.11's rule (put in here, as
    torch 2.13 has its own), a quantized LoRA+ model in bf16 meets uint8 codes and absmax at dequantize,
    and a block's gather moves 1 byte per code and 2 per bf16 weight."""
    script = tmp_path / "gather.py"
    script.write_text(GATHER_SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests")))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    assert lines["dtypes"] == "torch.uint8", r.stdout
    expected, sent = lines["block"].split()  # the bytes each process puts into a block's all-gather
    assert sent == expected, r.stdout
