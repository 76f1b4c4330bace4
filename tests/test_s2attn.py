"""Every attention backend against an independent brute-force reference, and the properties that matter:
nothing reads the future, any N, odd H, GQA. The reference below shares no code with s2attn.py: it
lists each query's allowed keys with plain Python loops and computes attention one query at a time."""

import inspect
import math

import pytest
import torch

import parallel
import s2attn
from s2attn import full_attention, s2_attention

CUDA_REASON = "needs a CUDA GPU with flash-attn or torch's varlen kernel"
needs_flash = pytest.mark.skipif("flash" not in s2attn.BACKENDS, reason=CUDA_REASON)


def allowed_keys(i, h, H, G):
    """Keys that query i of head h reads, from the written rule: same group, not in the future."""
    if G is None:
        return list(range(i + 1))
    start = 0 if h < H // 2 else G // 2  # the shifted heads' groups start at G/2 (after a half group)
    if h < H // 2 or i >= start:
        first = start + ((i - start) // G) * G
    else:
        first = 0  # the first half group [0, G/2) of the shifted heads
    return list(range(first, i + 1))


def reference(q, k, v, G):
    """Attention one query at a time, in float64."""
    B, N, H, D = q.shape
    r = H // k.shape[2]
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros(B, N, H, D, dtype=torch.float64)
    for h in range(H):
        for i in range(N):
            js = allowed_keys(i, h, H, G)
            scores = k[:, js, h // r] @ q[:, i, h, :, None] / math.sqrt(D)  # (B, len(js), 1)
            out[:, i, h] = (torch.softmax(scores, dim=1) * v[:, js, h // r]).sum(1)
    return out


def qkv(B, N, H, Hkv, D=8, dtype=torch.float32, device="cpu", seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    make = lambda h: torch.randn(B, N, h, D, generator=g).to(device, dtype).requires_grad_(requires_grad)  # noqa: E731
    return make(H), make(Hkv), make(Hkv)


def attend(q, k, v, G, backend):
    return full_attention(q, k, v, backend=backend) if G is None else s2_attention(q, k, v, G, backend=backend)


CASES = [  # (N, G, H, Hkv): multiples of G and not, N < G, odd H, GQA aligned and not with the head halves
    (16, 8, 4, 4),
    (16, 4, 4, 2),
    (19, 8, 4, 4),
    (13, 4, 3, 3),
    (7, 16, 2, 1),
    (20, 6, 9, 3),
    (24, 8, 6, 2),
    (11, 2, 5, 5),
    (9, 3, 4, 1),
    (8, 1, 2, 2),
    (12, None, 4, 2),
    (5, None, 3, 1),
]


@pytest.mark.parametrize("backend", ["naive", "sdpa"])
@pytest.mark.parametrize("N,G,H,Hkv", CASES)
def test_matches_reference_fp32(backend, N, G, H, Hkv):
    q, k, v = qkv(2, N, H, Hkv)
    torch.testing.assert_close(attend(q, k, v, G, backend).double(), reference(q, k, v, G), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["naive", "sdpa"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.bfloat16, 3e-2)])
def test_matches_reference_other_dtypes(backend, dtype, tol):
    q, k, v = qkv(2, 21, 6, 2, dtype=dtype)
    out = s2_attention(q, k, v, 8, backend=backend)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), reference(q, k, v, 8), rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", ["naive", "sdpa"])
@pytest.mark.parametrize("G", [None, 4, 6])
def test_never_reads_the_future(backend, G):
    """d out[t] / d (q, k, v)[t'] is exactly zero for every t' > t."""
    N = 14
    q, k, v = qkv(1, N, 4, 2, requires_grad=True)
    for t in (0, 2, 5, N - 2):
        q.grad = k.grad = v.grad = None
        attend(q, k, v, G, backend)[:, t].sum().backward()
        for x in (q, k, v):
            assert torch.all(x.grad[:, t + 1 :] == 0), f"output {t} depends on a later position"


def test_backward_matches_naive():
    q, k, v = qkv(2, 19, 6, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 19, 6, 8, dtype=torch.float64)
    grads = []
    for backend in ("naive", "sdpa"):
        q.grad = k.grad = v.grad = None
        (s2_attention(q, k, v, 8, backend=backend) * w).sum().backward()
        grads.append([x.grad.clone() for x in (q, k, v)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def algorithm1(q, k, v, G):
    """The paper's two lines, literally (roll the shifted half by -G/2, causal attention in groups,
    roll back). Needs N % G == 0 and even H."""
    B, N, H, D = q.shape
    qkv = torch.stack([q, k, v], dim=2)  # (B, N, 3, H, D)
    qkv = torch.cat((qkv.chunk(2, 3)[0], qkv.chunk(2, 3)[1].roll(-G // 2, 1)), 3).view(B * N // G, G, 3, H, D)
    out = full_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], backend="naive").reshape(B, N, H, D)
    return torch.cat((out.chunk(2, 2)[0], out.chunk(2, 2)[1].roll(G // 2, 1)), 2)


def test_agrees_with_algorithm1_except_where_it_reads_the_future():
    """Algorithm 1 and ours differ only at the shifted heads' first G/2 positions, where the paper's
    roll lets those tokens read the last G/2 (official repository issues #15 and #90)."""
    N, G, H = 32, 8, 4
    q, k, v = qkv(1, N, H, H, dtype=torch.float64)
    ours, paper = s2_attention(q, k, v, G, backend="naive"), algorithm1(q, k, v, G)
    leak = torch.zeros(N, H, dtype=torch.bool)
    leak[: G // 2, H // 2 :] = True
    torch.testing.assert_close(ours[0][~leak], paper[0][~leak])
    assert (ours[0][leak] - paper[0][leak]).abs().min() > 1e-6
    v2 = v.clone()
    v2[:, -1] += 1  # change only the last token: Algorithm 1's first output changes, ours does not
    assert not torch.equal(algorithm1(q, k, v2, G)[:, 0], paper[:, 0])
    assert torch.equal(s2_attention(q, k, v2, G, backend="naive")[:, 0], ours[:, 0])


def test_s2_equals_full_when_one_group_covers_everything_unshifted():
    """Heads in the first half with G >= N see the whole causal prefix: same as full attention."""
    q, k, v = qkv(1, 10, 4, 4)
    torch.testing.assert_close(s2_attention(q, k, v, 16)[:, :, :2], full_attention(q, k, v)[:, :, :2])


@pytest.mark.parametrize("Nq", [1, 3, 12])
def test_cached_attention_is_the_last_rows_of_full_attention(Nq):
    q, k, v = qkv(2, 12, 6, 2)
    torch.testing.assert_close(
        s2attn.cached_attention(q[:, -Nq:], k, v),
        full_attention(q, k, v, backend="naive")[:, -Nq:],
        rtol=1e-5,
        atol=1e-6,
    )


def test_bad_input_errors():
    q, k, v = qkv(1, 8, 4, 4)
    with pytest.raises(ValueError, match="unknown attention backend 'cuda'"):
        full_attention(q, k, v, backend="cuda")
    q3, k3, v3 = qkv(1, 8, 4, 3)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        s2_attention(q3, k3, v3, 4)
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        s2_attention(q, k, v, 0)
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        s2_attention(q, k, v, 2.5)
    with pytest.raises(ValueError, match="for full attention call full_attention"):
        s2_attention(q, k, v, None)
    with pytest.raises(ValueError, match="must agree on B, N and D"):
        s2_attention(q, k[:, :5], v[:, :5], 4)
    with pytest.raises(ValueError, match=r"expected q \(B, N, H, D\)"):
        full_attention(q[0], k[0], v[0])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_flash_without_cuda_says_what_to_do():
    q, k, v = qkv(1, 8, 4, 4)
    assert "flash" not in s2attn.BACKENDS
    with pytest.raises((ValueError, ImportError), match="use backend='sdpa'"):
        s2_attention(q, k, v, 4, backend="flash")


@needs_flash
@pytest.mark.parametrize("N,G,H,Hkv", [c for c in CASES] + [(4096, 1024, 8, 2), (3000, 1024, 9, 3)])
def test_flash_matches_naive_cuda(N, G, H, Hkv):
    q, k, v = qkv(2, N, H, Hkv, D=64, dtype=torch.bfloat16, device="cuda")
    torch.testing.assert_close(
        attend(q, k, v, G, "flash").float(), attend(q, k, v, G, "naive").float(), rtol=2e-2, atol=2e-2
    )
    torch.testing.assert_close(
        attend(q, k, v, G, "sdpa").float(), attend(q, k, v, G, "naive").float(), rtol=2e-2, atol=2e-2
    )


@needs_flash
def test_flash_never_reads_the_future_cuda():
    N = 64
    q, k, v = qkv(1, N, 4, 2, D=64, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    for t in (0, 3, 20, N - 2):
        q.grad = k.grad = v.grad = None
        s2_attention(q, k, v, 16, backend="flash")[:, t].float().sum().backward()
        for x in (q, k, v):
            assert torch.all(x.grad[:, t + 1 :] == 0)


# ----------------------------------------------------------------------------- the flash path on CPU
# The varlen kernels need CUDA, but everything around them (segment borders, cu_seqlens, packing, the
# head split, GQA) is ours. These stand-ins implement the kernels' documented contract on CPU: causal
# attention inside each segment [cu[i], cu[i+1]) of a packed (total, heads, D) batch.


def segment_attention(q, k, v, cu, max_len):
    assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == q.shape[0]
    assert max_len == int((cu[1:] - cu[:-1]).max())
    r = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs, ks, vs = (x[a:b].transpose(0, 1) for x in (q, k.repeat_interleave(r, 1), v.repeat_interleave(r, 1)))
        out[a:b] = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True).transpose(0, 1)
    return out


class SavingKernel(torch.autograd.Function):
    """A varlen kernel's autograd: the output from segment_attention, and for backward what the real
    kernels keep (torch's varlen_attn and flash-attn's FlashAttnVarlenFunc alike): q, k and v as passed,
    cu_seqlens, the output, the float32 logsumexp (heads, tokens) and an RNG state. Its backward runs
    segment_attention again under autograd."""

    @staticmethod
    def forward(ctx, q, k, v, cu, max_len):
        out = segment_attention(q, k, v, cu, max_len)
        lse, rng = torch.zeros(q.shape[1], q.shape[0]), torch.zeros(2, dtype=torch.int64)
        ctx.save_for_backward(q, k, v, cu, out, lse, rng)
        ctx.max_len = max_len
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, cu, *_ = ctx.saved_tensors
        with torch.enable_grad():
            q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
            out = segment_attention(q, k, v, cu, ctx.max_len)
        return (*torch.autograd.grad(out, (q, k, v), grad), None, None)


def fake_flash_attn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, causal=False):
    assert causal and torch.equal(cu_seqlens_q, cu_seqlens_k) and max_seqlen_q == max_seqlen_k
    return SavingKernel.apply(q, k, v, cu_seqlens_q, max_seqlen_q)


def fake_varlen_213(
    query,
    key,
    value,
    cu_seq_q,
    cu_seq_k,
    max_q,
    max_k,
    *,
    return_aux=None,
    scale=None,
    window_size=(-1, -1),
    enable_gqa=False,
    seqused_k=None,
    block_table=None,
    num_splits=None,
):
    """torch 2.13's signature: causal is window_size == (-1, 0); GQA behind enable_gqa, else refused."""
    assert window_size == (-1, 0)
    if not enable_gqa and query.shape[1] != key.shape[1]:
        raise ValueError("Expect query and key/value to have the same number of heads")
    return SavingKernel.apply(query, key, value, cu_seq_q, max_q)


def fake_varlen_211(
    query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)
):
    """torch 2.11's signature, exactly: causal is window_size == (-1, 0), as 2.11 tests it (a list would
    not be); no enable_gqa, so k and v must come with as many heads as q."""
    is_causal = window_size == (-1, 0)
    assert is_causal and key.shape[1] == query.shape[1]
    return SavingKernel.apply(query, key, value, cu_seq_q, max_q)


def fake_varlen_210(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False):
    """torch 2.10: is_causal, and no GQA (k and v must have as many heads as q)."""
    assert is_causal and key.shape[1] == query.shape[1]
    return SavingKernel.apply(query, key, value, cu_seq_q, max_q)


STAND_INS = {"varlen_213": fake_varlen_213, "varlen_211": fake_varlen_211, "varlen_210": fake_varlen_210}


def use_stand_in_flash(monkeypatch, kernel="flash_attn"):
    """The flash backend on CPU, through a stand-in kernel: flash-attn's, or torch's varlen_attn of 2.13,
    2.11 or 2.10."""
    monkeypatch.setattr(s2attn, "flash_attn_varlen_func", fake_flash_attn if kernel == "flash_attn" else None)
    monkeypatch.setattr(s2attn, "torch_varlen_attn", STAND_INS.get(kernel))
    check = s2attn._check
    monkeypatch.setattr(s2attn, "_check", lambda q, k, v, backend: check(q, k, v, "sdpa"))  # no CUDA here


@pytest.mark.parametrize("kernel", ["flash_attn", *STAND_INS])
@pytest.mark.parametrize("N,G,H,Hkv", CASES)
def test_flash_path_with_stand_in_kernels(monkeypatch, kernel, N, G, H, Hkv):
    use_stand_in_flash(monkeypatch, kernel)
    q, k, v = qkv(2, N, H, Hkv)
    torch.testing.assert_close(attend(q, k, v, G, "flash").double(), reference(q, k, v, G), rtol=1e-4, atol=1e-5)
    assert s2attn.flash_repeats_kv() == (kernel in ("varlen_211", "varlen_210"))


def test_stand_in_has_the_installed_kernels_signature():
    """The stand-in for the installed torch's varlen_attn takes exactly its parameters (2.11's was read
    from its wheel: the GPU image runs 2.11)."""
    release = ".".join(torch.__version__.split(".")[:2])
    stand_in = {"2.13": fake_varlen_213, "2.11": fake_varlen_211, "2.10": fake_varlen_210}.get(release)
    if stand_in is None or s2attn.torch_varlen_attn is None:
        pytest.skip(f"no stand-in for torch {torch.__version__}'s varlen_attn")
    params = lambda f: [(p.name, p.kind, p.default) for p in inspect.signature(f).parameters.values()]  # noqa: E731
    assert params(stand_in) == params(s2attn.torch_varlen_attn)


@pytest.mark.parametrize("D", [12, 264])
def test_flash_refuses_head_dims_torchs_kernel_cannot_take(monkeypatch, D):
    """torch's varlen_attn hands q, k, v to the FlashAttention-2 kernel unpadded, which rejects head dims
    that are not a multiple of 8 or exceed 256: our error, naming the fix, before any kernel runs.
    flash-attn's function pads a head dim of 12 itself."""
    q, k, v = qkv(1, 16, 4, 2, D=D)
    for kernel in ("varlen_211", "varlen_213"):
        use_stand_in_flash(monkeypatch, kernel)
        with pytest.raises(ValueError, match=f"multiples of 8 up to 256, not {D}: use backend='sdpa'"):
            s2_attention(q, k, v, 8, backend="flash")
    use_stand_in_flash(monkeypatch, "flash_attn")
    if D == 12:
        torch.testing.assert_close(
            s2_attention(q, k, v, 8, backend="flash"), s2_attention(q, k, v, 8), rtol=1e-5, atol=1e-6
        )


def test_flash_gradients_with_stand_in_kernels(monkeypatch):
    """The k and v repeated for torch 2.11's kernel get their gradients summed back per kv head."""
    q, k, v = qkv(2, 20, 6, 2, requires_grad=True)
    grads = {}
    for kernel in ("varlen_211", "varlen_213"):
        use_stand_in_flash(monkeypatch, kernel)
        q.grad = k.grad = v.grad = None
        (s2_attention(q, k, v, 8, backend="flash") ** 2).sum().backward()
        grads[kernel] = [x.grad.clone() for x in (q, k, v)]
    for old, new in zip(*grads.values()):
        torch.testing.assert_close(old, new, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(
    not torch.cuda.is_available() or s2attn.torch_varlen_attn is None, reason="needs a CUDA GPU and torch's varlen_attn"
)
def test_varlen_kernel_takes_gqa_without_repeated_kv_cuda():
    """torch 2.11's varlen_attn takes no enable_gqa, so there the flash backend repeats k and v per query head
    (s2attn.flash_repeats_kv). Read from its C++, the kernel itself needs only H % Hkv == 0 and sums the
    expanded dk, dv in backward. This runs it with 2 kv heads for 8 query heads (2.13: enable_gqa) against the
    repeated k and v, bf16, forward and backward: once it passes on a GPU with 2.11, the repeat can go."""
    g = torch.Generator(device="cuda").manual_seed(0)

    def make(heads):
        return torch.randn(96, heads, 64, generator=g, device="cuda", dtype=torch.bfloat16).requires_grad_()

    q, k, v = make(8), make(2), make(2)
    w = torch.randn(96, 8, 64, generator=g, device="cuda")
    cu = torch.tensor([0, 40, 96], dtype=torch.int32, device="cuda")  # two sequences, of 40 and 56 tokens
    names = inspect.signature(s2attn.torch_varlen_attn).parameters
    causal = {"is_causal": True} if "is_causal" in names else {"window_size": (-1, 0)}
    results = []
    for repeat in (True, False):
        q.grad = k.grad = v.grad = None
        kk, vv = s2attn.repeat_kv(k, v, 4, dim=1) if repeat else (k, v)
        gqa = {} if repeat or "enable_gqa" not in names else {"enable_gqa": True}
        out = s2attn.torch_varlen_attn(q, kk, vv, cu, cu, 56, 56, **causal, **gqa)
        (out.float() * w).sum().backward()
        results.append([out.float(), *(x.grad.float() for x in (q, k, v))])
    for repeated, native in zip(*results):
        torch.testing.assert_close(native, repeated, rtol=2e-2, atol=2e-2)


def test_flash_path_copies_nothing_from_the_host(monkeypatch):
    """cu_seqlens is made on the tensors' device: a Python list turned into a CUDA tensor would be a
    blocking host-to-device copy in every attention call (Llama 2 7B: 128 per micro-step)."""
    use_stand_in_flash(monkeypatch)
    q, k, v = qkv(2, 20, 4, 2)
    expected = attend(q, k, v, 8, "flash")

    def no_host_data(*a, **kw):
        raise AssertionError("torch.tensor(host data) in the flash path")

    monkeypatch.setattr(torch, "tensor", no_host_data)
    torch.testing.assert_close(attend(q, k, v, 8, "flash"), expected, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("Nq,Nk", [(1, 1), (1, 17), (1, 1000), (1, 4096), (7, 300), (64, 64)])
@pytest.mark.parametrize("H,Hkv", [(9, 3), (32, 8), (4, 4)])
def test_cached_attention_matches_naive_cuda(Nq, Nk, H, Hkv):
    """Generation's attention (a KV cache, SDPA with whatever kernel it picks: cuDNN on Hopper with torch
    >= 2.11) in bf16 against the definition, for SmolLM2's 9 heads over 3 kv heads among others (a
    report of cuDNN attention corrupting decoding below 8 kv heads: pytorch issue 193893)."""
    q, k, v = qkv(2, Nk, H, Hkv, D=64, dtype=torch.bfloat16, device="cuda")
    got = s2attn.cached_attention(q[:, -Nq:], k, v)
    expected = full_attention(q, k, v, backend="naive")[:, -Nq:]
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_float32_gqa_runs_in_a_fused_kernel_cuda():
    """float32 with GQA on CUDA: the memory-efficient kernel (no math-kernel fallback with its (H, N, N)
    float32 scores) gives the reference's result."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = qkv(2, 64, 8, 2, D=64, device="cuda")
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        out = attend(q, k, v, 16, "sdpa")
    torch.testing.assert_close(out.double().cpu(), reference(q.cpu(), k.cpu(), v.cpu(), 16), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["naive", "sdpa"])
@pytest.mark.parametrize("N,G,H,Hkv", [(16, 4, 4, 2), (19, 8, 3, 3), (20, 6, 9, 3)])
def test_short_attention_without_shift(backend, N, G, H, Hkv):
    """shift=False (the paper's Table 1 ablation): every head attends like the unshifted half."""
    q, k, v = qkv(2, N, H, Hkv)
    # the reference with 2H heads of which the first H are unshifted; repeating k, v makes its GQA map line up
    r = H // Hkv
    q2, k2, v2 = (
        torch.cat([q, q], 2),
        k.repeat_interleave(r, 2).repeat(1, 1, 2, 1),
        v.repeat_interleave(r, 2).repeat(1, 1, 2, 1),
    )
    expected = reference(q2, k2, v2, G)[:, :, :H]
    torch.testing.assert_close(
        s2_attention(q, k, v, G, backend=backend, shift=False).double(), expected, rtol=1e-4, atol=1e-5
    )
    assert not torch.allclose(
        s2_attention(q, k, v, G, backend=backend), s2_attention(q, k, v, G, backend=backend, shift=False)
    )


# ----------------------------------------------------------------------------- context parallelism


def in_slices(q, k, v, G, P, backend="sdpa", shift=True):
    """parallel.s2_attention_on_slice on P consecutive slices of the sequence, as P processes run it, with
    the halo carried from each slice to the next in this process (train.py carries it between processes).
    Returns the joined output and how many times the halo was asked."""
    tails = []

    def halo(tail):  # (B, h, 2 Hkv, D): this slice's; returns the previous slice's (0 tokens on the first)
        tails.append(tail)
        return tails[-2] if len(tails) > 1 else tail[:, :0]

    slices = zip(*(x.chunk(P, 1) for x in (q, k, v)))
    outs = [parallel.s2_attention_on_slice(*xs, G, backend=backend, shift=shift, halo=halo) for xs in slices]
    return torch.cat(outs, dim=1), len(tails)


SLICES = [  # (P, N, G, H, Hkv): groups that straddle slice borders, a slice of one group, odd G and H, GQA
    (2, 32, 8, 4, 2),
    (4, 48, 6, 3, 1),  # a kv head serves query heads in both halves
    (3, 30, 5, 5, 5),
    (4, 32, 8, 6, 3),
    (2, 32, 16, 2, 1),
    (2, 8, 1, 4, 4),  # G = 1: no half-group, no halo
]


@pytest.mark.parametrize("backend", ["sdpa", "flash"])
@pytest.mark.parametrize("P,N,G,H,Hkv", SLICES)
def test_slices_with_a_halo_equal_the_whole_sequence(monkeypatch, backend, P, N, G, H, Hkv):
    """Outputs and the gradients of q, k and v (the halo's included: they reach the previous slice's
    keys and values through it) equal the unsplit attention's, in float64."""
    if backend == "flash":
        use_stand_in_flash(monkeypatch)
    q, k, v = qkv(2, N, H, Hkv, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, N, H, 8, dtype=torch.float64)
    grads = []
    for split in (False, True):
        q.grad = k.grad = v.grad = None
        out, asked = in_slices(q, k, v, G, P, backend) if split else (s2_attention(q, k, v, G, backend=backend), 0)
        if split:
            torch.testing.assert_close(out, reference(q, k, v, G), rtol=1e-10, atol=1e-10)
            assert asked == (P if G > 1 else 0)
        (out * w).sum().backward()
        grads.append([x.grad.clone() for x in (q, k, v)])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


def test_halo_errors():
    q, k, v = qkv(1, 12, 4, 4)
    with pytest.raises(ValueError, match="multiple of group_size=8"):
        parallel.s2_attention_on_slice(q, k, v, 8, halo=lambda t: t)
    with pytest.raises(ValueError, match="use sdpa or flash with a halo"):
        parallel.s2_attention_on_slice(q, k, v, 4, backend="naive", halo=lambda t: t)


# ----------------------------------------------------------------------------- packed documents
# Several documents in one row, each attending only to itself: S2-Attn applied to each document alone.


def doc_allowed_keys(i, h, H, G, docs, shift=True):
    """Keys that query i of head h reads in a row whose tokens belong to the documents `docs` (a list of ids),
    from the written rule: j <= i, j in i's document, and j in the same group counted from the document's
    first token (unshifted heads: p // G; shifted heads: (p + G - G // 2) // G, p the position in it)."""
    start = docs.index(docs[i])

    def group(p):
        if G is None:
            return 0
        return (p + G - G // 2) // G if shift and h >= H // 2 else p // G

    return [j for j in range(start, i + 1) if docs[j] == docs[i] and group(j - start) == group(i - start)]


def reference_docs(q, k, v, G, documents, shift=True):
    """Attention one query at a time, in float64, for rows of packed documents."""
    B, N, H, D = q.shape
    r = H // k.shape[2]
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros(B, N, H, D, dtype=torch.float64)
    for b in range(B):
        docs = documents[b].tolist()
        for h in range(H):
            for i in range(N):
                js = doc_allowed_keys(i, h, H, G, docs, shift)
                scores = k[b, js, h // r] @ q[b, i, h, :, None] / math.sqrt(D)  # (len(js), 1)
                out[b, i, h] = (torch.softmax(scores, dim=0) * v[b, js, h // r]).sum(0)
    return out


def packed(*rows):
    """(B, N) document ids of rows given as their documents' lengths (the rows' lengths must agree)."""
    return torch.tensor([[d for d, n in enumerate(row) for _ in range(n)] for row in rows])


# documents shorter than G/2, longer than G and straddling groups; the second row right-padded (its last,
# longer document is the padding) and the third one document
DOCUMENTS = packed([3, 11, 6], [9, 5, 6], [20])
DOC_CASES = [(8, 4, 4), (8, 4, 2), (6, 9, 3), (4, 6, 2), (3, 5, 5), (1, 2, 1), (None, 4, 2), (None, 3, 1)]


def attend_docs(q, k, v, G, backend, documents, shift=True):
    if G is None:
        return full_attention(q, k, v, backend=backend, documents=documents)
    return s2_attention(q, k, v, G, backend=backend, shift=shift, documents=documents)


@pytest.mark.parametrize("backend", ["naive", "sdpa", "flash_attn", "varlen_213", "varlen_211"])
@pytest.mark.parametrize("G,H,Hkv", DOC_CASES)
def test_packed_documents_match_reference(monkeypatch, backend, G, H, Hkv):
    if backend not in ("naive", "sdpa"):
        use_stand_in_flash(monkeypatch, backend)
    q, k, v = qkv(3, DOCUMENTS.shape[1], H, Hkv, dtype=torch.float64)
    out = attend_docs(q, k, v, G, "flash" if backend not in ("naive", "sdpa") else backend, DOCUMENTS)
    torch.testing.assert_close(out, reference_docs(q, k, v, G, DOCUMENTS), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["naive", "sdpa"])
def test_packed_documents_without_the_shift(backend):
    q, k, v = qkv(3, DOCUMENTS.shape[1], 4, 2, dtype=torch.float64)
    out = attend_docs(q, k, v, 6, backend, DOCUMENTS, shift=False)
    torch.testing.assert_close(out, reference_docs(q, k, v, 6, DOCUMENTS, shift=False), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("G", [None, 1, 4, 5, 8])
def test_s2_mask_with_documents_is_the_written_rule(G):
    H = 5
    mask = s2attn.s2_mask(DOCUMENTS.shape[1], H, G, documents=DOCUMENTS)
    brute = torch.zeros_like(mask)
    for b in range(DOCUMENTS.shape[0]):
        for h in range(H):
            for i in range(DOCUMENTS.shape[1]):
                brute[b, h, i, doc_allowed_keys(i, h, H, G, DOCUMENTS[b].tolist())] = True
    assert torch.equal(mask, brute)
    one = torch.zeros(2, 20, dtype=torch.long)  # one document per row: the mask without documents
    assert torch.equal(s2attn.s2_mask(20, H, G, documents=one), s2attn.s2_mask(20, H, G).expand(2, H, 20, 20))


def test_packed_documents_errors():
    q, k, v = qkv(3, 20, 4, 2)
    with pytest.raises(ValueError, match="non-decreasing along each row"):
        s2_attention(q, k, v, 4, documents=DOCUMENTS.flip(1))
    with pytest.raises(ValueError, match=r"documents \(3, 19\) must be \(B, N\) = \(3, 20\)"):
        full_attention(q, k, v, documents=DOCUMENTS[:, :19])
    with pytest.raises(ValueError, match="packed documents are not supported"):
        parallel.s2_attention_on_slice(q, k, v, 4, documents=DOCUMENTS, halo=lambda t: t)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["sdpa", "flash"])
@pytest.mark.parametrize("G,H,Hkv", [(8, 4, 2), (6, 9, 3), (None, 4, 2)])
def test_packed_documents_match_naive_cuda(backend, G, H, Hkv):
    """The real kernels (SDPA's and the varlen one) on packed documents, bf16, forward and backward."""
    if backend == "flash" and "flash" not in s2attn.BACKENDS:
        pytest.skip(CUDA_REASON)
    q, k, v = qkv(3, DOCUMENTS.shape[1], H, Hkv, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    documents, w = DOCUMENTS.cuda(), torch.randn(3, DOCUMENTS.shape[1], H, 8, device="cuda")
    grads = []
    for b, xs in ((backend, (q, k, v)), ("naive", (q.float(), k.float(), v.float()))):
        q.grad = k.grad = v.grad = None
        out = attend_docs(*xs, G, b, documents).float()
        (out * w).sum().backward()
        grads.append((out.detach(), [x.grad.float() for x in (q, k, v)]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=2e-2, atol=2e-2)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2)
