"""Llama in one file: the model, RoPE with context scaling, and Meta's checkpoints (Hugging Face's via hf.py).
Mistral, Qwen2 and Qwen3 are the same model with three switches (ModelArgs.head_dim, qkv_bias, qk_norm).

    import model
    m = model.load("llama-2-7b/")           # Meta folder (params.json + consolidated.NN.pth) or HF folder
    logits = m(tokens)                      # tokens (B, N) LongTensor -> logits (B, N, vocab)
    m.extend_context(8)                     # Position Interpolation: 8x the context (positions / 8)
    m.extend_context(8, method="yarn")      # or YaRN
    m.set_attention(group_size=2048)        # S2-Attn (training); group_size=None: full attention
    model.save(m, "out/", format="hf")      # or format="meta"

Parameter names are Meta's (tok_embeddings, layers.{i}.attention.wq, feed_forward.w1, attention_norm,
ffn_norm, norm, output), so a Meta checkpoint loads with strict=True. The model knows nothing about
LoRA, FSDP or data; it runs on one CPU as it is.
"""

import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import hf

# ALL_BACKENDS, BACKENDS: set_attention's backends, and those this machine runs (train.py reads them here)
from s2attn import ALL_BACKENDS, BACKENDS, cached_attention, check_config, full_attention, s2_attention  # noqa: F401
from s2attn import positions as document_positions


@dataclass
class ModelArgs:
    """Mirrors Meta's params.json; the fields after `use_scaled_rope` are this codebase's additions."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None: n_heads (no grouped-query attention)
    vocab_size: int = -1  # -1 in params.json: take it from the weights
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    use_scaled_rope: bool = False  # Llama 3.1's frequency-dependent RoPE scaling, with the 4 fields below
    rope_scaling_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192
    # Position Interpolation (Chen et al. 2023), LongLoRA's context extension: positions are divided by
    # rope_interpolation (the paper's s = target length / 4096). max_seq_len: the context, after it.
    rope_interpolation: float = 1.0
    max_seq_len: int = 4096
    hidden_dim: Optional[int] = None  # FFN width; None: derived from dim the way Meta does
    tie_embeddings: bool = False  # output head shares tok_embeddings.weight (some HF Llama-family models)
    # Beyond Llama (hf.py reads them from a config.json; the defaults are Llama's):
    model_type: str = "llama"  # the Hugging Face architecture (hf.ARCHITECTURES) the weights are saved as
    head_dim: Optional[int] = None  # None: dim // n_heads (Qwen3 and some Mistrals set it apart)
    qkv_bias: bool = False  # biases on wq, wk and wv (Qwen2)
    qk_norm: bool = False  # an RMSNorm over each head of q and of k, before RoPE (Qwen3)
    # YaRN (Peng et al. 2023) instead of Position Interpolation: rope_scaling_factor x rope_original_context
    rope_yarn: bool = False
    rope_beta_fast: float = 32.0  # frequencies turning more than beta_fast times in the original context stay,
    rope_beta_slow: float = 1.0  # those turning fewer than beta_slow times are interpolated; a ramp between
    rope_attention_factor: Optional[float] = None  # q and k are scaled by it; None: 0.1 ln(factor) + 1
    rope_truncate: bool = True  # the ramp's ends rounded to whole dimensions (transformers' default)

    def __post_init__(self):
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        if self.head_dim is None and self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} must be a multiple of n_heads={self.n_heads} (or set head_dim)")
        self.head_dim = self.head_dim or self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads} (GQA)")
        if self.hidden_dim is None:  # Meta: 2/3 of 4*dim, times ffn_dim_multiplier, rounded up to multiple_of
            hidden = int((self.ffn_dim_multiplier or 1) * int(2 * 4 * self.dim / 3))
            self.hidden_dim = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)
        if self.rope_interpolation < 1:
            raise ValueError(f"rope_interpolation={self.rope_interpolation} must be >= 1 (positions are divided by it)")


# ----------------------------------------------------------------------------- RoPE


def precompute_freqs_cis(args, N, device=None):
    """Rotations e^{i t f} for positions t < N: (N, head_dim // 2) complex64, in float32 as Meta's and HF's
    references compute them. Position Interpolation divides every frequency by s, which is the same as
    dividing the positions by s. YaRN's attention factor is their length (it scales q and k)."""
    D, magnitude = args.head_dim, 1.0
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, D, 2, device=device)[: D // 2].float() / D))
    if args.use_scaled_rope:
        freqs = hf.llama31_scale(freqs, args)
    if args.rope_yarn:
        freqs, magnitude = hf.yarn_scale(freqs, args)
    freqs = freqs / args.rope_interpolation
    t = torch.arange(N, device=device, dtype=torch.float32)
    angles = torch.outer(t, freqs)  # (N, D/2)
    return torch.polar(torch.full_like(angles, magnitude), angles)


def apply_rotary_emb(x, rope):
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... of x (B, N, heads, D) as in Meta's reference, the
    complex product (x0 + i x1) e^{i t f} written out in real numbers (which torch.compile can fuse); rope:
    view_as_real(precompute_freqs_cis(...)), (N, D/2, 2) cos and sin, or (B, N, D/2, 2) for packed rows."""
    x0, x1 = x.float().reshape(*x.shape[:-1], -1, 2).unbind(-1)  # (B, N, heads, D/2) each
    cos, sin = rope.reshape(-1, x.shape[1], 1, x0.shape[-1], 2).unbind(-1)  # (1 or B, N, 1, D/2) each
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), -1).flatten(3).type_as(x)  # (B, N, heads, D)


# ----------------------------------------------------------------------------- modules


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.q_norm = RMSNorm(args.head_dim, args.norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(args.head_dim, args.norm_eps) if args.qk_norm else None
        self.group_size = None  # None: full causal attention; an int: S2-Attn with groups of that many tokens
        self.backend = "sdpa"
        self.shift = True  # False: groups without the shift (the paper's Table 1 ablation)
        self.s2_attention = s2_attention  # parallel.py swaps in its own for context parallelism

    def forward(self, x, rope, cache=None, documents=None):
        B, N, _ = x.shape
        q = self.wq(x).view(B, N, self.n_heads, self.head_dim)  # (B, N, H, D)
        k = self.wk(x).view(B, N, self.n_kv_heads, self.head_dim)  # (B, N, Hkv, D)
        v = self.wv(x).view(B, N, self.n_kv_heads, self.head_dim)  # (B, N, Hkv, D)
        if self.q_norm is not None:  # Qwen3: each head of q and of k normalised
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary_emb(q, rope), apply_rotary_emb(k, rope)
        if cache is not None:  # generation: this layer's keys and values of the earlier tokens
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], dim=1), torch.cat([cache["v"], v], dim=1)  # (B, Nk, Hkv, D)
            cache["k"], cache["v"] = k, v
        if k.shape[1] > N:
            if self.group_size is not None:
                raise ValueError("generation with a KV cache uses full attention: set_attention(group_size=None)")
            out = cached_attention(q, k, v)
        elif self.group_size is None:
            out = full_attention(q, k, v, backend=self.backend, documents=documents)
        else:
            kw = dict(backend=self.backend, shift=self.shift, documents=documents)
            out = self.s2_attention(q, k, v, self.group_size, **kw)
        return self.wo(out.reshape(B, N, -1))  # (B, N, H * D) -> (B, N, dim)


class FeedForward(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, rope, cache=None, documents=None):
        h = x + self.attention(self.attention_norm(x), rope, cache, documents)
        return h + self.feed_forward(self.ffn_norm(h))


class KVCache:
    """Keys and values of every layer for the tokens seen so far, so that generation computes each new
    token from its own projections alone: m(prompt, positions=c), then m(next_token, positions=c), ..."""

    def __init__(self, n_layers):
        self.layers = [{} for _ in range(n_layers)]
        self.pos = 0


class Transformer(nn.Module):
    def __init__(self, args):
        super().__init__()
        if args.vocab_size <= 0:
            raise ValueError("vocab_size is not set (-1 in params.json: take it from the tokenizer or the weights)")
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = None if args.tie_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        self.beyond_context = False  # True: run sequences longer than args.max_seq_len (to measure what happens)
        self.nll, self.loss_chunk = chunked_nll, 2048  # the loss, 2048 positions at a time (parallel.py: its own)

    def forward(self, tokens, targets=None, *, reduction="sum", last_only=False, positions=None):
        """tokens (B, N) LongTensor -> logits (B, N, vocab_size); last_only: the last position's, (B, 1, vocab).
        With targets (B, N), the next-token loss instead: -log p(targets[b, i] | tokens[b, :i + 1]), summed
        (reduction="sum") or per position (reduction="none", (B, N)), 0 where a target is IGNORE; computed
        self.loss_chunk positions at a time. positions: where the tokens sit, if not at 0, 1, ..., N - 1:
            a KVCache  they continue the tokens it has seen (generation), whose keys and values it keeps;
            an int p   they are at p, p + 1, ... of longer sequences (context parallelism: this process's slice);
            a tensor   (B, N) ids of the documents packed into each row (s2attn.s2_attention's documents):
                       each attends only to itself and its positions start at 0, as if it ran alone."""
        if reduction not in ("sum", "none"):
            raise ValueError(f"reduction={reduction!r}: 'sum' (the summed loss) or 'none' (per token)")
        cache = positions if isinstance(positions, KVCache) else None
        documents = positions if torch.is_tensor(positions) else None
        start = cache.pos if cache is not None else positions if isinstance(positions, int) else 0
        if not (positions is None or cache or documents is not None or isinstance(positions, int) and start >= 0):
            raise TypeError(f"positions: a KVCache, a first position >= 0 or (B, N) document ids, not {positions!r}")
        if start + tokens.shape[1] > self.args.max_seq_len and not self.beyond_context:
            raise ValueError(
                f"{start + tokens.shape[1]} tokens are more than the model's context of {self.args.max_seq_len}: "
                "extend it with m.extend_context(factor), or set m.beyond_context = True to run past it anyway"
            )
        h = self.tok_embeddings(tokens)  # (B, N, dim)
        freqs_cis = precompute_freqs_cis(self.args, start + tokens.shape[1], device=h.device)[start:]  # (N, D/2)
        if documents is not None:
            freqs_cis = freqs_cis[document_positions(documents, tokens)]  # (B, N, D/2): positions per document
        rope = torch.view_as_real(freqs_cis)  # (..., D/2, 2): cos, sin
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, None if cache is None else cache.layers[i], documents)
        if cache is not None:
            cache.pos += tokens.shape[1]
        h = self.norm(h)
        w = self.tok_embeddings.weight if self.output is None else self.output.weight
        if targets is None:
            return F.linear(h[:, -1:] if last_only else h, w)
        # The loss runs here, in the forward, not on logits returned to the caller: with FSDP2 the output weight is
        # gathered only during the root's forward; chunked: a whole sequence's float32 logits (32k x 32k: 4 GB) never
        # exist at once (chunked_nll keeps each chunk's for backward; parallel.training_nll, none of them).
        nll = self.nll(h, w, targets, self.loss_chunk)
        return nll.sum() if reduction == "sum" else nll

    def extend_context(self, factor, method="pi"):
        """A context `factor` times as long. method="pi": Position Interpolation, LongLoRA's (paper §3, after
        Chen et al. 2023): positions are divided by `factor` (on top of any interpolation the model has), so the
        longer context maps onto the positions it was trained on. method="yarn": YaRN (Peng et al. 2023): only
        the slow frequencies are interpolated, and attention is sharpened. Fine-tuning then uses the new ones."""
        a = self.args
        if factor < 1 or method not in ("pi", "yarn"):
            raise ValueError(f"extend_context({factor}, {method!r}): a factor of at least 1, method 'pi' or 'yarn'")
        if factor == 1:
            return self
        if method == "yarn" and (a.use_scaled_rope or a.rope_interpolation != 1):
            raise ValueError("YaRN does not stack on Position Interpolation or Llama 3.1's scaling: use method='pi'")
        if method == "pi" and a.rope_yarn:
            raise ValueError(f"this model's RoPE is YaRN (factor {a.rope_scaling_factor:g}): use method='yarn'")
        if method == "yarn":
            if not a.rope_yarn:  # the context so far becomes YaRN's original one
                a.rope_yarn, a.rope_scaling_factor, a.rope_original_context = True, 1.0, a.max_seq_len
            a.rope_scaling_factor *= factor
        else:
            a.rope_interpolation *= factor
        a.max_seq_len = int(a.max_seq_len * factor)
        return self

    def set_attention(self, group_size=None, backend=None, shift=True):
        """Switch every layer to full attention (group_size=None) or S2-Attn, and optionally the backend;
        shift=False keeps every head in unshifted groups (short attention, an ablation)."""
        check_config(group_size, backend or self.layers[0].attention.backend)
        for layer in self.layers:
            layer.attention.group_size = group_size
            layer.attention.backend = backend or layer.attention.backend
            layer.attention.shift = shift
        return self


IGNORE = -100  # a target the loss skips (as torch's cross_entropy): prompts of SFT examples, right padding


def chunked_nll(h, w, targets, chunk):
    """-log p(target) at every position: h (B, N, dim) final hidden states, w (vocab, dim) the output
    weight, targets (B, N) -> (B, N) in float32 or wider, 0 where the target is IGNORE. The projection and
    the loss run over `chunk` positions at a time (of the B * N, rows one after another: each chunk a
    contiguous (chunk, dim) matrix, so its projection is one matmul). Training keeps no chunk's logits for
    backward either: parallel.py puts its own in the model (Transformer.nll)."""
    nll = [nll_of(log_probs(F.linear(hs, w)), ts) for hs, ts in chunks(h, targets, chunk)]
    return torch.cat(nll).view(targets.shape)


def chunks(h, targets, chunk):
    """(hs, ts) pairs of `chunk` positions of the flattened (B * N, dim) states and their (B * N) targets."""
    return zip(h.flatten(0, 1).split(chunk), targets.flatten().split(chunk))


def log_probs(logits):
    """log softmax over the vocabulary (the last dim), in float32 or wider: bf16 logits get a float32 loss."""
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)


def nll_of(logp, targets):
    """(..., vocab) log probabilities, (...) targets -> (...) -log p(target); 0 at IGNORE: cross_entropy, with
    the classes last (on CPU the (B, vocab, chunk) layout is ten times less accurate)."""
    nll = F.nll_loss(logp.flatten(0, -2), targets.flatten(), ignore_index=IGNORE, reduction="none")
    return nll.view(targets.shape)


def default_dtype(device):
    """The compute dtype's name where none is asked for: bfloat16 on CUDA, float32 elsewhere (faster on CPUs)."""
    return "bfloat16" if torch.device(device).type == "cuda" else "float32"


def forward_flops(args, seq_len, group_size=None):
    """FLOPs of one forward pass over one sequence of `seq_len` tokens, split as the paper's Table 7:
    attn (the two attention matmuls, QK^T and AV), proj (wq, wk, wv, wo), ffn (w1, w2, w3 and the SiLU
    gate), others (LM head, RMSNorms, RoPE, residual adds). A matmul (m, k) @ (k, n) is 2mkn; an
    elementwise op is 1 per element (RMSNorm 4: square, sum, scale, weight; RoPE 3: a complex product).
    Attention scores count the whole square, masked half included, as the paper does; with `group_size`
    (S2-Attn) the squares of the groups. Llama 2 7B: Table 7 to its 0.1 TFLOP (tests/test_model.py)."""
    N, d, L, hd = seq_len, args.dim, args.n_layers, args.head_dim
    G = group_size or N
    pairs = (N // G) * G * G + (N % G) ** 2  # query-key pairs per head
    q, kv = args.n_heads * hd, args.n_kv_heads * hd  # widths of the query and key/value projections
    return {
        "attn": L * args.n_heads * 2 * 2 * pairs * hd,
        "proj": L * 2 * N * d * (2 * q + 2 * kv),
        "ffn": L * (2 * N * d * 3 * args.hidden_dim + 2 * N * args.hidden_dim),
        "others": 2 * N * d * args.vocab_size + N * (L * (2 * 4 * d + 3 * (q + kv) + 2 * d) + 4 * d),
    }


# ----------------------------------------------------------------------------- loading


class Weights(Mapping):
    """name -> tensor of a checkpoint (Meta's names and layout, full size, stored dtype), each read when asked
    for; `shapes` and `dtype` (the embedding's) without reading. parallel.materialize keeps each rank's rows."""

    def __init__(self, shapes, read, dtype):
        self.shapes, self._read, self.dtype = shapes, read, dtype

    __getitem__ = lambda self, name: self._read(name)  # noqa: E731
    __iter__ = lambda self: iter(self.shapes)  # noqa: E731
    __len__ = lambda self: len(self.shapes)  # noqa: E731


def read_checkpoint(path):
    """(ModelArgs, Weights) of a Meta folder (params.json + consolidated.NN.pth, any number of
    model-parallel shards) or a Hugging Face folder (config.json + *.safetensors, sharded or not), after
    checking that the weights' names and shapes match the config. Nothing is read yet but the headers."""
    path = Path(path)
    if (path / "params.json").is_file():
        args, weights = _read_meta(path)
    elif (path / "config.json").is_file():
        args = ModelArgs(**hf.args_fields(hf.read_json(path / "config.json"), path / "config.json"))
        weights = Weights(*hf.read_weights(path, args))
    else:
        what = f"no checkpoint in {path}" if path.is_dir() else f"{path} is not a folder"
        raise FileNotFoundError(f"{what}: give a Meta folder (params.json + consolidated.NN.pth) or an HF one")
    with torch.device("meta"):
        want = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    got = weights.shapes
    problems = [f"missing {k}" for k in sorted(want.keys() - got.keys())]
    problems += [f"unexpected {k}" for k in sorted(got.keys() - want.keys())]
    problems += [f"{k} is {tuple(got[k])}, the config says {tuple(s)}" for k, s in want.items() if got.get(k, s) != s]
    if problems:
        listed = "\n  ".join(problems[:8] + [f"... and {len(problems) - 8} more"] * (len(problems) > 8))
        raise ValueError(f"the weights in {path} do not match its config:\n  {listed}\n{args}\nIs it their config?")
    return args, weights


def load(path, dtype=None, device="cpu"):
    """A Transformer from a checkpoint folder (read_checkpoint), in the stored dtype unless `dtype` is given:
    built on the meta device and filled one tensor at a time, so a checkpoint is never held twice in memory."""
    return build(*read_checkpoint(path), dtype, device)


def build(args, weights, dtype=None, device="cpu"):
    """A Transformer of `args` filled from `weights` (read_checkpoint's, or parallel.random_weights'), one
    tensor at a time, in `dtype` (None: as stored) on `device`."""
    with torch.device("meta"):
        m = Transformer(args)
    m.load_state_dict(
        {k: weights[k].to(device=device, dtype=dtype or weights.dtype) for k in weights}, strict=True, assign=True
    )
    return m


def read_params(f, required=("dim", "n_layers", "n_heads")):
    """ModelArgs from a params.json file `f` (Meta's fields; vocab_size too where no weights tell it)."""
    return ModelArgs(**_args_from(hf.read_json(f, required), f))


def _args_from(d, source):
    known = {f.name for f in fields(ModelArgs)}
    unknown = sorted(d.keys() - known)
    if unknown:
        warnings.warn(f"{source}: ignoring keys this model does not use: {unknown}")
    return {k: v for k, v in d.items() if k in known}


def _read_meta(path):
    files = sorted(path.glob("consolidated.*.pth"))
    if not files:
        raise FileNotFoundError(f"{path} has params.json but no consolidated.NN.pth weight files")
    params = hf.read_json(path / "params.json", required=("dim", "n_layers", "n_heads"))
    shards = [_torch_load(f) for f in files]
    for f, shard in zip(files[1:], shards[1:]):  # model-parallel shards are equal slices of every tensor
        for k in shards[0].keys() | shard.keys():
            if k not in shard or k not in shards[0] or shard[k].shape != shards[0][k].shape:
                got = lambda s: tuple(s[k].shape) if k in s else "absent"  # noqa: E731
                raise ValueError(
                    f"shards of different sizes: {k} is {got(shards[0])} in {files[0].name} but {got(shard)} in "
                    f"{f.name}; the folder mixes checkpoints"
                )
    split = {}  # name -> the dim its shards are concatenated on (None: replicated, or a single shard)
    for k, t in shards[0].items():
        if k == "rope.freqs":  # Llama 2 files carry the RoPE table; it is recomputed
            continue
        name = k.split(".")[-2]
        if len(shards) == 1 or name.endswith("norm"):  # norms are replicated
            split[k] = None
        elif name == "tok_embeddings":  # Llama 2 splits the embedding on dim 1, Llama 3 on the vocabulary
            split[k] = 0 if t.shape[1] == params["dim"] else 1
        elif name in _META_SPLIT:
            split[k] = _META_SPLIT[name]
        else:
            raise ValueError(f"{k} in {path}: unknown parameter, cannot merge shards")
    whole = lambda k, d: [n * len(shards) if i == d else n for i, n in enumerate(shards[0][k].shape)]  # noqa: E731
    shapes = {k: torch.Size(whole(k, d)) for k, d in split.items()}
    read = lambda k: shards[0][k] if split[k] is None else torch.cat([s[k] for s in shards], dim=split[k])  # noqa: E731
    sd = Weights(shapes, read, shards[0]["tok_embeddings.weight"].dtype)
    if "output.weight" not in shapes and "tok_embeddings.weight" in shapes:  # no head: it shares the embedding
        params["tie_embeddings"] = True
    if params.get("vocab_size", -1) <= 0:
        params["vocab_size"] = shapes["tok_embeddings.weight"][0]
    if "max_seq_len" not in params and params.get("rope_theta") == 500000.0:  # Meta's files omit it
        params["max_seq_len"] = 131072 if params.get("use_scaled_rope") else 8192  # Llama 3.1 / 3
    return ModelArgs(**_args_from(params, path / "params.json")), sd


_META_SPLIT = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}  # model-parallel split dims


def _torch_load(f):
    try:
        return torch.load(f, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        raise ValueError(
            f"cannot read {f}: {e}\nincomplete or not a PyTorch checkpoint; download or save it again"
        ) from e


# ----------------------------------------------------------------------------- saving


_CHECKPOINT_GLOBS = "params.json consolidated.*.pth config.json *.safetensors model.safetensors.index.json".split()


def save(model, path, format="meta", overwrite=False, max_shard_bytes=5 * 2**30):
    """Write `model` to the folder `path` as a Meta checkpoint (params.json + consolidated.00.pth) or a
    Hugging Face one (config.json + safetensors, sharded above max_shard_bytes). Both keep the RoPE
    settings, Position Interpolation included, so load(path) rebuilds the same model. Files are written
    under temporary names and renamed, so a failed save leaves what was there before."""
    if format not in ("meta", "hf"):
        raise ValueError(f"format must be 'meta' or 'hf', got {format!r}")
    if format == "meta" and model.args.model_type != "llama":
        raise ValueError(f"format='meta' holds Meta's Llama; a {model.args.model_type} model saves with format='hf'")
    path = Path(path)
    old = sorted({p for g in _CHECKPOINT_GLOBS for p in path.glob(g)}) if path.is_dir() else []
    if old and not overwrite:
        raise FileExistsError(
            f"{path} already holds a checkpoint ({old[0].name}, ...); pass overwrite=True or choose another folder"
        )
    args = model.args
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    if format == "meta":
        files = {
            "consolidated.00.pth": lambda f: torch.save(sd, f),
            "params.json": lambda f: f.write_text(json.dumps(asdict(args), indent=2)),
        }
    else:
        files = hf.files(args, sd, max_shard_bytes)
    path.mkdir(parents=True, exist_ok=True)
    for name, write in files.items():
        tmp = path / f".{name}.tmp"
        write(tmp)
        os.replace(tmp, path / name)
    for p in old:
        if p.name not in files:
            p.unlink()
