"""Causal attention for LongLoRA: full attention and Shifted Sparse Attention (S2-Attn).

    from s2attn import full_attention, s2_attention, BACKENDS
    out = full_attention(q, k, v, backend="sdpa")                  # inference, evaluation
    out = s2_attention(q, k, v, group_size=G, backend="sdpa")      # long-context fine-tuning

Names, as in the paper's Algorithm 1 (used the same way in every file):
    B batch, N tokens, H query heads, Hkv key/value heads (H % Hkv == 0: grouped-query attention),
    D head dim, G group size in tokens.  q: (B, N, H, D)   k, v: (B, N, Hkv, D)   out: (B, N, H, D)
    Query head h reads key/value head h // (H // Hkv).

S2-Attn (paper §3.2). Heads h < H // 2 attend inside groups [0, G), [G, 2G), ...; heads h >= H // 2
inside groups shifted by half a group, [0, G/2), [G/2, 3G/2), .... Within a group attention is
causal. The shifted half lets information cross group borders, so a model fine-tuned this way still
works with full attention at inference. The paper writes it in two lines (Algorithm 1):

    qkv = cat((qkv.chunk(2, 3)[0], qkv.chunk(2, 3)[1].roll(-G/2, 1)), 3).view(B*N/G, G, 3, H, D)
    out = self_attn(qkv)
    out = cat((out.chunk(2, 2)[0], out.chunk(2, 2)[1].roll(G/2, 1)), 2)

The roll wraps around: the shifted heads' last group holds the last G/2 tokens *followed by* the first
G/2, so under the causal mask the first tokens read the last ones, i.e. the future. (The official
repository's flash path avoids this with variable-length segments; its naive path does not, so its
two paths compute different functions.) Here the first half-group of the shifted heads is a group of
its own and nothing ever reads the future; N need not be a multiple of G (the last group of each half
is shorter). All three backends compute exactly this function, and the tests check it:

    naive  the definition: an explicit (H, N, N) mask, scores and softmax in float32. O(N^2) memory.
    sdpa   groups folded into the batch dimension, one causal scaled_dot_product_attention call per
           half of the heads; SDPA picks its kernel (`python bench.py attn` names the one each row ran).
    flash  the groups as the variable-length sequences (cu_seqlens) of flash-attn's
           flash_attn_varlen_func, or of PyTorch's own FlashAttention-2 varlen kernel without it.

Packed documents (`documents=`, several documents per row): S2-Attn runs on each document alone, its
groups counted from its first token. Groups and documents are both segments, in which attention is causal;
`segments` is the one rule that says where they start, for every backend and for `s2_mask`.
"""

import functools
import inspect
import math

import torch
import torch.nn.functional as F

try:
    from flash_attn import flash_attn_varlen_func
except ImportError:  # flash-attn needs CUDA to build; without it the flash backend uses torch's kernel
    flash_attn_varlen_func = None
try:
    from torch.nn.attention.varlen import varlen_attn as torch_varlen_attn
except ImportError:  # torch < 2.10
    torch_varlen_attn = None

ALL_BACKENDS = ("naive", "sdpa", "flash")
_HAS_VARLEN = flash_attn_varlen_func is not None or torch_varlen_attn is not None
BACKENDS = ALL_BACKENDS if (torch.cuda.is_available() and _HAS_VARLEN) else ("naive", "sdpa")

# ----------------------------------------------------------------------------- the definition


def s2_mask(N, H, group_size, device=None, shift=True, documents=None):
    """S2-Attn as a mask: (H, N, N) bool, True where query i of head h may read key j, i.e. j <= i and
    both lie in one segment: a group [0, G), [G, 2G), ... for heads h < H // 2, a shifted group [0, G/2),
    [G/2, 3G/2), ... for the others (segments). group_size=None: full attention; shift=False: no head
    is shifted. documents (B, N): the mask of each row, (B, H, N, N), no segment spanning two documents."""
    pos = torch.arange(N, device=device)[None] if documents is None else positions(documents)  # (1 or B, N)
    G = group_size or N  # full attention: one group (per document)

    def same_segment(first):  # (1 or B, N, N): key j <= query i, both in one segment
        segment = segments(pos, G, first).cumsum(-1)  # (1 or B, N): each token's segment number
        return (segment[:, :, None] == segment[:, None, :]) & torch.ones(N, N, dtype=torch.bool, device=device).tril()

    plain, shifted = same_segment(G), same_segment(G // 2 or G)  # (G = 1 has no half-group)
    is_shifted = lambda h: shift and group_size is not None and h >= H // 2  # noqa: E731
    mask = torch.stack([shifted if is_shifted(h) else plain for h in range(H)], dim=1)  # (1 or B, H, N, N)
    return mask[0] if documents is None else mask


def segments(pos, G, first):
    """THE boundary rule of every backend and of s2_mask: (B, N) bool, True where a segment (a group in
    which attention is causal) starts. pos (B, N): each token's position in its document. A segment starts
    at every document's first token and, inside a document, at positions first, first + G, first + 2G, ...
    (the unshifted heads: first = G; the shifted: first = G // 2; full attention: G = first = N)."""
    return (pos == 0) | ((pos >= first) & ((pos - first) % G == 0))


def positions(documents, like=None):
    """Each token's position in its document: documents (B, N), integer ids non-decreasing along each row
    (a new id starts a new document) -> (B, N) int64, counting from 0 at every document's first token.
    documents=None: None (one document per row, where the kernels need no positions)."""
    if documents is None:
        return None
    if like is not None and documents.shape != like.shape[:2]:
        raise ValueError(f"documents {tuple(documents.shape)} must be (B, N) = {tuple(like.shape[:2])}")
    if (documents[:, 1:] < documents[:, :-1]).any():
        raise ValueError("documents: the ids must be non-decreasing along each row (one id per packed document)")
    i = torch.arange(documents.shape[1], device=documents.device).expand(documents.shape)
    new = torch.ones_like(documents, dtype=torch.bool)
    new[:, 1:] = documents[:, 1:] != documents[:, :-1]  # where a document starts
    return i - torch.where(new, i, 0).cummax(dim=1).values  # minus its document's first position


# ----------------------------------------------------------------------------- attention


def s2_attention(q, k, v, group_size, backend="sdpa", shift=True, documents=None):
    """Shifted sparse attention with groups of `group_size` tokens (see the module docstring).
    shift=False: every head attends in the unshifted groups, the "short attention" that the paper's
    Table 1 shows fails to carry over to full attention at inference.
    documents: (B, N) integer ids, non-decreasing along each row, of several documents packed into each
    row: S2-Attn then runs on each document alone, its groups counted from its first token (segments)."""
    _check(q, k, v, backend)
    check_config(group_size, backend)
    if group_size is None:
        raise ValueError("s2_attention needs a group_size in tokens; for full attention call full_attention")
    G, pos = group_size, positions(documents, q)
    if backend == "naive":
        return _naive(q, k, v, s2_mask(q.shape[1], q.shape[2], G, device=q.device, shift=shift, documents=documents))
    if not shift:
        return _attend(q, k, v, G, first=G, backend=backend, pos=pos)
    (q1, k1, v1), (q2, k2, v2) = split_heads(q, k, v)  # heads [0, H // 2) and [H // 2, H)
    # The first half of the heads: groups [0, G), [G, 2G), ...
    out1 = _attend(q1, k1, v1, G, first=G, backend=backend, pos=pos)  # (B, N, H // 2, D)
    # The second half: groups shifted by half a group. The paper rolls these heads by -G/2, which wraps
    # the first half-group around to the end of the sequence, where it reads the future. We start a new
    # group at G/2 instead, [0, G/2), [G/2, 3G/2), ...: nothing wraps. (G = 1 has no half-group.)
    out2 = _attend(q2, k2, v2, G, first=G // 2 or G, backend=backend, pos=pos)  # (B, N, H - H // 2, D)
    return torch.cat([out1, out2], dim=2)  # (B, N, H, D)


def full_attention(q, k, v, backend="sdpa", documents=None):
    """Causal attention over the whole sequence. q: (B, N, H, D), k, v: (B, N, Hkv, D) -> (B, N, H, D).
    documents: (B, N) ids of packed documents (see s2_attention); each token reads only its own."""
    _check(q, k, v, backend)
    N = q.shape[1]
    if backend == "naive":
        return _naive(q, k, v, s2_mask(N, q.shape[2], group_size=None, device=q.device, documents=documents))
    return _attend(q, k, v, N, first=N, backend=backend, pos=positions(documents, q))  # one group


def group_attention(q, k, v, G, first, backend="sdpa", pos=None):
    """Causal attention inside the groups [0, first), [first, first + G), [first + G, first + 2G), ... of
    each sequence, through the sdpa or flash kernel: the step that S2-Attn's two halves of the heads,
    and full attention (one group), are made of. q: (B, N, Hq, D), k, v: (B, N, Hkv, D) -> (B, N, Hq, D).
    pos (B, N): each token's position in its packed document (positions); the groups are then counted in
    each document, and a document's first token starts a group too (segments)."""
    if q.shape[2]:  # (no heads, the first half of H = 1: nothing to check, nor to run)
        _check(q, k, v, backend)
    if backend not in _KERNELS:
        raise ValueError(f"group_attention runs the sdpa and flash kernels, not {backend!r} (the definition: s2_mask)")
    return _attend(q, k, v, G, first, backend, pos)


def _attend(q, k, v, G, first, backend, pos=None):
    """group_attention on inputs checked already (s2_attention and full_attention check theirs once)."""
    return q if q.shape[2] == 0 else _KERNELS[backend](q, k, v, G, first, pos)  # (no heads: the first half of H = 1)


def split_heads(q, k, v):
    """(q, k, v) of heads [0, H//2) and of heads [H//2, H), each with the kv heads it reads."""
    H, Hkv = q.shape[2], k.shape[2]
    half, r = H // 2, H // Hkv  # query heads in the first half; query heads per kv head
    if half % r:  # a kv head serves query heads in both halves: give each half its own copy
        (k, v), r = repeat_kv(k, v, r, dim=2), 1  # (B, N, H, D)
    kv = half // r  # kv heads of the first half
    return (q[:, :, :half], k[:, :, :kv], v[:, :, :kv]), (q[:, :, half:], k[:, :, kv:], v[:, :, kv:])


def cached_attention(q, k, v):
    """Causal attention for generation with a KV cache: the Nq queries are the last Nq of the Nk positions
    that k and v hold. q: (B, Nq, H, D), k, v: (B, Nk, Hkv, D) -> (B, Nq, H, D). Always full attention,
    through SDPA: decoding steps are small."""
    Nq, Nk = q.shape[1], k.shape[1]
    # key j <= Nk - Nq + i
    mask = None if Nq == 1 else torch.ones(Nq, Nk, dtype=torch.bool, device=q.device).tril(Nk - Nq)
    # (B, Nq, H, D)
    return _sdpa_call(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask).transpose(1, 2)


def repeat_kv(k, v, r, dim):
    """k and v with each head repeated r times along `dim`, for a step that needs one kv head per query head."""
    return k.repeat_interleave(r, dim=dim), v.repeat_interleave(r, dim=dim)


# ----------------------------------------------------------------------------- the kernels


def _naive(q, k, v, mask):
    """The reference: explicit scores, mask and softmax (float32 or wider). mask: (H, N, N) bool."""
    B, N, H, D = q.shape
    dt = torch.promote_types(q.dtype, torch.float32)
    qt, kt, vt = (x.transpose(1, 2).to(dt) for x in (q, k, v))  # (B, H or Hkv, N, D)
    kt, vt = repeat_kv(kt, vt, H // k.shape[2], dim=1)  # (B, H, N, D)
    scores = qt @ kt.transpose(-2, -1) / math.sqrt(D)  # (B, H, N, N)
    scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ vt  # (B, H, N, D)
    return out.transpose(1, 2).to(q.dtype)  # (B, N, H, D)


def _sdpa(q, k, v, G, first, pos=None):
    """group_attention through scaled_dot_product_attention. pos: packed documents (_sdpa_segments).

    Zeros pad every group to G tokens: the first group after its `first` tokens, the last at the end.
    Padding only ever sits after the real tokens of its group, where the causal mask hides it, so no
    key mask is needed and every group is one batch entry of a single dense, causal SDPA call.
    """
    if pos is not None:
        return _sdpa_segments(q, k, v, segments(pos, G, first))
    B, N, Hq, D = q.shape
    first = min(first, N)
    front = G - first if first < N else 0  # zeros after the first group
    tail = -(N + front) % G  # zeros after the last group
    n = (N + front + tail) // G  # groups per sequence

    def grouped(x):  # (B, N, heads, D) -> (B * n, heads, G, D)
        if front or tail:  # (no copy where the groups tile the sequence already)
            zeros = lambda length: x.new_zeros(B, length, *x.shape[2:])  # noqa: E731
            x = torch.cat([x[:, :first], zeros(front), x[:, first:], zeros(tail)], dim=1)  # (B, n * G, heads, D)
        return x.reshape(B * n, G, *x.shape[2:]).transpose(1, 2)  # (a view where it can be)

    out = _sdpa_call(grouped(q), grouped(k), grouped(v), is_causal=True)  # (B * n, Hq, G, D)
    out = out.transpose(1, 2).reshape(B, n * G, Hq, D)  # (B, n * G, Hq, D)
    return torch.cat([out[:, :first], out[:, first + front : N + front]], dim=1)  # (B, N, Hq, D): the padding dropped


def _sdpa_segments(q, k, v, starts):
    """Causal attention inside the segments that `starts` (B, N) opens (segments), as _sdpa does with
    groups: every segment one batch entry of one dense SDPA call, zeros after its tokens up to the longest
    segment's length L. The S segments' count and L are read on the host (two syncs)."""
    B, N, Hq, D = q.shape
    flat = starts.flatten()  # (B * N,): each row starts a segment, so none spans two rows
    begin = flat.nonzero().squeeze(1)  # (S,) where each segment starts in the flattened batch
    S, seg = begin.shape[0], flat.cumsum(0) - 1  # seg: each token's segment
    L = int(torch.diff(begin, append=begin.new_full((1,), B * N)).max())
    slot = seg * L + torch.arange(B * N, device=q.device) - begin[seg]  # each token's place in (S, L)

    def grouped(x):  # (B, N, heads, D) -> (S, heads, L, D)
        padded = x.new_zeros(S * L, *x.shape[2:]).index_copy(0, slot, x.flatten(0, 1))
        return padded.view(S, L, *x.shape[2:]).transpose(1, 2)

    out = _sdpa_call(grouped(q), grouped(k), grouped(v), is_causal=True)  # (S, Hq, L, D)
    return out.transpose(1, 2).reshape(S * L, Hq, D)[slot].view(B, N, Hq, D)  # the padding dropped


def _sdpa_call(q, k, v, **kw):
    """scaled_dot_product_attention on (B, heads, N, D) tensors, k and v with fewer heads under GQA. On
    CUDA only the flash kernel (float16/bfloat16) takes GQA natively; in float32 the one fused kernel,
    memory-efficient attention, has no GQA, and SDPA would fall back to the math kernel's (B, H, N, N)
    float32 scores. There the kv heads are repeated instead, which costs only k and v's size."""
    r = q.shape[1] // k.shape[1]
    if r > 1 and q.is_cuda and q.dtype not in (torch.float16, torch.bfloat16):
        (k, v), r = repeat_kv(k, v, r, dim=1), 1
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=r > 1, **kw)


def _flash(q, k, v, G, first, pos=None):
    """group_attention as the variable-length sequences of one packed batch: no padding, no wasted work.
    pos: packed documents, whose segments (segments) are the sequences instead; their count and longest
    length are read on the host (two syncs)."""
    B, N, Hq, D = q.shape
    first = min(first, N)
    i32 = dict(dtype=torch.int32, device=q.device)
    end = torch.full((1,), B * N, **i32)
    if pos is None:
        max_len = max(first, min(G, N - first))  # the longest group
        # cu_seqlens, the groups' starts in the packed batch, made on the device (a host list copied there
        # would be a blocking copy on every call)
        starts = torch.cat([torch.zeros(1, **i32), torch.arange(first, N, G, **i32)])  # (groups per sequence,)
        per_seq = torch.arange(B, **i32)[:, None] * N  # (B, 1): where each sequence starts
        cu = torch.cat([(per_seq + starts).flatten(), end])  # (B * groups + 1,)
    else:  # the segments of packed documents
        cu = torch.cat([segments(pos, G, first).flatten().nonzero().squeeze(1).to(torch.int32), end])  # (S + 1,)
        max_len = int((cu[1:] - cu[:-1]).max())
    q, k, v = (x.reshape(B * N, x.shape[2], D) for x in (q, k, v))  # (B * N, heads, D)
    if flash_attn_varlen_func is not None:
        out = flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=True)
    else:
        out = _torch_varlen(q, k, v, cu, max_len)
    return out.view(B, N, Hq, D)


_KERNELS = {"sdpa": _sdpa, "flash": _flash}

# ----------------------------------------------------------------------------- kernel versions and checks
# What differs across torch releases, in one place (the facts: docs/training.md, "Attention kernels").


def _torch_varlen(q, k, v, cu, max_len):
    """torch.nn.attention.varlen.varlen_attn: 2.10 takes is_causal; 2.11 window_size, (-1, 0) being
    causal, and no GQA; 2.13 adds enable_gqa. It calls the FlashAttention-2 kernel as it is, which takes
    head dims that are multiples of 8 up to 256 (flash-attn's own function pads them)."""
    if q.shape[-1] % 8 or q.shape[-1] > 256:
        raise ValueError(
            f"backend 'flash' without flash-attn takes head dims that are multiples of 8 up to 256, not "
            f"{q.shape[-1]}: use backend='sdpa' (or pip install flash-attn)"
        )
    kw = {"is_causal": True} if "is_causal" in _parameters(torch_varlen_attn) else {"window_size": (-1, 0)}  # causal
    if k.shape[1] != q.shape[1]:
        if flash_repeats_kv():
            k, v = repeat_kv(k, v, q.shape[1] // k.shape[1], dim=1)  # (B * N, Hq, D)
        else:
            kw["enable_gqa"] = True
    return torch_varlen_attn(q, k, v, cu, cu, max_len, max_len, **kw)


def flash_repeats_kv():
    """True where the flash backend copies k and v once per query head under GQA (and the kernel keeps
    those copies for backward): torch's own varlen kernel before 2.13, which has no enable_gqa, runs
    without flash-attn. Read from its C++, 2.11's kernel may take fewer kv heads as they are:
    tests/test_s2attn.py::test_varlen_kernel_takes_gqa_without_repeated_kv_cuda (gpu_check's cuda-tests)
    settles it; once it passes on a GPU with torch 2.11, this can be False there."""
    return (
        flash_attn_varlen_func is None
        and torch_varlen_attn is not None
        and "enable_gqa" not in _parameters(torch_varlen_attn)
    )


@functools.cache
def _parameters(kernel):
    """The names `kernel` takes: read once, not in every attention call."""
    return tuple(inspect.signature(kernel).parameters)


def check_config(group_size, backend):
    """Raise a clear error for an unknown backend, or a group size that is neither None (full attention)
    nor a positive int. Callers that store a configuration (the model) check it when it is set."""
    if backend not in ALL_BACKENDS:
        raise ValueError(
            f"unknown attention backend {backend!r}; choose one of {ALL_BACKENDS} (this machine runs {BACKENDS})"
        )
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"group_size must be a positive int (tokens), or None for full attention; got {group_size!r}")


def _check(q, k, v, backend):
    """Fail early, with a message that says what to do, instead of deep inside a kernel."""
    check_config(None, backend)
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(
            f"expected q (B, N, H, D) and k, v (B, N, Hkv, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    (B, N, H, D), (Bk, Nk, Hkv, Dk) = q.shape, k.shape
    if (B, N, D) != (Bk, Nk, Dk):
        raise ValueError(f"q {tuple(q.shape)} and k, v {tuple(k.shape)} must agree on B, N and D")
    if H % Hkv:
        raise ValueError(f"query heads H={H} must be a multiple of key/value heads Hkv={Hkv} (grouped-query attention)")
    if backend == "flash":
        if not q.is_cuda:
            raise ValueError(
                f"backend 'flash' runs on CUDA tensors only (got {q.device}); use backend='sdpa' on this device"
            )
        if not _HAS_VARLEN:
            raise ImportError(
                "backend 'flash' needs flash-attn (pip install flash-attn) or torch >= 2.10; use backend='sdpa' "
                "meanwhile"
            )
        if q.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(
                f"backend 'flash' needs float16 or bfloat16 tensors (got {q.dtype}); cast the model, or use "
                "backend='sdpa'"
            )
