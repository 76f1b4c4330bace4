"""Benchmarks. Timings are ratios measured in one process on one machine; the machine is printed.

    python bench.py attn                                   # CPU defaults: N = 2048 .. 8192, H = 8, D = 64
    python bench.py attn --lengths 8192,32768 --heads 32 --head-dim 128 --dtype bfloat16   # on a GPU

`attn` times full causal attention against S2-Attn (group size N/4 by default, the paper's), forward +
backward, for every backend this machine runs except `naive`, and prints the S2/full speed-up. The
attention-FLOP limit of the speed-up is 4x: S2 computes N/G groups of G x G instead of N x N.
"""
import argparse
import platform
import time

import torch

import s2attn


def time_fwd_bwd(fn, q, k, v, reps):
    """Best of `reps` forward + backward passes, in seconds, after one warm-up."""
    sync = torch.cuda.synchronize if q.is_cuda else (lambda: None)
    times = []
    for i in range(reps + 1):
        q.grad = k.grad = v.grad = None
        sync()
        t = time.perf_counter()
        fn(q, k, v).sum().backward()
        sync()
        times.append(time.perf_counter() - t)
    return min(times[1:])


def bench_attention(args):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    name = torch.cuda.get_device_name() if device == "cuda" else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; H={args.heads}, Hkv={args.kv_heads or args.heads}, D={args.head_dim}, {args.dtype}, B=1, fwd+bwd, best of {args.reps}")
    print(f"{'backend':>7} {'N':>7} {'G':>6} {'full ms':>9} {'S2 ms':>9} {'speed-up':>8}")
    for backend in [b for b in s2attn.BACKENDS if b != "naive"]:
        for N in (int(n) for n in args.lengths.split(",")):
            G = args.group_size or N // 4
            shape = lambda h: (1, N, h, args.head_dim)  # noqa: E731
            q = torch.randn(shape(args.heads), device=device, dtype=dtype, requires_grad=True)
            k, v = (torch.randn(shape(args.kv_heads or args.heads), device=device, dtype=dtype, requires_grad=True) for _ in range(2))
            full = time_fwd_bwd(lambda q, k, v: s2attn.full_attention(q, k, v, backend=backend), q, k, v, args.reps)
            s2 = time_fwd_bwd(lambda q, k, v: s2attn.s2_attention(q, k, v, G, backend=backend), q, k, v, args.reps)
            print(f"{backend:>7} {N:>7} {G:>6} {full * 1e3:>9.1f} {s2 * 1e3:>9.1f} {full / s2:>7.2f}x")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("attn", help="full vs S2 attention kernels, forward + backward")
    a.add_argument("--lengths", default="2048,4096,8192", help="comma-separated sequence lengths N")
    a.add_argument("--group-size", type=int, default=None, help="S2 group size G in tokens (default N/4, the paper's)")
    a.add_argument("--heads", type=int, default=8, help="query heads H")
    a.add_argument("--kv-heads", type=int, default=None, help="key/value heads Hkv (default H)")
    a.add_argument("--head-dim", type=int, default=64, help="head dimension D")
    a.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    a.add_argument("--reps", type=int, default=3, help="timed repetitions after one warm-up (best is kept)")
    args = p.parse_args()
    bench_attention(args)
