"""LoRA, injected by hand, and LongLoRA's LoRA+ (trainable embeddings and norms).

    import lora
    lora.add_lora(m, rank=8, alpha=16)                 # adapters on wq, wk, wv, wo (paper §4.1)
    lora.set_trainable(m, extra=("embed", "norm"))     # LoRA+; extra=() is plain LoRA
    ... train ...
    lora.save_trainable(m, "trainable.safetensors")    # adapters + embedding + norms
    lora.merge_lora(m)                                 # fold the adapters into the weights

Why LoRA+ (paper §3.3, Table 3): adapters on the attention weights alone leave a large gap to full
fine-tuning when the context is extended (perplexity 11.44 vs 8.08 at 32k), and larger ranks do not
close it; training the token embedding and every RMSNorm weight as well does (8.12; the norms are
0.004% of Llama 2 7B's parameters). The output head stays frozen. A LongLoRA adapter is therefore
useless without its embedding and norms: save_trainable keeps all three together.
"""

import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRALinear(nn.Module):
    """y = x W^T + (alpha / rank) * x A^T B^T with A (rank, in) Kaiming-uniform and B (out, rank) zero,
    so a fresh adapter leaves the output unchanged; set_trainable freezes W. The base weight keeps its
    name (`weight`), so the state dict still has Meta's names, plus `lora_a` and `lora_b`. A bias (Qwen2's
    wq, wk, wv) stays as it is: frozen, and kept by the merge. W may be a quant.NF4Weight (QLoRA), a module
    with its own dequantize and linear; the adapters stay in the compute dtype."""

    def __init__(self, base, rank, alpha, dropout=0.0):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.lora_a = nn.Parameter(
            torch.empty(rank, base.in_features, dtype=base.weight.dtype, device=base.weight.device)
        )
        self.lora_b = nn.Parameter(
            torch.empty(base.out_features, rank, dtype=base.weight.dtype, device=base.weight.device)
        )
        init_adapter(self.lora_a, self.lora_b)
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x):
        delta = F.linear(F.linear(self.dropout(x), self.lora_a), self.lora_b) * self.scale
        if not isinstance(self.weight, torch.Tensor):  # quantized (quant.NF4Weight)
            return self.weight.linear(x, self.bias) + delta
        return F.linear(x, self.weight, self.bias) + delta

    def merged(self):
        """An nn.Linear with W + scale * B A (computed in float32 or wider, stored in W's dtype) and the bias.
        A quantized W is dequantized first."""
        base = self.weight if isinstance(self.weight, torch.Tensor) else self.weight.dequantize()
        w = base.detach()
        dt = torch.promote_types(w.dtype, torch.float32)
        delta = (self.lora_b.detach().to(dt) @ self.lora_a.detach().to(dt)) * self.scale
        out = nn.Linear(w.shape[1], w.shape[0], bias=self.bias is not None, device="meta")
        out.weight = nn.Parameter((w.to(dt) + delta).to(w.dtype), requires_grad=base.requires_grad)
        if self.bias is not None:
            out.bias = self.bias
        return out


@torch.no_grad()
def init_adapter(a, b):
    """A fresh adapter in place: A Kaiming-uniform (as nn.Linear initialises its weight; from torch's
    global RNG), B zero."""
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    nn.init.zeros_(b)


def fresh_adapters(model, seed, dtype):
    """The whole tensors of every LoRA adapter in `model` (on the meta device, or sharded), made as add_lora
    makes them in one process (seeded, in its order), so that every world size trains the same adapters."""
    torch.manual_seed(seed)
    adapters = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            a, b = (torch.empty(p.shape, dtype=dtype) for p in (m.lora_a, m.lora_b))
            init_adapter(a, b)
            adapters[f"{name}.lora_a"], adapters[f"{name}.lora_b"] = a, b
    return adapters


def add_lora(model, rank, alpha, targets=("wq", "wk", "wv", "wo"), dropout=0.0):
    """Replace every nn.Linear whose name is in `targets` by a LoRALinear. Returns the model."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive int, got {rank!r}")
    if lora_config(model) is not None:
        raise ValueError("the model already has LoRA adapters; merge_lora(model) first to add new ones")
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    unknown = sorted(set(targets) - names)
    if unknown or not targets:
        raise ValueError(
            f"LoRA targets {unknown or list(targets)} name no Linear layer of this model; choose from {sorted(names)}"
        )
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            model.set_submodule(name, LoRALinear(m, rank, alpha, dropout))
    return model


EXTRA = {  # what set_trainable's `extra` may open besides the adapters (LoRA+: both)
    "embed": lambda name: name == "tok_embeddings.weight",
    "norm": lambda name: name.endswith("norm.weight"),  # attention_norm, ffn_norm, the final norm (Qwen3: q/k_norm)
}


def set_trainable(model, extra=("embed", "norm")):
    """Freeze everything but the LoRA adapters and the `extra` groups (see EXTRA). Returns the names of
    the trainable parameters. With tied embeddings, "embed" also trains the output head it shares."""
    unknown = sorted(set(extra) - EXTRA.keys())
    if unknown:
        raise ValueError(f"unknown trainable group(s) {unknown}; choose from {sorted(EXTRA)}")
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name or any(EXTRA[e](name) for e in extra))
        if p.requires_grad:
            trainable.append(name)
    if not trainable:
        raise ValueError("nothing would train: call add_lora first, or pass extra=('embed', 'norm')")
    return trainable


def merge_lora(model):
    """Fold every adapter into its base weight and put a plain nn.Linear back. Returns the model."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            model.set_submodule(name, m.merged())
    return model


def lora_config(model):
    """{"rank", "alpha", "targets"} of the adapters in `model`, or None if it has none."""
    layers = {name.rsplit(".", 1)[-1]: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    if not layers:
        return None
    first = next(iter(layers.values()))
    return {"rank": first.rank, "alpha": first.alpha, "targets": sorted(layers)}


# the context extension an adapter was trained with: Position Interpolation's factor or YaRN's settings
CONTEXT = ("rope_interpolation", "max_seq_len", "rope_yarn", "rope_scaling_factor", "rope_original_context")


def save_trainable(model, path, state=None):
    """Write the trainable parameters (adapters, embedding, norms) to a safetensors file, with the adapter
    settings and the model's context extension (Position Interpolation factor, context length) in its
    metadata, so that load_trainable rebuilds the fine-tuned model from the base model alone. `state`:
    the tensors by name, when they are not the model's own (train.py gathers them from FSDP shards)."""
    from safetensors.torch import save_file

    if state is None:
        state = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    if not state:
        raise ValueError("the model has no trainable parameters to save; call set_trainable first")
    context = {k: getattr(model.args, k) for k in CONTEXT}
    metadata = {"lora": json.dumps(lora_config(model)), "context": json.dumps(context)}
    save_file({k: t.contiguous() for k, t in state.items()}, str(path), metadata=metadata)
    mask = os.umask(0)  # safetensors writes a private file (0600): give it the modes of the umask, as any other
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def load_trainable(model, path):
    """Load a save_trainable file into a base model: checks every tensor against the model first (each
    name must exist, or be an adapter the file describes, with the same shape), then adds the adapters
    if the model has none yet, sets the context extension, and copies the tensors in. A file that does
    not fit changes nothing."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    cfg, context = json.loads(meta.get("lora", "null")), json.loads(meta.get("context", "{}"))
    add = cfg is not None and lora_config(model) is None
    params = dict(model.named_parameters())

    def expected(k):  # the shape the model has, or will have once the file's adapters are added
        if k in params:
            return tuple(params[k].shape)
        parent, _, leaf = k.rpartition(".")
        if not (add and leaf in ("lora_a", "lora_b") and parent.rsplit(".", 1)[-1] in cfg["targets"]):
            return None
        try:
            out_f, in_f = model.get_submodule(parent).weight.shape
        except AttributeError:  # no such layer in this model
            return None
        return (cfg["rank"], in_f) if leaf == "lora_a" else (out_f, cfg["rank"])

    problems = [
        f"{k}: file {tuple(t.shape)}, model {expected(k) or 'has no such parameter'}"
        for k, t in tensors.items()
        if expected(k) != tuple(t.shape)
    ]
    if problems:
        raise ValueError(
            f"{path} does not fit this model:\n  "
            + "\n  ".join(problems[:8])
            + "\nWas it trained from another base model?"
        )
    if context.get("rope_yarn") and (model.args.use_scaled_rope or model.args.rope_interpolation != 1):
        raise ValueError(f"{path} was trained with YaRN, which this base's RoPE scaling cannot take: another base?")
    if add:
        add_lora(model, cfg["rank"], cfg["alpha"], targets=tuple(cfg["targets"]))
    for k, v in context.items():
        setattr(model.args, k, v)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, t in tensors.items():
            params[k].copy_(t)
    return model
