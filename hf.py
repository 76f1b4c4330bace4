"""Hugging Face's formats in one place: config.json <-> ModelArgs' fields, HF <-> Meta parameter names, the
q/k row permutation of HF's RoPE layout, RoPE scaling, safetensors in and out, and the PEFT adapter.

    fields = hf.args_fields(json.load(open("config.json")), "config.json")  # ModelArgs(**fields)
    shapes, read, dtype = hf.read_weights(folder, args)                    # lazily, in Meta's names and layout
    hf.to_hf(args, state_dict)                                             # Meta's names -> HF's, q/k permuted

It imports nothing of this codebase: `args` is any object with ModelArgs' fields, state dicts map names to
tensors. model.load and model.save call it for HF folders; checkpoint.py's export writes the adapter with it.
"""

import json
import os
from pathlib import Path

import torch

# config.json keys a Llama's needs
REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size")

# ----------------------------------------------------------------------------- names and layout


def permute(w, n_heads, inverse):
    """HF stores wq/wk rows reordered for rotate_half RoPE: per head, the even dimensions first, then the
    odd. inverse=True goes back to Meta's interleaved pairs. A missing un-permute fails silently."""
    rows, cols = w.shape
    if inverse:
        return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


_LAYER_NAMES = {  # Meta -> HF, inside layers.{i}
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def name(k):
    """The Hugging Face name of the Meta-named parameter `k`."""
    return _rename(k, to_hf=True)


def meta_name(k):
    """The Meta name of the Hugging Face-named parameter `k`."""
    return _rename(k, to_hf=False)


def to_hf(args, sd):
    """A Meta-named state dict in Hugging Face's names and layout: wq/wk rows permuted for rotate_half RoPE."""
    out = {}
    for k, t in sd.items():
        if k.endswith(("wq.weight", "wk.weight")):
            t = permute(t, args.n_heads if "wq" in k else args.n_kv_heads, inverse=False)
        out[name(k)] = t.contiguous()
    return out


def _rename(k, to_hf):
    """Meta <-> HF names: layers.{i}.attention.wq.weight <-> model.layers.{i}.self_attn.q_proj.weight."""
    top, layer = _TOP_NAMES, _LAYER_NAMES
    if not to_hf:
        top, layer = {v: k for k, v in top.items()}, {v: k for k, v in layer.items()}
    if k in top or not k.removeprefix("model.").startswith("layers."):
        return top.get(k, k)  # an unknown name passes through, for load's check to report
    _, i, rest = k.removeprefix("model.").split(".", 2)
    mod, _, leaf = rest.rpartition(".")
    return f"{'model.' if to_hf else ''}layers.{i}.{layer.get(mod, mod)}.{leaf}"


# ----------------------------------------------------------------------------- config.json


def rope(args):
    """The RoPE scaling of `args` as a Hugging Face config's `rope_scaling` (None: plain RoPE)."""
    if args.use_scaled_rope and args.rope_interpolation != 1:
        raise ValueError(
            "a Hugging Face config cannot express Position Interpolation on top of Llama 3.1 RoPE scaling; save with "
            "format='meta'"
        )
    if args.use_scaled_rope:
        return {
            "rope_type": "llama3",
            "factor": args.rope_scaling_factor,
            "low_freq_factor": args.rope_low_freq_factor,
            "high_freq_factor": args.rope_high_freq_factor,
            "original_max_position_embeddings": args.rope_original_context,
        }
    return {"rope_type": "linear", "factor": args.rope_interpolation} if args.rope_interpolation != 1 else None


def args_fields(cfg, source):
    """ModelArgs' fields from a Llama's config.json `cfg` (read from `source`, named in errors)."""
    if cfg.get("model_type", "llama") != "llama":
        raise ValueError(
            f"{source}: model_type {cfg['model_type']!r} is not a Llama; this loader reads Llama checkpoints"
        )
    missing = [k for k in REQUIRED if k not in cfg]
    if missing:
        raise ValueError(f"{source} lacks {missing}; restore it from the original checkpoint")
    if cfg.get("attention_bias") or cfg.get("mlp_bias") or cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: biases or an activation other than silu are not Llama's; not supported")
    dim, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    if (cfg.get("head_dim") or dim // n_heads) != dim // n_heads:  # some configs write "head_dim": null
        raise ValueError(f"{source}: head_dim {cfg['head_dim']} != hidden_size / num_attention_heads; not supported")
    rope = cfg.get("rope_parameters") or {}  # transformers >= 5 spelling; older files: top-level keys
    scaling = cfg.get("rope_scaling") or rope
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    args = dict(
        dim=dim,
        n_layers=cfg["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads"),
        vocab_size=cfg["vocab_size"],
        hidden_dim=cfg["intermediate_size"],
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=cfg.get("rope_theta", rope.get("rope_theta", 10000.0)),
        max_seq_len=cfg.get("max_position_embeddings", 4096),
        tie_embeddings=cfg.get("tie_word_embeddings", False),
    )
    if kind == "linear":
        args["rope_interpolation"] = scaling["factor"]
    elif kind == "llama3":
        args.update(
            use_scaled_rope=True,
            rope_scaling_factor=scaling["factor"],
            rope_low_freq_factor=scaling["low_freq_factor"],
            rope_high_freq_factor=scaling["high_freq_factor"],
            rope_original_context=scaling["original_max_position_embeddings"],
        )
    elif kind != "default":
        raise ValueError(f"{source}: RoPE scaling {kind!r} is not supported (default, linear and llama3 are)")
    return args


def config(args, dtype):
    """config.json of a model with `args`, its weights stored in `dtype`."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": rope(args),
        "max_position_embeddings": args.max_seq_len,
        "tie_word_embeddings": args.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


# ----------------------------------------------------------------------------- safetensors


_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def _open(file):
    """safetensors' safe_open, with an error that names the file."""
    from safetensors import safe_open

    try:
        return safe_open(file, framework="pt")
    except Exception as e:  # safetensors' own error: a truncated or damaged file
        raise ValueError(
            f"cannot read {file} ({e}): the file is incomplete or damaged; download or save it again"
        ) from None


def save_file(tensors, path, metadata=None):
    """safetensors' save_file, the file then given the modes the umask allows, as every other file gets
    (safetensors writes a private temporary file, mode 0600, and renames it)."""
    from safetensors.torch import save_file as save

    save(tensors, str(path), metadata=metadata)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def read_weights(path, args):
    """The weights of the HF folder `path` (one *.safetensors file or an index of shards) for a model with
    `args`: (Meta name -> shape, read(Meta name) -> tensor in Meta's layout, the embedding's dtype), nothing
    read yet but the headers."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.exists()
        else sorted(p.name for p in path.glob("*.safetensors"))
    )
    if not files:
        raise FileNotFoundError(
            f"{path} has config.json but no *.safetensors weights (.bin checkpoints are not read; re-save them with "
            "safetensors)"
        )
    where, shapes, dtypes = {}, {}, {}  # Meta name -> (file, HF name), shape, stored dtype
    for file in files:
        with _open(path / file) as f:
            for k in f.keys():
                if "rotary_emb.inv_freq" not in k:  # a buffer some old checkpoints saved
                    where[meta_name(k)] = (path / file, k)
                    t = f.get_slice(k)
                    shapes[meta_name(k)], dtypes[meta_name(k)] = torch.Size(t.get_shape()), t.get_dtype()
    if args.tie_embeddings:  # some tied checkpoints store the head too
        where.pop("output.weight", None)
        shapes.pop("output.weight", None)
    heads = {"wq": args.n_heads, "wk": args.n_kv_heads}

    def read(k):
        file, hf_name = where[k]
        with _open(file) as f:
            t = f.get_tensor(hf_name)
        w = k.split(".")[-2]
        return permute(t, heads[w], inverse=True) if w in heads and k.startswith("layers.") else t

    return shapes, read, _SAFETENSORS_DTYPES.get(dtypes.get("tok_embeddings.weight"), torch.float32)


def files(args, sd, max_shard_bytes):
    """{file name: write(path)} of an HF folder holding the Meta-named state dict `sd`: config.json and the
    safetensors, sharded with an index above max_shard_bytes."""
    cfg = config(args, sd["tok_embeddings.weight"].dtype)
    out = to_hf(args, sd)
    shards, size = [{}], 0
    for k, t in out.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nbytes
    writers = {"config.json": lambda f: f.write_text(json.dumps(cfg, indent=2))}
    if len(shards) == 1:
        writers["model.safetensors"] = lambda f: save_file(shards[0], f, metadata={"format": "pt"})
        return writers
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for file, shard in zip(names, shards):
        writers[file] = lambda f, shard=shard: save_file(shard, f, metadata={"format": "pt"})
    weight_map = {k: file for file, shard in zip(names, shards) for k in shard}
    total = sum(t.numel() * t.element_size() for t in out.values())
    writers["model.safetensors.index.json"] = lambda f: f.write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    return writers


# ----------------------------------------------------------------------------- PEFT


def save_peft(args, lora_cfg, state, folder, base=None):
    """The trained weights `state` (adapters, embedding, norms; Meta names) of a model with `args` and the
    adapters `lora_cfg` (lora.lora_config) as a PEFT LoRA adapter for the Hugging Face version of the base
    model: adapter_config.json + adapter_model.safetensors in transformers' names, and base_config.json,
    the settings the base must be loaded with (its new RoPE scaling and context length):

        base = AutoModelForCausalLM.from_pretrained(BASE, **json.load(open("adapter/base_config.json")))
        model = PeftModel.from_pretrained(base, "adapter")

    B's rows are its layer's output rows, so wq's and wk's are permuted as the weights are for HF's
    RoPE layout (A's rows are the rank). The embedding and norms travel in `modules_to_save`, and with
    tied embeddings the output head too (PEFT would otherwise keep the base's). Returns False, writing
    nothing, where a Hugging Face config cannot express the model's RoPE scaling."""
    try:
        scaling = rope(args) or {"rope_type": "default"}
    except ValueError:
        return False
    tensors, targets, modules = {}, set(), set()
    for k, t in state.items():
        layer, _, leaf = k.rpartition(".")
        if leaf == "lora_a":
            module = name(f"{layer}.weight").removesuffix(".weight")
            tensors[f"base_model.model.{module}.lora_A.weight"] = t
            targets.add(module.rsplit(".", 1)[-1])
        elif leaf == "lora_b":
            ((module, t),) = to_hf(args, {f"{layer}.weight": t}).items()
            tensors[f"base_model.model.{module.removesuffix('.weight')}.lora_B.weight"] = t
        else:  # a whole trained tensor: the embedding or a norm
            names = [name(k)] + (["lm_head.weight"] if k == "tok_embeddings.weight" and args.tie_embeddings else [])
            for module in names:
                tensors[f"base_model.model.{module}"] = t.clone()  # safetensors stores no shared tensors
                modules.add(module.removesuffix(".weight").rsplit(".", 1)[-1])
    adapter = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(Path(base).resolve()) if base else None,
        "r": lora_cfg["rank"],
        "lora_alpha": lora_cfg["alpha"],
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "target_modules": sorted(targets),
        "modules_to_save": sorted(modules) or None,
        "inference_mode": True,
    }
    overrides = {
        "rope_parameters": {**scaling, "rope_theta": args.rope_theta},
        "max_position_embeddings": args.max_seq_len,
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: t.contiguous() for k, t in tensors.items()},
        str(folder / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
    (folder / "adapter_config.json").write_text(json.dumps(adapter, indent=2))
    (folder / "base_config.json").write_text(json.dumps(overrides, indent=2))
    return True
