"""Parallelism for train.py, kept out of the model and the loop: the process group and what its ranks
agree on, FSDP2 sharding from the meta device with each rank holding only its rows, activation
checkpointing and offload, context parallelism's halo, and device facts (peak TFLOP/s, peak memory).

    rank, world, device = parallel.setup_distributed()    # torchrun's group, or a one-process one
    parallel.parallelize(m, device=device, world=world)   # m on the meta device: checkpointing + FSDP2
    parallel.materialize(m, device, rank, world, read)    # each rank allocates and fills its rows

One code path from one CPU process to many GPUs on many nodes: on CUDA nccl carries the collectives of
device tensors and gloo those of host objects; on a CPU gloo carries both.
"""

import contextlib
import datetime
import functools
import math
import os
import resource
import signal
import socket
import time
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

import model
import s2attn

# ----------------------------------------------------------------------------- processes


def setup_distributed(choice="auto"):
    """Join torchrun's process group, or make a one-process group: one code path at every scale. On CUDA,
    process LOCAL_RANK drives GPU LOCAL_RANK and the group carries both CUDA collectives (nccl) and CPU
    ones (gloo: object broadcasts, checkpoint metadata); on CPU it is gloo alone."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            LOCAL_WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
    # Ranks wait at a barrier while rank 0 alone writes the merged model: minutes for a 70B, past the
    # default 10-minute collective timeout.
    timeout = datetime.timedelta(hours=2)
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        gpus, local = torch.cuda.device_count(), int(os.environ["LOCAL_RANK"])
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", local + 1))
        if gpus == 0:
            raise ValueError(
                "--device cuda, but this process sees no GPU (check CUDA_VISIBLE_DEVICES and the driver); use --device "
                "cpu"
            )
        if max(per_node, local + 1) > gpus:
            raise ValueError(
                f"{per_node} processes on this node but {gpus} GPU(s) visible: run one process per GPU "
                f"(torchrun --nproc-per-node {gpus}; a launcher that gives each process one GPU must leave "
                "CUDA_VISIBLE_DEVICES listing all of the node's), or --device cpu"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("cpu:gloo,cuda:nccl", device_id=device, timeout=timeout)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
    return dist.get_rank(), dist.get_world_size(), device


def decide(value):
    """Rank 0's `value`, on every rank: what the ranks must agree on (which checkpoint to resume, whether to
    export) is decided once, so ranks that see the disk differently cannot take different paths and hang."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_all(ok, message):
    """Raise ValueError(message) on every rank if `ok` is False on any: an error that only some ranks
    raised would leave the others waiting in the next collective."""
    oks = [None] * dist.get_world_size()
    dist.all_gather_object(oks, bool(ok))
    if not all(oks):
        raise ValueError(f"{message} (processes {', '.join(str(r) for r, o in enumerate(oks) if not o)})")


def on_rank_zero(fn, rank):
    """fn()'s result, computed on rank 0 alone and given to every rank; an error it raises (bad input)
    is raised on every rank, so none is left waiting in a collective."""
    result = None
    if rank == 0:
        try:
            result = fn()
        except Exception as e:  # any: a corrupt tokenizer file raises tokenizers' plain Exception
            result = (
                e
                if isinstance(e, (FileNotFoundError, FileExistsError, ValueError, ImportError))
                else ValueError(f"{type(e).__name__}: {e}")
            )
    result = decide(result)
    if isinstance(result, Exception):
        raise result
    return result


def max_over_ranks(values, device):
    """The largest of each value over all processes (a list of floats)."""
    t = torch.tensor(values if isinstance(values, (list, tuple)) else [values], device=device, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


class Stop:
    """Whether this process is asked to stop after the step in progress: by SIGTERM (what SLURM,
    Kubernetes and preemptible clouds send before they kill a job) or SIGINT (Ctrl-C), or because its
    launcher died (torchrun starts its workers in sessions of their own, so they would train on). A
    second signal, 2 s or more after the first, stops the process at once (within 2 s it is the same
    request: SLURM signals every process of a job, and torchrun passes the signal on to its workers).
    code(): 0, the signal's number, or ORPHANED; the training loop takes the largest over all processes,
    so that every process stops at the same step. A process blocked in a collective runs no handler:
    the launcher's SIGKILL (torchrun's, 30 s after SIGTERM) or kill -9 ends it."""

    ORPHANED = 1000

    def __init__(self, signals=True):
        self.signal, self.when, self.saved = 0, 0.0, None  # saved: the step of the run's last checkpoint
        self.parent = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None  # torchrun's agent
        if signals:  # (only the main thread can take them)
            for s in (signal.SIGTERM, signal.SIGINT):
                signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        name, now = signal.Signals(signum).name, time.monotonic()
        if self.signal and now - self.when >= 2:
            then = (
                f"--resume continues from the checkpoint of step {self.saved}"
                if self.saved
                else "no checkpoint was written: start the run again, without --resume"
            )
            os.write(2, f"\n{name} again: stopping at once; {then}\n".encode())  # (print may be mid-write)
            os._exit(128 + signum)
        if not self.signal and os.environ.get("RANK", "0") == "0":
            os.write(2, f"\n{name}: stopping after this step, with a checkpoint ({name} again: at once)\n".encode())
        self.signal, self.when = self.signal or signum, self.when or now

    def code(self):
        return self.ORPHANED if self.parent is not None and os.getppid() != self.parent else self.signal

    def why(self, code):
        return "its launcher is gone" if code == self.ORPHANED else signal.Signals(code).name


class Stopped(Exception):
    """The run stopped cleanly before its last step (Stop); the message says how to go on, and `exit` is
    the process's exit status (128 + the signal's number, as a shell reports a process a signal ended)."""

    def __init__(self, message, code):
        super().__init__(message)
        self.exit = 1 if code == Stop.ORPHANED else 128 + code


# ----------------------------------------------------------------------------- sharding


def parallelize(
    m, *, device, world, dtype="bfloat16", checkpointing=True, offload=False, context_parallel=1, compile=False
):
    """Activation checkpointing per block, then FSDP2 over `world` processes: each block is one unit, then
    the root; parameters gathered in `dtype`, gradients reduced in float32. offload=True: the checkpointed
    block inputs wait for backward in host memory (pinned on CUDA) instead of the device's.
    context_parallel=P: each process runs S2-Attn on one of P slices of every sequence (halo_exchange).
    compile=True: each block's forward through torch.compile (regional compilation: one graph per block
    class, reused by every block; FSDP2's gathers and the checkpointing stay outside it, in eager mode). It
    compiles at the first length, again at a second with the length dynamic, and reuses that for every other.
    With context_parallel, the halo's send and receive (torch.distributed.P2POp, which dynamo leaves to eager
    mode) split each block's attention into a graph before and one after them."""
    if context_parallel > 1:
        split_sequences(m, halo_exchange(context_group(context_parallel)))
    m.nll = training_nll
    for block in m.layers:
        if compile:
            block.forward = torch.compile(block.forward)
        if checkpointing:
            block.forward = functools.partial(checkpointed, block.forward, offload=offload, pin=device.type == "cuda")
    # cast_forward_inputs=False: a block's inputs keep their dtype. The hidden states are in `dtype` already (the
    # embedding is gathered in it); RoPE's cos and sin stay float32, as eval.py uses them (FSDP2 would cast
    # every floating-point input: torch 2.11 _fsdp_state.py:258-266, a bf16 copy of the table per block).
    mp = MixedPrecisionPolicy(param_dtype=getattr(torch, dtype), reduce_dtype=torch.float32, cast_forward_inputs=False)
    gather_integers_as_they_are()
    mesh = init_device_mesh(device.type, (world,))
    for block in m.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(m, mesh=mesh, mp_policy=mp)
    return m


def gather_integers_as_they_are():
    """FSDP2 gathers integer parameters (quant.py's NF4 codes) in their own dtype on torch 2.13, which leaves
    non-floating-point parameters out of mixed precision (_fsdp_param.py:597). torch 2.11 gives them the
    policy's param_dtype (FSDPParam.init_dtype_attrs, _fsdp_param.py:438-450): the uint8 codes would travel
    and be gathered as bf16, exact but twice their bytes. This gives torch < 2.13 the 2.13 rule."""
    from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam

    init = FSDPParam.init_dtype_attrs
    if getattr(init, "integers_as_they_are", False):
        return

    def init_dtype_attrs(self, mp_policy):
        init(self, mp_policy)
        if not self.orig_dtype.is_floating_point:
            self.param_dtype = None

    init_dtype_attrs.integers_as_they_are = True
    FSDPParam.init_dtype_attrs = init_dtype_attrs


def materialize(m, device, rank, world, read):
    """Allocate the shards of `m` (on the meta device, sharded by parallelize) on `device` and fill each
    with this rank's rows of read(name), the parameter's whole tensor: a checkpoint read one tensor at a
    time, so host memory per process is its share plus one tensor."""
    m.to_empty(device=device)
    with torch.no_grad():
        for name, p in m.named_parameters():
            keep_rows(p, read(name), rank, world)
        for name, b in m.named_buffers():  # not sharded: whole on every rank (quant.py's few statistics)
            b.copy_(read(name))
    return m


def keep_rows(p, full, rank, world):
    """Copy this rank's rows of `full` into p, a parameter FSDP2 sharded on dim 0 the way torch.chunk
    splits: rank r holds rows [r * c, (r + 1) * c), c = ceil(rows / world) (fewer, or none, at the end)."""
    local = p.to_local()
    start = min(rank * -(-full.shape[0] // world), full.shape[0])
    local.copy_(full.narrow(0, start, local.shape[0]))


def random_weights(params, seed=0, device="cpu"):
    """(ModelArgs, model.Weights) of a fresh model, for pretraining from scratch (--init; how demo/model was
    made): every matrix N(0, 0.02), those writing into the residual stream (wo, w2) scaled by 1/sqrt(2
    n_layers) (GPT-2), norms 1, biases 0. `params`: a ModelArgs, a params.json or a folder with one. Each tensor has
    its own seed (from `seed` and its name), so that materialize can have each rank make only the tensor it
    is filling, never the whole model; made on `device`, whose generator decides the values.
    model.build(*random_weights(params)) is the whole model in one process."""
    args = params
    if not isinstance(params, model.ModelArgs):
        f = Path(params) / "params.json" if Path(params).is_dir() else Path(params)
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: --init wants a params.json (dim, n_layers, n_heads, vocab_size)")
        args = model.read_params(f, required=("dim", "n_layers", "n_heads", "vocab_size"))
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in model.Transformer(args).state_dict().items()}

    def make(name):
        if name.endswith(("norm.weight", ".bias")):  # norms 1, biases 0
            return torch.full(shapes[name], float(name.endswith("norm.weight")), device=device)
        std = 0.02 / math.sqrt(2 * args.n_layers) if name.endswith(("wo.weight", "w2.weight")) else 0.02
        g = torch.Generator(device).manual_seed((seed * 2**32 + zlib.crc32(name.encode())) % 2**63)
        return torch.randn(shapes[name], generator=g, device=device) * std

    return args, model.Weights(shapes, make, torch.float32)


def checkpointed(forward, *args, offload=False, pin=False, **kwargs):
    """forward(*args, **kwargs) under activation checkpointing: only its inputs are kept for backward,
    which runs it again. offload: those inputs are kept in host memory, pinned where `pin` (torch 2.13's
    save_on_cpu copies them there asynchronously, 2.11's waits for each copy). (Non-reentrant checkpointing saves
    its inputs through autograd's saved-tensor hooks, outside its own, so save_on_cpu takes exactly them;
    the recompute in backward runs outside it, on the device.)"""
    with torch.autograd.graph.save_on_cpu(pin_memory=pin) if offload else contextlib.nullcontext():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def training_nll(h, w, targets, chunk):
    """model.chunked_nll, keeping no chunk's logits for backward when gradients are on: a trained output
    weight w recomputes them there (each chunk checkpointed), a frozen one (LoRA) has d nll / d h made in
    the forward (NLLFrozenHead). parallelize puts it in the model (Transformer.nll)."""
    if not torch.is_grad_enabled():
        return model.chunked_nll(h, w, targets, chunk)
    if not w.requires_grad:
        return NLLFrozenHead.apply(h, w, targets, chunk)
    one = lambda hs, ts: model.nll_of(model.log_probs(F.linear(hs, w)), ts)  # noqa: E731
    nll = [checkpoint(one, hs, ts, use_reentrant=False) for hs, ts in model.chunks(h, targets, chunk)]
    return torch.cat(nll).view(targets.shape)


class NLLFrozenHead(torch.autograd.Function):
    """model.chunked_nll for an output weight w that does not train. Per position the gradient of -log p(t) with
    respect to h is (softmax(logits) - onehot(t)) @ w, so each chunk computes it right after its loss and
    drops its logits; backward only scales it by the incoming gradient. The head runs twice per chunk
    instead of three times (forward, its recompute, the gradient), and no logits wait for backward."""

    @staticmethod
    def forward(ctx, h, w, targets, chunk):
        nll, dh = [], []
        for hs, ts in model.chunks(h, targets, chunk):
            logp = model.log_probs(F.linear(hs, w))  # (chunk, vocab)
            nll.append(model.nll_of(logp, ts))
            p = logp.exp_()  # softmax, in logp's place
            keep = (ts != model.IGNORE)[:, None]
            p.scatter_add_(-1, ts.clamp(min=0)[:, None], -keep.to(p.dtype)).mul_(keep)  # - onehot; IGNORE: 0
            dh.append(p.to(w.dtype) @ w)  # (chunk, dim)
        ctx.save_for_backward(torch.cat(dh).view(h.shape))
        return torch.cat(nll).view(targets.shape)

    @staticmethod
    def backward(ctx, g):
        (dh,) = ctx.saved_tensors
        return (g[..., None] * dh).to(dh.dtype), None, None, None


# ----------------------------------------------------------------------------- context parallelism
# Every sequence is split into P contiguous slices held by P consecutive processes (a context group);
# data parallelism runs over the world / P groups. Slices start on S2-Attn group borders, so the only
# traffic is the halo: per layer, each process sends its last ceil(G/2) keys and values of the shifted
# heads to the next slice's process, and in backward their gradients come back.


def context_group(P):
    """This process's group of P consecutive ranks, [P * (rank // P), P * (rank // P) + P)."""
    group, _ = dist.new_subgroups(group_size=P)  # every rank makes every group, in the same order
    return group


def split_sequences(m, halo):
    """Context parallelism on model `m`: every layer's S2-Attn runs on this process's slice of each sequence
    (s2_attention_on_slice), exchanging keys and values with the neighbouring slices through `halo`
    (halo_exchange's, or a stand-in that carries them in one process). The model's forward then takes the
    slice's first position (its `positions`)."""
    a = m.layers[0].attention
    if a.group_size is None:
        raise ValueError("a halo splits S2-Attn's groups over processes: full attention needs whole sequences")
    for layer in m.layers:
        layer.attention.s2_attention = functools.partial(s2_attention_on_slice, halo=halo)
    return m


def s2_attention_on_slice(q, k, v, group_size, backend="sdpa", shift=True, documents=None, *, halo):
    """s2attn.s2_attention on one slice of each sequence, the slice starting on a group border and a
    multiple of G long. The unshifted heads need nothing from outside it. The shifted heads' first group
    here, [0, G/2), is the end of a group that began h = G - G // 2 tokens earlier, on the previous slice:
    halo(tail) sends this slice's last h keys and values, tail (B, h, 2 Hkv, D), to the next slice, and
    returns the previous slice's, (B, h, 2 Hkv, D), or (B, 0, 2 Hkv, D) on the first slice; its backward
    returns their gradients. Prepended to this slice's keys and values, they make the groups [0, G),
    [G, 2G), ... of a sequence of h + N tokens (or [0, G/2), [G/2, 3G/2), ... without them)."""
    G, (B, N) = group_size, q.shape[:2]
    if N % G:
        raise ValueError(f"a slice of {N} tokens: context parallelism needs slices a multiple of group_size={G} long")
    if backend == "naive":
        raise ValueError("the naive backend is the definition, on whole sequences: use sdpa or flash with a halo")
    if documents is not None:
        raise ValueError("context parallelism (a halo) splits rows of one document: packed documents are not supported")
    if not shift or G == 1:  # every group lies inside the slice
        return s2attn.s2_attention(q, k, v, G, backend=backend, shift=shift)
    (q1, k1, v1), (q2, k2, v2) = s2attn.split_heads(q, k, v)
    out1 = s2attn.group_attention(q1, k1, v1, G, first=G, backend=backend)  # (B, N, H // 2, D)
    h = G - G // 2
    kv = halo(torch.cat([k2[:, -h:], v2[:, -h:]], dim=2))  # (B, L, 2 Hkv, D), L = h or 0 (the first slice)
    L = kv.shape[1]
    k_prev, v_prev = kv.chunk(2, dim=2)  # (B, L, Hkv, D) each
    q2 = torch.cat([q2.new_zeros(B, L, *q2.shape[2:]), q2], dim=1)  # the halo's tokens ask nothing: zero queries
    k2, v2 = torch.cat([k_prev, k2], dim=1), torch.cat([v_prev, v2], dim=1)
    out2 = s2attn.group_attention(q2, k2, v2, G, first=L + G // 2, backend=backend)[:, L:]  # zero queries dropped
    return torch.cat([out1, out2], dim=2)  # (B, N, H, D)


def halo_exchange(group):
    """S2-Attn's halo for the context group `group` (s2_attention_on_slice): halo(tail) sends this slice's
    tail (B, h, ...) to the next slice's process and returns the previous slice's, or (B, 0, ...) on the
    first slice; backward sends the gradient of what it received back, and returns the gradient of the
    tail (zero on the last slice, whose tail went nowhere). The first and last slices take part in both
    directions, so every process runs the same sequence of exchanges, in forward, in the recompute of
    activation checkpointing and in backward. halo.sent counts the bytes this process has sent."""
    ranks = dist.get_process_group_ranks(group)
    i = ranks.index(dist.get_rank())
    prev, nxt = (ranks[i - 1] if i > 0 else None), (ranks[i + 1] if i + 1 < len(ranks) else None)

    def swap(send, to, shape, source):
        """Send `send` to rank `to`, and receive a tensor of `shape` (and send's dtype) from rank `source`
        (None: no such peer)."""
        ops, got = [], None
        if to is not None:
            ops.append(dist.P2POp(dist.isend, send.contiguous(), to, group))
            halo.sent += send.numel() * send.element_size()
        if source is not None:
            got = send.new_empty(shape)
            ops.append(dist.P2POp(dist.irecv, got, source, group))
        for work in dist.batch_isend_irecv(ops) if ops else []:
            work.wait()
        return got

    class Halo(torch.autograd.Function):
        @staticmethod
        def forward(ctx, tail):
            ctx.shape = tail.shape
            got = swap(tail, nxt, tail.shape, prev)
            return got if got is not None else tail.new_empty(tail.shape[0], 0, *tail.shape[2:])

        @staticmethod
        def backward(ctx, grad):
            got = swap(grad, prev, ctx.shape, nxt)
            return got if got is not None else grad.new_zeros(ctx.shape)

    def halo(tail):
        return Halo.apply(tail)

    halo.sent = 0
    return halo


# ----------------------------------------------------------------------------- device facts


def default_backend(on_cuda, dtype):
    """flash where it runs (CUDA, with flash-attn or torch's varlen kernel) and in bf16, else sdpa."""
    return "flash" if on_cuda and "flash" in model.BACKENDS and dtype == "bfloat16" else "sdpa"


def train_flops(margs, seq_len, *, group_size=None, lora=True):
    """Model FLOPs of one training pass over one sequence, for MFU (the recompute of activation
    checkpointing is not counted). Backward is 2x forward where weights train (gradients of inputs and
    weights), 1x for frozen matmuls (inputs only: LoRA's base weights and head), 2x for attention (q, k, v).
    The adapters' own rank-r matmuls are left out: under 1% at rank 8. group_size=None: full attention;
    lora=False: every weight trains."""
    f = model.forward_flops(margs, seq_len, group_size)
    return 3 * f["attn"] + 2 * (f["proj"] + f["ffn"] + f["others"]) if lora else 3 * sum(f.values())


def step_flops(margs, micro, parts, **kw):
    """This process's share of the model FLOPs of a step's micro-batches: train_flops(**kw) per sequence
    (per document of packed rows: each attends to itself); with context parallelism each process holds
    1/parts of every sequence."""

    def lengths(x, d):  # the sequences of a micro-batch: its rows, or the documents of its packed rows
        if d is None:
            return [x.shape[1] * parts] * x.shape[0]
        return [int(n) for row in d for n in row.unique_consecutive(return_counts=True)[1]]

    return sum(train_flops(margs, n, **kw) for x, _, d, _ in micro for n in lengths(x, d)) / parts


# Dense bf16 peaks (TFLOP/s): NVIDIA's datasheet figures "with sparsity", halved. Matched against
# torch.cuda.get_device_name ("NVIDIA H100 80GB HBM3", "NVIDIA H100 NVL", ...): the first key it contains
# wins, so every variant comes before its family's SXM entry (and GB200 before B200).
PEAK_BF16_TFLOPS = (
    ("H100 NVL", 835.5),
    ("H100 PCIe", 756.0),
    ("H800 PCIe", 756.0),
    ("H200 NVL", 835.5),
    ("H100", 989.4),
    ("H800", 989.4),
    ("H200", 989.4),  # SXM, and GH200 (the same chip)
    ("GB200", 2500.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
)


def peak_tflops(device, dtype, given=None):
    """The device's peak TFLOP/s in `dtype` for the MFU: `given` (--peak-tflops), else the known bf16
    peak of the GPU, else None (a CPU, float32, an unknown GPU)."""
    if given or device.type != "cuda" or dtype != "bfloat16":
        return given
    return known_peak(torch.cuda.get_device_name(device))


def known_peak(name):
    """The dense bf16 TFLOP/s of the GPU called `name`, or None if it is not in PEAK_BF16_TFLOPS."""
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def peak_memory_gb(device):
    """(device, host) peak memory of this process so far in GiB: the GPU's allocations on CUDA, the
    process's resident memory on CPU; and the process's peak resident memory: VmHWM on Linux, since
    ru_maxrss keeps the parent's peak across exec (a worker started by a 2 GB process reads 2 GB)."""
    try:
        with open("/proc/self/status") as f:
            host = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**20  # KiB
    except (OSError, StopIteration):
        host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux, bytes on macOS
    return (torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else host), host
