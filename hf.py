"""Hugging Face's formats in one place: config.json <-> ModelArgs' fields, HF <-> Meta parameter names, the
q/k row permutation of HF's RoPE layout, RoPE scaling, safetensors in and out, and the PEFT adapter.

    fields = hf.args_fields(json.load(open("config.json")), "config.json")  # ModelArgs(**fields)
    shapes, read, dtype = hf.read_weights(folder, args)                    # lazily, in Meta's names and layout
    hf.to_hf(args, state_dict)                                             # Meta's names -> HF's, q/k permuted

It imports nothing of this codebase: `args` is any object with ModelArgs' fields, state dicts map names to
tensors. model.load and model.save call it for HF folders; checkpoint.py's export writes the adapter with it.
"""

import json
import math
import os
from pathlib import Path

import torch

# config.json keys a Llama's needs
REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size")
# model_type -> the transformers class; each is a Llama but for ModelArgs' qkv_bias (qwen2) and qk_norm (qwen3)
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

# ----------------------------------------------------------------------------- names and layout


def permute(w, n_heads, inverse):
    """HF stores wq/wk rows reordered for rotate_half RoPE: per head, the even dimensions first, then the
    odd. inverse=True goes back to Meta's interleaved pairs. A missing un-permute fails silently."""
    rows = w.shape[0]
    pairs = (2, rows // n_heads // 2) if inverse else (rows // n_heads // 2, 2)
    return w.reshape(n_heads, *pairs, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def rotated_heads(args, k):
    """How many heads of RoPE's layout the rows of the Meta-named tensor `k` hold, which HF permutes: wq's and
    wk's weights and biases, and q_norm's and k_norm's weights (one head); None for every other tensor."""
    module, leaf = k.split(".")[-2:]
    if not k.startswith("layers.") or leaf not in ("weight", "bias"):
        return None
    return {"wq": args.n_heads, "wk": args.n_kv_heads, "q_norm": 1, "k_norm": 1}.get(module)


_LAYER_NAMES = {  # Meta -> HF, inside layers.{i}
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "attention.q_norm": "self_attn.q_norm",
    "attention.k_norm": "self_attn.k_norm",
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
    """A Meta-named state dict in Hugging Face's names and layout: q/k rows permuted for rotate_half RoPE."""
    out = {}
    for k, t in sd.items():
        heads = rotated_heads(args, k)
        out[name(k)] = (t if heads is None else permute(t, heads, inverse=False)).contiguous()
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
    """The RoPE scaling of `args` as a Hugging Face config's `rope_parameters` (None: plain RoPE)."""
    if (args.use_scaled_rope or args.rope_yarn) and args.rope_interpolation != 1:
        raise ValueError(
            "a Hugging Face config cannot express Position Interpolation on top of Llama 3.1's or YaRN's RoPE scaling; "
            "save with format='meta'"
        )
    if args.use_scaled_rope:
        return {
            "rope_type": "llama3",
            "factor": args.rope_scaling_factor,
            "low_freq_factor": args.rope_low_freq_factor,
            "high_freq_factor": args.rope_high_freq_factor,
            "original_max_position_embeddings": args.rope_original_context,
        }
    if args.rope_yarn:
        yarn = {
            "rope_type": "yarn",
            "factor": args.rope_scaling_factor,
            "original_max_position_embeddings": args.rope_original_context,
            "beta_fast": args.rope_beta_fast,
            "beta_slow": args.rope_beta_slow,
            "truncate": args.rope_truncate,
        }
        return yarn | ({"attention_factor": args.rope_attention_factor} if args.rope_attention_factor else {})
    return {"rope_type": "linear", "factor": args.rope_interpolation} if args.rope_interpolation != 1 else None


def llama31_scale(freqs, args):
    """Llama 3.1's RoPE scaling (HF's rope_type "llama3", Meta's use_scaled_rope), for model.precompute_freqs_cis:
    keep high frequencies, divide low ones by the factor, blend in between."""
    factor, low, high = args.rope_scaling_factor, args.rope_low_freq_factor, args.rope_high_freq_factor
    old = args.rope_original_context
    wavelen = 2 * math.pi / freqs
    smooth = (old / wavelen - low) / (high - low)
    blended = (1 - smooth) * freqs / factor + smooth * freqs
    out = torch.where(wavelen > old / low, freqs / factor, blended)
    return torch.where(wavelen < old / high, freqs, out)


def yarn_scale(freqs, args):
    """YaRN's RoPE, as transformers computes it, for model.precompute_freqs_cis: (frequencies, attention
    factor). A dimension pair turning fewer than beta_slow times over the original context is interpolated
    (its frequency divided by the factor, as PI does), one turning more than beta_fast times is kept, a
    linear ramp blends those between; q and k are scaled by the attention factor (dot products by its square)."""
    D, old, factor = args.head_dim, args.rope_original_context, args.rope_scaling_factor
    pair = lambda turns: D * math.log(old / (turns * 2 * math.pi)) / (2 * math.log(args.rope_theta))  # noqa: E731
    low, high = pair(args.rope_beta_fast), pair(args.rope_beta_slow)  # the pair (a float) turning that often
    if args.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, D - 1)
    ramp = ((torch.arange(D // 2, device=freqs.device, dtype=torch.float32) - low) / (high - low or 0.001)).clamp(0, 1)
    attention = args.rope_attention_factor or (0.1 * math.log(factor) + 1 if factor > 1 else 1.0)
    return freqs / factor * ramp + freqs * (1 - ramp), attention


def read_json(f, required=()):
    """A config file (config.json, Meta's params.json) as a dict, with a clear error if it is not JSON or
    lacks a required key."""
    try:
        d = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f} is not valid JSON ({e}); restore it from the original checkpoint") from e
    missing = [k for k in required if k not in d]
    if missing:
        raise ValueError(f"{f} lacks {missing}; restore it from the original checkpoint")
    return d


def args_fields(cfg, source):
    """ModelArgs' fields from the config.json `cfg` of a Llama, Mistral, Qwen2 or Qwen3 (read from `source`,
    named in errors). A missing head_dim or sliding-window key means what it means to transformers' config
    class (Qwen3's head_dim 128, Mistral's window 4096)."""
    arch, classes = cfg.get("model_type", "llama"), cfg.get("architectures") or []
    if arch not in ARCHITECTURES or classes and ARCHITECTURES[arch] not in classes:
        raise ValueError(
            f"{source}: {' '.join([*classes, f'(model_type {arch!r})'])} is not supported; this loader reads "
            f"{', '.join(ARCHITECTURES.values())}"
        )
    missing = [k for k in REQUIRED if k not in cfg]
    if missing:
        raise ValueError(f"{source} lacks {missing}; restore it from the original checkpoint")
    if cfg.get("attention_bias") and arch != "qwen2" or cfg.get("mlp_bias") or cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: biases on o_proj or the MLP, or an activation other than silu: not supported")
    if slides(cfg, arch):
        raise ValueError(
            f"{source}: sliding-window attention (sliding_window {cfg.get('sliding_window', 4096)}) is not "
            "implemented; models whose config has sliding_window: null (Mistral 7B v0.2 and later) or "
            "use_sliding_window: false (Qwen2, Qwen3) load"
        )
    dim, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    rope = cfg.get("rope_parameters") or {}  # transformers >= 5 spelling; older files: top-level keys
    scaling = cfg.get("rope_scaling") or rope
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    context = cfg.get("max_position_embeddings", 4096)
    args = dict(
        model_type=arch,
        dim=dim,
        n_layers=cfg["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads"),
        head_dim=cfg.get("head_dim", 128 if arch == "qwen3" else None) or dim // n_heads,  # some write null
        qkv_bias=arch == "qwen2",
        qk_norm=arch == "qwen3",
        vocab_size=cfg["vocab_size"],
        hidden_dim=cfg["intermediate_size"],
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=cfg.get("rope_theta", rope.get("rope_theta", 10000.0)),
        max_seq_len=context,
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
    elif kind == "yarn":
        if scaling.get("mscale") and scaling.get("mscale_all_dim"):
            raise ValueError(f"{source}: YaRN with mscale and mscale_all_dim (DeepSeek's) is not supported")
        old = scaling.get("original_max_position_embeddings", context)
        factor = scaling.get("factor") or context / old
        args.update(
            rope_yarn=True,
            rope_scaling_factor=factor,
            rope_original_context=old,
            rope_beta_fast=scaling.get("beta_fast") or 32.0,
            rope_beta_slow=scaling.get("beta_slow") or 1.0,
            rope_attention_factor=scaling.get("attention_factor"),
            rope_truncate=scaling.get("truncate", True),
            max_seq_len=max(context, int(old * factor)),  # Qwen's configs keep the original length here
        )
    elif kind != "default":
        raise ValueError(f"{source}: RoPE scaling {kind!r} is not supported (default, linear, llama3 and yarn are)")
    return args


def slides(cfg, arch):
    """Whether a layer of the model `cfg` describes attends in a sliding window, as transformers decides it."""
    if arch == "mistral":
        return cfg.get("sliding_window", 4096) is not None
    if arch in ("qwen2", "qwen3"):  # a window only with use_sliding_window, and only in the layers that say so
        if not cfg.get("use_sliding_window") or cfg.get("sliding_window", 4096) is None:
            return False
        if cfg.get("layer_types"):
            return "sliding_attention" in cfg["layer_types"]
        return cfg["num_hidden_layers"] > cfg.get("max_window_layers", 28)
    return False


# what each architecture's config says beyond Llama's keys, for the model this codebase runs
_CONFIG_EXTRAS = {
    "llama": {"attention_bias": False, "mlp_bias": False},
    "mistral": {"sliding_window": None},
    "qwen2": {"use_sliding_window": False, "sliding_window": None},
    "qwen3": {"attention_bias": False, "use_sliding_window": False, "sliding_window": None},
}


def config(args, dtype):
    """config.json of a model with `args`, its weights stored in `dtype`, as the architecture it was read as."""
    arch = args.model_type
    if arch not in ARCHITECTURES or (args.qkv_bias, args.qk_norm) != (arch == "qwen2", arch == "qwen3"):
        raise ValueError(
            f"model_type {arch!r} with qkv_bias={args.qkv_bias}, qk_norm={args.qk_norm}: no such Hugging Face model "
            "(qwen2 has q/k/v biases, qwen3 q/k norms, llama and mistral neither); set ModelArgs.model_type to match"
        )
    scaling = rope(args)
    return {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        "rope_parameters": {**(scaling or {"rope_type": "default"}), "rope_theta": args.rope_theta},
        "rope_theta": args.rope_theta,  # and rope_scaling: the keys transformers < 5 reads
        "rope_scaling": scaling,
        "max_position_embeddings": args.max_seq_len,
        "tie_word_embeddings": args.tie_embeddings,
        "hidden_act": "silu",
        **_CONFIG_EXTRAS[arch],
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


GENERATION_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def carry_generation_config(base, folder, bos_id=None, eos_id=None):
    """Give the exported HF folder `folder` what generation needs from its base: config.json's BOS, EOS and
    padding ids and generation_config.json, as the base folder `base` has them (what it does not say: the
    tokenizer's `bos_id` and `eos_id`, if given; a Meta base says none). Without an EOS id transformers'
    generate() never stops at the end of an answer."""
    base, folder = Path(base), Path(folder)
    own = read_json(base / "config.json") if (base / "config.json").is_file() else {}
    ids = {k: own[k] for k in GENERATION_IDS if k in own}  # the base's, None (Qwen's BOS) included
    ids = {**{k: v for k, v in (("bos_token_id", bos_id), ("eos_token_id", eos_id)) if v is not None}, **ids}
    if ids.get("eos_token_id") is None and eos_id is not None:  # a base's null EOS never stops: the tokenizer's
        ids["eos_token_id"] = eos_id
    if not ids and not (base / "generation_config.json").is_file():
        return
    files = {"config.json": json.dumps({**read_json(folder / "config.json"), **ids}, indent=2)}
    if (base / "generation_config.json").is_file():
        files["generation_config.json"] = (base / "generation_config.json").read_text()
    else:
        files["generation_config.json"] = json.dumps(ids, indent=2)
    for name, text in files.items():  # written whole, then renamed
        (folder / f".{name}.tmp").write_text(text)
        os.replace(folder / f".{name}.tmp", folder / name)


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

    def read(k):
        file, hf_name = where[k]
        with _open(file) as f:
            t = f.get_tensor(hf_name)
        heads = rotated_heads(args, k)
        return t if heads is None else permute(t, heads, inverse=True)

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
        else:  # a whole trained tensor: the embedding or a norm (q_norm's and k_norm's permuted as q's rows)
            ((hf_name, t),) = to_hf(args, {k: t}).items()
            names = [hf_name] + (["lm_head.weight"] if k == "tok_embeddings.weight" and args.tie_embeddings else [])
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
