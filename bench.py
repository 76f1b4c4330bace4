"""Benchmarks: LongLoRA's savings measured on this machine. Each table is one run on one machine; the
machine, torch version and date are printed with it. Timings are compared as ratios within a run.

    python bench.py all                     # every table below with this machine's defaults (BENCHMARKS.md)
    python bench.py attn                    # attention kernels, full vs S2, forward + backward
    python bench.py step                    # one LoRA+ training step, full vs S2 (and transformers + PEFT)
    python bench.py fit                     # the longest LoRA+ S2 step that fits on this GPU (CUDA only)
    python bench.py memory --shape 7b --dtype bfloat16   # the memory model: peak per GPU, longest context
    python bench.py pack                    # train.py --pack against one example per step and padded batches

Defaults depend on the machine. CPU: attention with 8 heads of 64 up to 16k tokens; training steps of
a small Llama shape (`--shape small`) at 2k to 8k. CUDA: Llama 2 7B's 32 heads of 128 up to 128k;
training steps of Llama 2 7B's shape (`--shape 7b`, random bf16 weights) at 8k to 64k and beyond.

`attn` times every backend this machine runs except `naive` (the definition, which materialises the
N x N scores) and reports ms, the S2/full ratio and TFLOP/s. SDPA chooses its kernel by device, dtype,
shape and torch version (on Hopper, torch >= 2.11 may prefer cuDNN's attention over FlashAttention-2),
so each row names the kernels that ran, read off the profiler (`attention_kernels`); `--sdpa-kernels`
adds rows with SDPA forced to one kernel (default on CUDA: SDPA's own choice, flash and cudnn).
Attention FLOPs here count the causal half that the kernels compute: 2 matmuls x 2 FLOPs x (pairs / 2)
x D per head, forward; forward + backward is 3x forward.

`step` is train.py's step: FSDP2 (one process), activation checkpointing, chunked loss, AdamW on the
adapters + embedding + norms, frozen weights in --dtype, S2 groups of N/4. Model FLOPs come from
`model.forward_flops` as train.py counts them (the paper's Table 7 convention: whole attention squares;
backward 2x forward on trained weights, 1x on frozen ones), and MFU divides by the GPU's bf16 peak.
When transformers and peft are installed, the same step runs with `LlamaForCausalLM` + PEFT LoRA
(embedding and norms trainable, gradient checkpointing, its best attention: flash_attention_2 if
flash-attn is installed, else sdpa) on the same shapes: what a user would pick instead (`--no-peft`
leaves it out). Each configuration runs in its own process, so its peak memory is its own and an
out-of-memory ends only it.

`pack` trains on the same `--examples` (random tokens, lengths log-uniform from N/16 to N = `--length`)
in three layouts, one optimizer step per row or batch: one example per step, right-padded batches of
`--batch`, and rows packed as `train.py --pack` packs them; the layouts alternate, pass after pass, and
the median pass of each is kept. It reports positions run, the padding among them and real tokens/s.
"""

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

import data
import model
import parallel
import quant
import s2attn
import train
from eval import ints

SHAPES = {
    "7b": dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000),  # Llama 2 7B
    "small": dict(dim=256, n_layers=4, n_heads=4, vocab_size=8192, multiple_of=64),
    "medium": dict(dim=1024, n_layers=8, n_heads=8, vocab_size=8192, multiple_of=256),  # weights matter on a CPU
}


def machine(device):
    if device.type == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    return f"{name}; torch {torch.__version__}; {datetime.date.today()}"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- attention kernels


# What ran, by the operator the profiler records: SDPA's kernels, torch's varlen kernel, flash-attn's. (Not
# the inner aten::_flash_attention_forward or _cudnn_attention_forward: SDPA's flash and cuDNN kernels call
# them too. torch's varlen_attn runs FlashAttention-2 in 2.11 and 2.13.)
KERNELS = {
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash-cpu",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_attention_math": "math",
    "torch_attn::_varlen_attn": "varlen",
    "flash_attn::_flash_attn_varlen_forward": "flash-attn",
}
# SDPA forced to one kernel (torch.nn.attention.sdpa_kernel), by --sdpa-kernels name
SDPA_KERNELS = {
    "flash": "FLASH_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "math": "MATH",
}


def attention_kernels(fn, *args):
    """The attention kernels that fn(*args) runs (KERNELS' names, in their order), read off the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:  # the operators are recorded on the host
        fn(*args)
    ran = {e.key for e in prof.key_averages()}
    return [name for op, name in KERNELS.items() if op in ran]


def forced(kernel):
    """A context in which SDPA runs only `kernel` (an SDPA_KERNELS name); None: SDPA's own choice."""
    if kernel is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, SDPA_KERNELS[kernel])])


def attn_flops(N, G, H, D):
    """Forward + backward FLOPs of causal attention (S2 with groups of G), the masked half not counted: 3 times
    half of model.forward_flops' attention (whole squares) for one layer of H heads of D."""
    return 3 * model.forward_flops(model.ModelArgs(dim=H * D, n_layers=1, n_heads=H), N, G)["attn"] / 2


def time_fwd_bwd(fn, q, k, v, reps):
    """Median of `reps` forward + backward passes, in seconds, after one warm-up."""
    times = []
    for _ in range(reps + 1):
        q.grad = k.grad = v.grad = None
        sync(q.device)
        t = time.perf_counter()
        fn(q, k, v).sum().backward()
        sync(q.device)
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def bench_attention(args):
    device = args.device
    dtype = getattr(torch, args.dtype)
    H, Hkv, D = args.heads, args.kv_heads or args.heads, args.head_dim
    print(
        f"\n### Attention kernels, forward + backward\n\n{machine(device)}; H={H}, Hkv={Hkv}, D={D}, {args.dtype}, "
        f"B=1, median of {args.reps}; kernels: what the profiler saw run (full / S2)\n"
    )
    print(
        "| backend | kernels | N | G | full ms | S2 ms | S2 speed-up | full TFLOP/s | S2 TFLOP/s "
        "|\n|---|---|---|---|---|---|---|---|---|"
    )
    rows = [(b, None) for b in s2attn.BACKENDS if b != "naive" and (b != "flash" or device.type == "cuda")]
    rows[1:1] = [("sdpa", kernel) for kernel in args.sdpa_kernels]  # after SDPA's own choice
    for backend, kernel in rows:
        label = backend if kernel is None else f"sdpa ({kernel} forced)"
        for N in args.lengths:
            G = args.group_size or N // 4
            q = torch.randn(1, N, H, D, device=device, dtype=dtype, requires_grad=True)
            k, v = (torch.randn(1, N, Hkv, D, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
            full_and_s2 = (
                lambda q, k, v: s2attn.full_attention(q, k, v, backend=backend),
                lambda q, k, v: s2attn.s2_attention(q, k, v, G, backend=backend),
            )
            try:
                with forced(kernel):
                    ran = [attention_kernels(lambda: f(q, k, v).sum().backward()) for f in full_and_s2]
                    full, s2 = [time_fwd_bwd(f, q, k, v, args.reps) for f in full_and_s2]
            except RuntimeError as e:  # a forced kernel that cannot take these inputs
                why = str(e).strip().split(". ")[0] or type(e).__name__
                print(f"| {label} | not available: {why} | {N} | {G} | | | | | |", flush=True)
                continue
            finally:
                q = k = v = None  # freed before the next length's
            names = " / ".join(",".join(r) or "?" for r in ran)
            tf_full, tf_s2 = attn_flops(N, N, H, D) / full / 1e12, attn_flops(N, G, H, D) / s2 / 1e12
            print(
                f"| {label} | {names} | {N} | {G} | {full * 1e3:.1f} | {s2 * 1e3:.1f} | {full / s2:.2f}x | "
                f"{tf_full:.3g} | {tf_s2:.3g} |",
                flush=True,
            )


# ----------------------------------------------------------------------------- training steps


def ours(margs, N, attn, dtype, device, offload=False, quantize=None, compile=False):
    """Our LoRA+ model and its loss at N tokens, built by train.py's build_model with its defaults (rank 8,
    embedding and norms, groups of N/4): sharded (one process), random weights of the shape made on the
    device instead of a checkpoint read from disk. offload: the checkpointed block inputs in host memory;
    quantize="nf4": QLoRA's frozen weights (train.py --quantize); compile: each block compiled (--compile)."""
    parallel.setup_distributed(device.type)
    backend = parallel.default_backend(device.type == "cuda", dtype)
    base = parallel.random_weights(margs, 42, device)  # build_model's default seed, as before
    cfg = train.LongLoRA(seq_len=N, attn=attn)
    m = train.build_model(
        base, cfg, 0, 1, device, backend=backend, dtype=dtype, quantize=quantize, offload=offload, compile=compile
    )
    loss = lambda x: m(x[:, :-1], x[:, 1:]) / N  # noqa: E731
    return m, loss


def theirs(a, dtype, device):
    """transformers' LlamaForCausalLM + PEFT LoRA on wq wk wv wo, embedding and norms trainable."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    N = a.max_seq_len
    try:
        import flash_attn  # noqa: F401

        impl = "flash_attention_2" if device.type == "cuda" else "sdpa"
    except ImportError:
        impl = "sdpa"
    cfg = LlamaConfig(
        hidden_size=a.dim,
        intermediate_size=a.hidden_dim,
        num_hidden_layers=a.n_layers,
        num_attention_heads=a.n_heads,
        num_key_value_heads=a.n_kv_heads,
        vocab_size=a.vocab_size,
        max_position_embeddings=N,
        rope_theta=a.rope_theta,
        rms_norm_eps=a.norm_eps,
        tie_word_embeddings=a.tie_embeddings,
        use_cache=False,
        attn_implementation=impl,
    )
    with torch.device(device):
        m = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    m.enable_input_require_grads()
    m = get_peft_model(
        m, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    )
    for n, p in m.named_parameters():
        if "embed_tokens" in n or "norm" in n or "lora_" in n:
            p.requires_grad = True
            p.data = p.data.float()  # trainable in float32, as ours; the rest runs under autocast
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def loss(x):
        with autocast:
            return m(input_ids=x[:, :-1], labels=x[:, :-1]).loss

    return m, loss, impl


def step_worker(cfg):
    """One configuration, in this process; prints one JSON line."""
    device = torch.device(cfg["device"])
    torch.manual_seed(0)
    shape, N, attn, impl, dtype = cfg["shape"], cfg["N"], cfg["attn"], cfg["impl"], cfg["dtype"]
    margs = model.ModelArgs(**SHAPES[shape], max_seq_len=N)  # the baseline runs attn="full"
    group_size = None if attn == "full" else N // 4
    # the same count for both
    flops, peak = (
        parallel.train_flops(margs, N, group_size=group_size),
        parallel.peak_tflops(device, dtype),
    )
    start_gb = parallel.peak_memory_gb(device)[0]  # on CPU: the process before the model (torch, Python)
    try:
        if impl == "ours":
            q, c = cfg.get("quantize"), cfg.get("compile", False)
            m, loss_fn = ours(margs, N, attn, dtype, device, cfg.get("offload", False), q, c)
            cfg["impl"] = f"ours ({m.layers[0].attention.backend}{', ' + q if q else ''}{', compiled' if c else ''})"
        else:
            m, loss_fn, kernel = theirs(margs, dtype, device)
            cfg["impl"] = f"transformers + PEFT ({kernel})"
        params = [p for p in m.parameters() if p.requires_grad]
        optim = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95))
        x = torch.randint(0, SHAPES[shape]["vocab_size"], (1, N + 1), device=device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(cfg["reps"] + 1):
            sync(device)
            t = time.perf_counter()
            loss_fn(x).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optim.step()
            optim.zero_grad(set_to_none=True)
            sync(device)
            times.append(time.perf_counter() - t)
        t = statistics.median(times[1:])  # times[0]: the warm-up, with compilation under compile
        cfg.update(
            ms=t * 1e3,
            tokens_per_s=N / t,
            tflops=flops / t / 1e12,
            mfu=flops / t / 1e12 / peak if peak else None,
            peak_gb=parallel.peak_memory_gb(device)[0],
            start_gb=start_gb,
            first_s=times[0],
        )
    except torch.OutOfMemoryError:
        cfg.update(oom=True)
    print("RESULT " + json.dumps(cfg), flush=True)


def run_one(cfg, timeout=1800, **env):
    """step_worker in a fresh process: its own peak memory, and an OOM or a crash ends only it. `env`: extra
    environment variables."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **env}
    env.pop("RANK", None)
    try:
        r = subprocess.run(
            [sys.executable, __file__, "_worker", json.dumps(cfg)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return {**cfg, "error": f"over {timeout} s"}
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    last = (r.stderr.strip().splitlines() or ["no output"])[-1]
    return {**cfg, "oom": "out of memory" in r.stderr.lower(), "error": last[:200]}


def bench_steps(args):
    """Every configuration at each length, --rounds times, interleaved (ours, theirs, ours, theirs ...: each
    round runs each once, in a fresh process), so that a machine drifting over the run moves all of them
    alike; a row is the median of its rounds, each round the median of --reps steps after a warm-up."""
    have_peft = not args.no_peft and all(_installed(p) for p in ("transformers", "peft"))
    print(
        f"\n### One LoRA+ training step, shape `{args.shape}`\n\n{machine(args.device)}; {args.dtype}; batch 1; "
        f"median of {args.rounds} interleaved rounds, each the median of {args.reps} steps after one warm-up; "
        "S2 groups of N/4"
        + ("" if have_peft or args.no_peft else "; transformers + peft not installed, so that row is missing")
        + "\n"
    )
    print(
        "| N | implementation | attention | ms / step | tokens/s | model TFLOP/s | MFU | peak GB | S2 speed-up "
        "|\n|---|---|---|---|---|---|---|---|---|"
    )
    for N in args.lengths:
        cfg = dict(shape=args.shape, N=N, dtype=args.dtype, reps=args.reps, device=args.device.type)
        variants = [{}] + [dict(quantize=args.quantize)] * bool(args.quantize) + [dict(compile=True)] * args.compile
        cfgs = [dict(cfg, attn=attn, impl="ours", **v) for v in variants for attn in ("full", "s2")]
        cfgs += [dict(cfg, attn="full", impl="hf")] if have_peft else []
        runs = [[run_one(c) for c in cfgs] for _ in range(args.rounds)]
        rows = []
        for i in range(len(cfgs)):
            done = [r[i] for r in runs if "ms" in r[i]]
            if not done:
                rows.append(runs[-1][i])
                continue
            ms = statistics.median(r["ms"] for r in done)
            rows.append({**done[0], "peak_gb": max(r["peak_gb"] for r in done), "ms": ms, "f": done[0]["ms"] / ms})
        for r in rows:
            if "ms" not in r:
                why = "out of memory" if r.get("oom") else r.get("error", "failed")
                print(f"| {N} | {r['impl']} | {r['attn']} | {why} | | | | | |", flush=True)
                continue
            f = r.pop("f")  # the first round's numbers, scaled to the median
            mfu = f"{r['mfu'] * f:.0%}" if r["mfu"] is not None else "n/a"
            full = next((x for x in rows if x["attn"] == "full" and x["impl"] == r["impl"] and "ms" in x), None)
            ratio = f"{full['ms'] / r['ms']:.2f}x" if r["attn"] == "s2" and full else ""
            print(
                f"| {N} | {r['impl']} | {r['attn']} | {r['ms']:.0f} | {r['tokens_per_s'] * f:.0f} | "
                f"{r['tflops'] * f:.3g} | {mfu} | {r['peak_gb']:.1f} | {ratio} |",
                flush=True,
            )
        compiled = [r for r in rows if r.get("compile") and "ms" in r]
        if compiled:
            first = ", ".join(f"{r['attn']} {r['first_s']:.0f} s" for r in compiled)
            print(f"\nN = {N}: the compiled rows' first step (compilation included, not in ms / step): {first}\n")


# ----------------------------------------------------------------------------- packed sequences


class RandomExamples:
    """Supervised examples of random tokens with the given lengths, as data.PackedExamples reads them:
    example(j) -> (inputs, targets), every target learned."""

    def __init__(self, lengths, vocab_size, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.tokens = [torch.randint(0, vocab_size, (n + 1,), generator=g) for n in lengths]
        self.n = len(lengths)

    def example(self, j):
        return self.tokens[j][:-1], self.tokens[j][1:]


def bench_pack(args):
    """--pack against one example per step and padded batches: the same examples, train.py's LoRA+ S2 step
    (groups of N/4) on rows of each layout, the three layouts interleaved `reps` times (median kept)."""
    N, K, b = args.length, args.examples, args.batch
    g = torch.Generator().manual_seed(0)  # LongAlpaca-like: lengths log-uniform from N/16 to N
    lengths = torch.exp(torch.empty(K).uniform_(math.log(N / 16), math.log(N), generator=g)).long().tolist()
    ex = RandomExamples(lengths, SHAPES[args.shape]["vocab_size"])
    packed = data.PackedExamples(ex, N, seed=0)
    layouts = {
        "one example per step": [[ex.example(j)] for j in range(K)],
        f"padded batches of {b}": [[ex.example(j) for j in range(i, min(i + b, K))] for i in range(0, K, b)],
        "--pack": [[packed[i]] for i in range(len(packed.rows(0)))],
    }
    parallel.setup_distributed(args.device.type)
    margs = model.ModelArgs(**SHAPES[args.shape], max_seq_len=N)
    m = train.build_model(
        parallel.random_weights(margs, 42, args.device), train.LongLoRA(seq_len=N), 0, 1, args.device, dtype=args.dtype,
        backend=parallel.default_backend(args.device.type == "cuda", args.dtype),
    )  # fmt: skip
    trainable = [p for p in m.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(trainable, lr=1e-5, betas=(0.9, 0.95))
    times = {name: [] for name in layouts}
    for rep in range(args.reps + 1):  # the first, a warm-up, is not kept
        for name, steps in layouts.items():
            sync(args.device)
            t = time.perf_counter()
            for rows in steps:
                x, y, *documents = data.collate(rows)
                micro = [(x, y, *(documents or [None]), sum(len(r[0]) for r in rows))]
                train.forward_backward(m, micro, trainable, world=1, device=args.device, clip=1.0)
                optim.step()
                optim.zero_grad(set_to_none=True)
            sync(args.device)
            times[name] += [time.perf_counter() - t] if rep else []
    print(
        f"\n### Packed sequences, shape `{args.shape}`, {K} examples of {min(lengths)} to {max(lengths)} tokens "
        f"(log-uniform from N/16 to N = {N}; {sum(lengths):,} tokens)\n\n{machine(args.device)}; {args.dtype}; "
        f"LoRA+, S2 groups of N/4; median of {args.reps} passes over the examples, the layouts interleaved\n"
    )
    print("| layout | steps | positions | padding | real tokens/s | time / --pack's |\n|---|---|---|---|---|---|")
    pack_s = statistics.median(times["--pack"])
    for name, steps in layouts.items():
        t, n, real = statistics.median(times[name]), sum(data.collate(r)[0].numel() for r in steps), sum(lengths)
        print(f"| {name} | {len(steps)} | {n:,} | {1 - real / n:.1%} | {real / t:.0f} | {t / pack_s:.2f}x |")


def bench_fit(args):
    """The longest sequence (a multiple of --step-tokens) a LoRA+ S2 step fits in: doubling, then bisection,
    for at most --fit-minutes (each try is a fresh process running two steps; at 7B and 100k+ tokens a
    try takes minutes)."""
    if args.device.type != "cuda":
        print("\n`fit` needs a CUDA GPU: on a CPU the limit is the machine's RAM and the time you are willing to wait.")
        return
    deadline = time.time() + 60 * args.fit_minutes
    cfg = dict(shape=args.shape, attn="s2", impl="ours", dtype=args.dtype, reps=1, device="cuda", offload=args.offload)
    cfg["quantize"] = args.quantize
    lo, hi, cut, peak = 0, None, None, None  # lo fits, hi does not; cut: a length whose try the time limit stopped
    while cut is None and time.time() < deadline and (hi is None or hi - lo > args.step_tokens):
        # doubling, then bisection
        N = (2 * lo or args.start) if hi is None else (lo + hi) // 2 // args.step_tokens * args.step_tokens
        r = run_one(dict(cfg, N=N), timeout=max(60, deadline - time.time()))
        if str(r.get("error", "")).startswith("over "):
            cut = N
        elif "ms" in r:
            lo, peak = N, r["peak_gb"]
        else:
            hi = N
    found = f"{lo:,} tokens fit" + (
        f", {hi:,} do not (searched in steps of {args.step_tokens})" if hi is not None else ""
    )
    stopped = f"; {cut:,} was cut off by" if cut else "; stopped at" if time.time() >= deadline else ""
    stopped += f" the {args.fit_minutes:g}-minute limit" if stopped else ""
    gb = torch.cuda.get_device_properties(args.device).total_memory / 2**30
    kw = dict(dtype=args.dtype, backend=parallel.default_backend(True, args.dtype), offload=args.offload)
    kw["quantize"] = args.quantize
    model_says = f"the memory model predicts {on_device(memory_model(shape(args, lo), lo, **kw)):.1f} GB" if lo else ""
    print(
        f"\n### Longest LoRA+ S2 training step, shape `{args.shape}`{', offloaded' if args.offload else ''}"
        f"{', ' + args.quantize if args.quantize else ''}\n\n"
        f"{machine(args.device)}; {args.dtype}: {found}{stopped}"
        + (f"; peak {peak:.1f} GB measured, {model_says}" if lo else "")
        + f"; longest predicted to fit in {gb:.0f} GB: {longest(shape(args, 0), gb * 2**30, **kw):,} tokens"
    )


# ----------------------------------------------------------------------------- memory model


def memory_model(
    shape, N, *, world=1, P=1, groups=4, dtype="bfloat16", backend="sdpa", offload=False, loss_chunk=2048, quantize=None
):
    """Predicted peak device memory, in bytes by part, of one process of a LoRA+ S2 run with train.py's
    defaults (rank 8 on wq wk wv wo, embedding and norms trained, AdamW, batch 1, activation
    checkpointing) with S2 groups of N / `groups` tokens, over `world` processes, each sequence split
    over P of them (a slice holds groups / P groups, so P divides `groups`); offload: the checkpointed
    block inputs live in host memory (the "host" entry) instead; quantize="nf4": QLoRA, the blocks' frozen
    linear weights in NF4 as quant.quantize_model stores them. `shape`: ModelArgs or a dict of its fields.
    docs/memory.md writes each term out."""
    if groups % P:
        raise ValueError(f"groups of N/{groups} do not split over {P} processes: P must divide {groups}")
    a = shape if isinstance(shape, model.ModelArgs) else model.ModelArgs(**shape)
    with torch.device("meta"):
        m = train.apply_longlora(
            model.Transformer(a), train.LongLoRA(seq_len=a.max_seq_len)
        )  # LoRA+ as train.py makes it
        if quantize:
            quant.quantize_model(m)
    e = torch.finfo(getattr(torch, dtype)).bits // 8  # bytes per element of activations and gathered weights

    def stored(params):  # bytes in the run's dtype: NF4's codes and absmax are uint8, never cast
        return sum(p.numel() * (1 if p.dtype == torch.uint8 else e) for p in params)

    nf4 = [w for w in m.modules() if isinstance(w, quant.NF4Weight)]
    trained = sum(p.numel() for p in m.parameters() if p.requires_grad)
    frozen = stored(p for p in m.parameters() if not p.requires_grad)
    per_block = stored(m.layers[0].parameters())
    n, G, d, D = N // P, N // groups, a.dim, a.head_dim
    head = a.vocab_size * d * (1 if a.tie_embeddings else 2)  # embedding and output head
    parts = {
        "weights (shards)": (frozen + trained * 4) / world,  # trained weights stay float32
        # NF4's float32 statistics: buffers, whole on every process
        "NF4 scales (every process)": sum(b.numel() * 4 for w in nf4 for b in w.buffers()),
        "gradients + AdamW (shards)": trained * (4 + 8) / world,
        "gathered weights": head * e + 2 * per_block,  # FSDP2: the root's, the block running and the next
        # NF4: the largest linear weight while it is dequantized (int64 byte indices and float32, quant.py)
        "one dequantized weight": max((w.shape[0] * w.shape[1] * 8 for w in nf4), default=0),
        "embedding gradient": a.vocab_size * d * (e + 4),  # unsharded, then float32 for the reduce-scatter
        "block inputs": 0 if offload else a.n_layers * n * d * e,  # what activation checkpointing keeps
        "one block's recompute": n * block_bytes_per_token(a, n, G, e, backend, halo=P > 1),
        "its backward": n * e * (3 * a.hidden_dim + 4 * d),  # gradients in flight (an estimate)
        "loss": n * d * e * 2 + min(loss_chunk, n) * a.vocab_size * (e + 4 + 4) + n * D // 2 * 8,
        "halo": 2 * halo_bytes(a, 1, G, e) if P > 1 else 0,  # the tail sent and the one received
    }
    parts["host"] = a.n_layers * n * d * e if offload else 0
    if not quantize:
        del parts["NF4 scales (every process)"], parts["one dequantized weight"]
    return parts


def shape(args, N):
    """The ModelArgs of --shape at N tokens."""
    return model.ModelArgs(**SHAPES[args.shape], max_seq_len=max(N, 1))


def longest(a, budget, *, world=1, P=1, step=4096, **kw):
    """The longest N (a multiple of `step`) whose predicted peak (memory_model, device parts) is within
    `budget` bytes, less 10% for the CUDA context and the allocator's fragmentation."""

    def fits(N):
        return on_device(memory_model(a, N, world=world, P=P, **kw)) * 2**30 <= 0.9 * budget

    lo, hi = 0, step
    while fits(hi):
        lo, hi = hi, 2 * hi
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def on_device(parts):
    """The device's share of memory_model's parts, in GiB."""
    return sum(v for k, v in parts.items() if k != "host") / 2**30


def bench_memory(args):
    """The memory model's parts at --seq-len, and the longest context it predicts for --gpu-gb."""
    a, N, P = shape(args, args.seq_len), args.seq_len, args.context_parallel
    kw = dict(world=args.world, P=P, groups=args.groups, dtype=args.dtype, backend=args.backend, offload=args.offload)
    kw["quantize"] = args.quantize
    parts = memory_model(a, N, **kw)
    print(
        f"\n### Memory model: shape `{args.shape}`, LoRA+ S2, {N:,} tokens, {args.world} process(es), context "
        f"parallel {P}, groups of N/{args.groups}, {args.dtype}, {args.backend}"
        f"{', offload' if args.offload else ''}{', ' + args.quantize if args.quantize else ''}\n\n"
        "| part | GB per process |\n|---|---|"
    )
    for k, v in parts.items():
        print(f"| {k}{' (host memory)' if k == 'host' else ''} | {v / 2**30:.2f} |")
    print(f"| **device total** | **{on_device(parts):.2f}** |")
    print(
        f"\nLongest context predicted to fit in {args.gpu_gb:g} GB per GPU: "
        f"{longest(a, args.gpu_gb * 2**30, step=args.groups * 1024, **kw):,} tokens (90% of the memory)"
    )
    if args.measure:
        measure_memory(args, a, kw)


def measure_memory(args, a, kw):
    """One LoRA+ S2 step at --seq-len in a fresh process (bench.py's step, one process) against the memory
    model for the backend that step runs. On CPU the peak is the process's resident memory less what it held
    before building the model (Python, torch), and includes the host share of offload; glibc's malloc is told
    to return every freed block over 64 KiB at once (MALLOC_MMAP_THRESHOLD_), or the resident memory would
    count the blocks it keeps for reuse (measured: 1.7 GB instead of 0.96 for `--shape medium --seq-len
    2048`)."""
    if args.world > 1 or args.context_parallel > 1 or args.groups != 4:
        raise ValueError("--measure runs one process with groups of N/4: leave --world, --context-parallel, --groups")
    cfg = dict(shape=args.shape, N=args.seq_len, attn="s2", impl="ours", dtype=args.dtype, reps=1)
    cfg.update(device=args.device.type, offload=args.offload, quantize=args.quantize)
    r = run_one(cfg, **({"MALLOC_MMAP_THRESHOLD_": "65536"} if args.device.type == "cpu" else {}))
    if "ms" not in r:
        print(f"\nMeasured: the step failed ({'out of memory' if r.get('oom') else r.get('error')})")
        return
    backend = parallel.default_backend(args.device.type == "cuda", args.dtype)
    parts = memory_model(a, args.seq_len, **{**kw, "backend": backend})
    predicted = on_device(parts) + (parts["host"] / 2**30 if args.device.type == "cpu" else 0)
    measured = r["peak_gb"] - r["start_gb"]
    print(
        f"\nMeasured on {machine(args.device)}: {r['impl']}, one step of {args.seq_len:,} tokens peaks at "
        f"{measured:.2f} GB"
        + (f" above the {r['start_gb']:.2f} GB the process held before" if r["start_gb"] else "")
        + f"; the memory model ({backend}) predicts {predicted:.2f} GB ({measured / predicted:.2f}x); "
        f"{r['ms'] / 1e3:.1f} s per step"
    )


def block_bytes_per_token(a, n, G, e, backend="sdpa", halo=False):
    """Bytes per token that autograd keeps for backward inside one transformer block, in the dtype's `e`
    bytes per element (what activation checkpointing recomputes, block by block); LoRA+ with rank 8 on wq wk
    wv wo, trained norms, S2-Attn in groups of G over slices of n tokens. Every term is a tensor that
    tests/test_bench.py finds saved (exactly, for sdpa on CPU)."""
    d, f, H, D = a.dim, a.hidden_dim, a.n_heads, a.head_dim
    half = H // 2
    unshifted_kv, shifted_kv = kv_heads_per_half(a)
    # flash through a varlen kernel without GQA (torch < 2.13, no flash-attn: s2attn.flash_repeats_kv):
    # each half's kernel keeps copies of k and v, one per query head, instead of views of the projections
    copies = backend == "flash" and s2attn.flash_repeats_kv() and shifted_kv < H - half
    if copies:
        unshifted_kv, shifted_kv = half, H - half
    kv = unshifted_kv + (0 if copies and halo else shifted_kv)  # kv heads whose k and v the next line counts
    norms = 2 * (4 * d + 4 + e * d)  # each: the float32 input, 1/rms, the normalised output (for its weight)
    lora = 2 * e * d + 4 * e * 8  # the inputs of wq/wk/wv (one tensor) and of wo; A's rank-8 outputs
    qkv = e * (H + 2 * kv) * D  # q, k, v after RoPE, kept by the kernel (views, or the copies above)
    unshifted = (e * D + 4) * half  # its output and logsumexp
    if backend == "sdpa":  # the shifted half is padded to whole groups, n + G tokens: copies of q, k, v, out
        shifted = (n + G) / n * ((2 * e * D + 4) * (H - half) + 2 * e * D * shifted_kv)
    elif halo:  # flash: q, k, v copied to prepend the halo's G - G // 2 tokens (k, v repeated where `copies`);
        # the output, a view of n + that
        shifted = (n + G - G // 2) / n * ((e * D * 2 + 4) * (H - half) + e * D * 2 * shifted_kv)
    else:  # flash: views, and the output
        shifted = (e * D + 4) * (H - half)
    ffn = 3 * e * f  # w1's and w3's outputs, and the SiLU's
    return norms + lora + qkv + unshifted + shifted + ffn


def halo_bytes(a, batch, G, e):
    """Bytes of one halo message (one layer, one direction): the last ceil(G/2) keys and values of the
    shifted heads of `batch` sequences."""
    return batch * (G - G // 2) * 2 * kv_heads_per_half(a)[1] * a.head_dim * e if G > 1 else 0


def kv_heads_per_half(a):
    """(kv heads of the unshifted half, kv heads of the shifted half) as s2attn splits them: a kv head that
    serves query heads in both halves is repeated, one per query head."""
    q, k = (torch.empty(1, 1, heads, 1, device="meta") for heads in (a.n_heads, a.n_kv_heads))
    (_, k1, _), (_, k2, _) = s2attn.split_heads(q, k, k)
    return k1.shape[2], k2.shape[2]


def kernel_list(text):
    """ "flash,cudnn" -> ["flash", "cudnn"], each an SDPA_KERNELS name."""
    names = [t for t in text.split(",") if t]
    unknown = [n for n in names if n not in SDPA_KERNELS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown SDPA kernel {unknown[0]!r}; choose from {','.join(SDPA_KERNELS)}")
    return names


def _installed(name):
    import importlib.util

    return importlib.util.find_spec(name) is not None


def parser(gpu):
    """bench.py's command line; its defaults depend on whether it runs on a GPU (`gpu`)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    parsers = {
        c: sub.add_parser(c, help=h)
        for c, h in (
            ("all", "every table"),
            ("attn", "attention kernels"),
            ("step", "training steps"),
            ("fit", "longest step"),
            ("memory", "the memory model's prediction"),
            ("pack", "packed sequences against padded batches"),
        )
    }
    for c in ("all", "attn"):
        a = parsers[c]
        a.add_argument(
            "--attn-lengths",
            dest="attn_lengths",
            type=ints,
            default=ints("8192,16384,32768,65536,131072" if gpu else "2048,4096,8192,16384"),
        )
        a.add_argument("--group-size", type=int, help="S2 group size G (default N/4, the paper's)")
        a.add_argument("--heads", type=int, default=32 if gpu else 8, help="query heads")
        a.add_argument("--kv-heads", type=int, help="key/value heads (default: --heads)")
        a.add_argument("--head-dim", type=int, default=128 if gpu else 64)
        a.add_argument(
            "--sdpa-kernels",
            type=kernel_list,
            default=kernel_list("flash,cudnn" if gpu else ""),
            help=f"rows with SDPA forced to these kernels, of {','.join(SDPA_KERNELS)} (default: flash,cudnn on "
            "CUDA, none on CPU; '' for none)",
        )
    for c in ("all", "step", "fit", "memory", "pack"):
        a = parsers[c]
        a.add_argument("--shape", choices=SHAPES, default="7b" if gpu else "small", help="model shape")
    for c in ("all", "fit", "memory"):
        parsers[c].add_argument("--offload", action="store_true", help="checkpointed block inputs in host memory")
    for c in ("all", "step", "fit", "memory"):
        parsers[c].add_argument(
            "--quantize", choices=("nf4",), help="QLoRA's frozen weights (train.py --quantize; step: extra rows)"
        )
    a = parsers["memory"]
    a.add_argument("--seq-len", type=int, default=100_000, help="tokens per sequence (default 100000)")
    a.add_argument("--world", type=int, default=1, help="processes (GPUs) sharding the model (default 1)")
    a.add_argument("--context-parallel", type=int, default=1, help="processes per sequence (default 1)")
    a.add_argument("--groups", type=int, default=4, help="S2 groups per sequence, G = N / groups (default 4)")
    a.add_argument("--backend", choices=("sdpa", "flash"), default="flash", help="attention backend (default flash)")
    a.add_argument("--gpu-gb", type=float, default=80, help="memory per GPU for the longest context (default 80)")
    a.add_argument("--measure", action="store_true", help="also run one step at --seq-len and measure its peak")
    for c in ("all", "step"):
        parsers[c].add_argument(
            "--step-lengths",
            dest="step_lengths",
            type=ints,
            default=ints("8192,16384,32768,65536" if gpu else "2048,4096,8192"),
        )
        parsers[c].add_argument("--no-peft", action="store_true", help="leave out the transformers + PEFT rows")
        parsers[c].add_argument("--rounds", type=int, default=3, help="interleaved rounds, median kept (default 3)")
        parsers[c].add_argument("--compile", action="store_true", help="also our rows with each block compiled")
    for c in ("all", "fit"):
        parsers[c].add_argument("--start", type=int, default=32768, help="first length tried (default 32768)")
        parsers[c].add_argument("--step-tokens", type=int, default=4096, help="search resolution (default 4096)")
        parsers[c].add_argument("--fit-minutes", type=float, default=20, help="time limit of the search (default 20)")
    for c in ("all", "pack"):
        parsers[c].add_argument("--length", type=int, default=32768 if gpu else 2048, help="--seq-len of the rows")
        parsers[c].add_argument("--examples", type=int, default=32, help="examples per pass (default 32)")
        parsers[c].add_argument("--batch", type=int, default=4, help="examples per padded batch (default 4)")
    for a in parsers.values():
        a.add_argument(
            "--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto (default): cuda if a GPU is visible"
        )
        a.add_argument(
            "--dtype", choices=("bfloat16", "float32"), default=model.default_dtype("cuda" if gpu else "cpu")
        )
        a.add_argument("--reps", type=int, default=3, help="timed repetitions after one warm-up (median kept)")
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_worker"]:
        return step_worker(json.loads(argv[1]))
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    choice = pre.parse_known_args(argv)[0].device
    gpu = choice == "cuda" or (choice == "auto" and torch.cuda.is_available())  # the defaults below depend on it
    p = parser(gpu)
    args = p.parse_args(argv)
    if gpu and not torch.cuda.is_available():
        p.error(
            "--device cuda, but this process sees no GPU (check CUDA_VISIBLE_DEVICES and the driver); use --device cpu"
        )
    args.device = torch.device("cuda" if gpu else "cpu")
    print(f"python bench.py {' '.join(argv)}")
    if args.cmd in ("all", "attn"):
        bench_attention(argparse.Namespace(**vars(args), lengths=args.attn_lengths))
    if args.cmd in ("all", "step"):
        bench_steps(argparse.Namespace(**vars(args), lengths=args.step_lengths))
    if args.cmd in ("all", "pack"):
        bench_pack(args)
    if args.cmd in ("all", "fit"):
        bench_fit(args)
    if args.cmd == "memory":
        try:
            bench_memory(args)
        except ValueError as e:  # a layout the model refuses (a split that cuts S2 groups)
            p.error(str(e))


if __name__ == "__main__":
    main()
