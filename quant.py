"""QLoRA's frozen weights (Dettmers et al., 2023), written out: 4-bit NormalFloat with double quantization.

    import quant, lora
    quant.quantize_model(m)                  # the blocks' linear weights in NF4 (embedding, norms, head stay)
    lora.add_lora(m, rank=8, alpha=16)       # LoRA / LoRA+ on top, unchanged, in the compute dtype
    ... train ...
    lora.merge_lora(quant.dequantize_model(m))   # the dequantized base with the adapters folded in

NF4 stores each weight as a 4-bit index into NF4_CODE, 16 values spaced like the quantiles of a normal
distribution (trained weights are roughly normal, so each code is used about equally often), scaled by
its block's absmax: the largest |w| of every `block_size` (64) consecutive weights of the flattened
matrix. A 64-weight block costs 32 bytes of codes and 4 bytes of absmax, 4.5 bits per weight; double
quantization stores the absmax in 8 bits too (its square root, in 256 steps between the least and the
largest of each group of 256 absmax), which brings it to 4.13. bitsandbytes' double quantization uses
another 8-bit code (a dynamic-exponent one, for absmax minus its mean); ours is no less exact
(tests/test_quant.py) and dequantizes with multiplications and additions only, which round alike on
every device.

A quantized weight is dequantized when it is used, one layer at a time, and again in the backward
pass (NF4Linear's autograd function keeps no dense copy of it for backward). Its codes are integer
tensors, which FSDP2 shards like any frozen parameter and gathers as uint8 (torch 2.11 would gather them
in the run's bf16: parallel.gather_integers_as_they_are); the few float32 statistics of double
quantization are buffers, copied whole to every process (train.py --quantize nf4; the memory per
process: docs/memory.md).
"""

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

# The 16 NF4 values, as published with QLoRA and used by bitsandbytes: 8 quantiles of N(0, 1) on the
# positive side and 7 on the negative side (so that zero is exact), scaled into [-1, 1].
# tests/test_quant.py derives them again from the normal distribution (torch.special.ndtri).
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
])  # fmt: skip
GROUP = 256  # absmax values per group in double quantization


@functools.cache
def pairs_on(device):
    """The two weights each byte of codes stands for, (NF4_CODE[b >> 4], NF4_CODE[b & 15]) for b in 0..255,
    on `device`: copied there once, not in every layer's forward (on CUDA a host-to-device copy waits)."""
    b = torch.arange(256)
    return torch.stack((NF4_CODE[b >> 4], NF4_CODE[b & 15]), dim=1).to(device)


class NF4Weight(nn.Module):
    """A frozen (out, in) weight in NF4. `codes`: uint8, two 4-bit indices per byte (the first weight in the
    high half). `absmax`: float32 per block, or with double quantization uint8 steps of sqrt(absmax) from
    `absmax_min` by `absmax_step` (float32, one each per group). Made by quantize_nf4."""

    def __init__(self, shape, dtype, block_size=64, double_quant=True, device=None):
        super().__init__()
        numel = shape[0] * shape[1]
        blocks = -(-numel // block_size)
        self.shape, self.dtype, self.block_size, self.double_quant = tuple(shape), dtype, block_size, double_quant
        self.codes = nn.Parameter(torch.zeros(blocks * block_size // 2, dtype=torch.uint8, device=device), False)
        if double_quant:
            self.absmax = nn.Parameter(torch.zeros(blocks, dtype=torch.uint8, device=device), False)
            groups = -(-blocks // GROUP)
            self.register_buffer("absmax_min", torch.zeros(groups, device=device), persistent=False)
            self.register_buffer("absmax_step", torch.zeros(groups, device=device), persistent=False)
        else:
            self.register_buffer("absmax", torch.zeros(blocks, device=device), persistent=False)
        # Float tensors are buffers so that FSDP2's mixed precision (bf16 gathers) cannot round them; they
        # are left out of state_dict() (checkpoints hold what trains): a quantized model is made from its base.

    @property
    def device(self):
        return self.codes.device

    @property
    def nbytes(self):
        """Bytes stored: the codes and the absmax (and its two statistics per group)."""
        return sum(t.numel() * t.element_size() for t in (*self.parameters(), *self.buffers()))

    def block_absmax(self):
        """The absmax of every block, float32."""
        if not self.double_quant:
            return self.absmax
        groups = self.absmax_min.numel()
        q = nn.functional.pad(self.absmax.float(), (0, groups * GROUP - self.absmax.numel())).view(groups, GROUP)
        root = q * self.absmax_step[:, None] + self.absmax_min[:, None]
        return (root * root).view(-1)[: self.absmax.numel()]

    def dequantize(self, dtype=None):
        """The dense weight, in `dtype` (default: the dtype it was quantized from)."""
        codes = self.codes.to(torch.uint8)  # (a no-op: FSDP2 gathers it as uint8, parallel.gather_integers_as_they_are)
        # one lookup per byte, into a (256, 2) table: 8 bytes per weight at the peak (the int64 indices of
        # the bytes, and the float32 weights), then multiplied in place (one rounding) and cast
        w = pairs_on(self.device)[codes.long()].view(-1, self.block_size)
        w.mul_(self.block_absmax()[:, None])
        return w.view(-1)[: self.shape[0] * self.shape[1]].view(self.shape).to(dtype or self.dtype)

    def linear(self, x, bias=None):
        """F.linear(x, W, bias) with W dequantized in forward and again in backward (_FrozenLinear)."""
        return _FrozenLinear.apply(x, self, bias)


@torch.no_grad()
def quantize_nf4(w, block_size=64, double_quant=True):
    """`w` (out, in) in NF4, an NF4Weight on w's device. Each weight becomes the code nearest to w / absmax
    of its block (ties to the lower code), as bitsandbytes' quantize_4bit does."""
    if w.dim() != 2 or block_size % 2:
        raise ValueError(f"NF4 quantizes matrices in blocks of an even size; got shape {tuple(w.shape)}, {block_size}")
    q = NF4Weight(w.shape, w.dtype, block_size, double_quant, device=w.device)
    if w.device.type == "meta":
        return q
    flat = w.reshape(-1).float()
    blocks = F.pad(flat, (0, q.codes.numel() * 2 - flat.numel())).view(-1, block_size)  # zeros leave absmax alone
    absmax = blocks.abs().amax(dim=1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1)
    code = NF4_CODE.to(w.device)
    idx = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2).to(torch.uint8).view(-1, 2)
    q.codes.copy_(idx[:, 0] << 4 | idx[:, 1])
    if not double_quant:
        q.absmax.copy_(absmax)
        return q
    groups = q.absmax_min.numel()
    root = F.pad(absmax.sqrt(), (0, groups * GROUP - absmax.numel()), value=float("nan")).view(groups, GROUP)
    lo, hi = root.nan_to_num(float("inf")).amin(dim=1), root.nan_to_num(0.0).amax(dim=1)  # padding left out
    step = (hi - lo) / 255
    steps = torch.round((root - lo[:, None]) / step.clamp(min=1e-38)[:, None]).clamp(0, 255)
    q.absmax.copy_(steps.nan_to_num(0.0).view(-1)[: absmax.numel()].to(torch.uint8))
    q.absmax_min.copy_(lo)
    q.absmax_step.copy_(step)
    return q


class _FrozenLinear(torch.autograd.Function):
    """x W^T + b for a quantized W that does not train: W is dequantized in forward and again in backward,
    so only the 4-bit codes wait for backward, never a dense copy."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.weight = weight
        return F.linear(x, weight.dequantize(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        dx = grad @ ctx.weight.dequantize(grad.dtype) if ctx.needs_input_grad[0] else None
        db = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
        return dx, None, db


class NF4Linear(nn.Linear):
    """An nn.Linear whose weight is an NF4Weight (frozen; a bias, if any, stays as it was). It is still an
    nn.Linear, so lora.add_lora wraps it like any other."""

    def __init__(self, base, block_size=64, double_quant=True):
        super().__init__(base.in_features, base.out_features, bias=False, device="meta")
        del self.weight
        self.weight = quantize_nf4(base.weight.detach(), block_size, double_quant)
        self.bias = base.bias

    def forward(self, x):
        return self.weight.linear(x, self.bias)


def _layers(model):
    """(name in model.layers, module) of every linear layer of the transformer blocks."""
    for name, mod in list(model.layers.named_modules()):
        if isinstance(mod, nn.Linear) or hasattr(mod, "lora_a"):
            yield name, mod


def quantize_model(model, block_size=64, double_quant=True):
    """Every linear weight of the blocks in NF4, in place (LoRA adapters, if any, stay as they are; their
    base weights are quantized). The embedding, the norms and the output head stay in their dtype, as in
    QLoRA. On the meta device it makes the quantized tensors' shapes only. Returns the model."""
    for name, mod in _layers(model):
        if isinstance(mod.weight, NF4Weight):
            continue
        if hasattr(mod, "lora_a"):  # a LoRALinear: its base weight in NF4
            w = mod.weight
            del mod.weight
            mod.weight = quantize_nf4(w.detach(), block_size, double_quant)
        else:
            model.layers.set_submodule(name, NF4Linear(mod, block_size, double_quant))
    return model


def dequantize_model(model):
    """The inverse of quantize_model, in place: every NF4 weight back as a dense frozen one in the dtype it
    was quantized from (an NF4Linear becomes an nn.Linear). What merge_lora then folds the adapters into.
    Returns the model."""
    for name, mod in _layers(model):
        if not isinstance(mod.weight, NF4Weight):
            continue
        w = nn.Parameter(mod.weight.dequantize(), requires_grad=False)
        if isinstance(mod, NF4Linear):
            dense = nn.Linear(mod.in_features, mod.out_features, bias=False, device="meta")
            dense.weight, dense.bias = w, mod.bias
            model.layers.set_submodule(name, dense)
        else:
            del mod.weight
            mod.weight = w
    return model


def reader(model, read):
    """read(name), the whole tensor of a parameter or buffer by name, for a model quantize_model made on the
    meta device (parallel.materialize's argument): a quantized weight's tensors are made from read(the
    weight's name), quantized on the CPU as quantize_model quantizes it (the export does the same to the
    base: the same codes). The last quantized weight is kept until a tensor of another one is read."""
    owners = {name: w for name, w in model.named_modules() if isinstance(w, NF4Weight)}
    last = {}

    def read_quantized(name):
        owner, _, part = name.rpartition(".")
        if owner not in owners:
            return read(name)
        if owner not in last:
            w = owners[owner]
            last.clear()
            last[owner] = quantize_nf4(read(owner).to("cpu"), w.block_size, w.double_quant)
        return getattr(last[owner], part)

    return read_quantized
