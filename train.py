"""LongLoRA fine-tuning: S2-Attn at the target length, Position Interpolation, LoRA+, plain torch FSDP2.

    python train.py                                                           # the demo (demo.py), on a CPU
    python train.py --model DIR --data train.bin --seq-len 8192 --out runs/a  # one process, CPU or GPU
    torchrun --nproc-per-node 8 train.py --model llama-2-7b --data redpajama.bin --seq-len 8192 --out runs/7b-8k
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 train.py ...  # nodes

The same code runs everywhere: without torchrun it makes a one-process group, so one process and 64 go
through the same FSDP2 path (--device: gloo on CPU; on CUDA one process per GPU, nccl). Past one GPU's
memory: --offload-activations (block inputs in host memory) and --context-parallel P (each sequence over
P processes, which exchange only S2-Attn's half-group halo; docs/memory.md). The defaults are the
paper's (§4.1): AdamW (0.9, 0.95), no weight decay, lr 2e-5 with 20 warm-up steps then constant,
per-device batch 1 with 8 gradient-accumulation steps (global batch 64 on 8 GPUs), 1000 steps, bf16,
LoRA rank 8 / alpha 16 on wq wk wv wo with the token embedding and every norm trainable, S2-Attn groups
of a quarter of the training length, RoPE positions interpolated by ceil(seq_len / the model's context).

Writes to --out: log.jsonl (one line per step: loss, lr, grad norm, tokens/s, model TFLOP/s and MFU, peak memory),
checkpoints/step-NNNNNNN/ every --save-every steps (trainable weights, optimizer, RNG; --resume continues
from the latest), and at the end, each with the tokenizer beside it:
    merged/                 the base with the training folded in, in the base's format (--export-format):
                            model.load, eval.py and, in HF format, transformers open it as it is
    adapter/                LoRA runs: a PEFT adapter (LoRA + trained embedding and norms) for the HF base,
                            with base_config.json, the RoPE scaling the base must be loaded with
    trainable.safetensors   LoRA runs: the same weights in this codebase's names (lora.load_trainable)
"""

import argparse
import contextlib
import datetime
import functools
import json
import math
import os
import resource
import shutil
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import data
import hf
import lora
import model as llama

# Settings a resumed run must share with the run it continues (the rest, e.g. --steps, may change).
SAME_ON_RESUME = (
    "model",
    "data",
    "sft",
    "seq_len",
    "attn",
    "group_size",
    "lora_rank",
    "lora_alpha",
    "lora_targets",
    "trainable",
    "rope_scale",
    "grad_accum",
    "dtype",
    "seed",
    "optim",
    "weight_decay",
    "init",
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument_group("what to train")
    a.add_argument(
        "--model", required=True, help="base model: a Meta folder, an HF folder, or a merged/ folder of an earlier run"
    )
    a.add_argument(
        "--init",
        action="store_true",
        help="pretrain from scratch: --model is only a params.json (or a folder with one), "
        "the weights start random (model.init); needs --lora-rank 0 and --attn full",
    )
    a.add_argument(
        "--data", help="token file (FILE.bin from `python data.py tokenize`) read in windows of --seq-len tokens"
    )
    a.add_argument("--sft", help="supervised examples instead: LongAlpaca .json/.jsonl (instruction, input, output)")
    a.add_argument(
        "--tokenizer",
        help="tokenizer for --sft, copied beside the exported model (default: the one in --model, "
        "else the one the --data file was tokenized with)",
    )
    a.add_argument("--out", required=True, help="run folder: log, checkpoints, trainable weights, merged model")
    a = p.add_argument_group("LongLoRA")
    a.add_argument("--seq-len", type=int, default=8192, help="training length in tokens (default 8192)")
    a.add_argument(
        "--attn",
        choices=("s2", "full", "short"),
        default="s2",
        help="S2-Attn (default), full attention, or short: S2's groups without the shift (paper Table 1's ablation)",
    )
    a.add_argument("--group-size", type=int, help="S2-Attn group size in tokens (default seq-len/4, paper Table 11)")
    a.add_argument(
        "--backend",
        choices=llama.ALL_BACKENDS,
        help="attention kernel (default: flash where available and bf16, else sdpa)",
    )
    a.add_argument(
        "--rope-scale",
        type=float,
        help="Position Interpolation factor applied on top of the model's own "
        "(default: ceil(seq-len / the model's context), e.g. 2 for Llama 2 at 8192)",
    )
    a.add_argument("--lora-rank", type=int, default=8, help="LoRA rank (default 8); 0 = full fine-tuning")
    a.add_argument("--lora-alpha", type=float, default=16, help="LoRA alpha (default 16)")
    a.add_argument(
        "--lora-targets", default="wq,wk,wv,wo", help="Linear layers that get adapters (default wq,wk,wv,wo)"
    )
    a.add_argument(
        "--trainable",
        default="embed,norm",
        help="trained besides the adapters: LoRA+ is embed,norm (default); '' = plain LoRA",
    )
    a = p.add_argument_group("optimisation")
    a.add_argument(
        "--lr", type=float, default=2e-5, help="peak learning rate (default 2e-5; the paper uses 1e-5 for 70B)"
    )
    a.add_argument("--warmup", type=int, default=20, help="linear warm-up steps, then --schedule (default 20)")
    a.add_argument(
        "--schedule",
        choices=("constant", "cosine"),
        default="constant",
        help="after warm-up: constant (default, the paper's) or cosine decay to lr/10 at --steps (pretraining)",
    )
    a.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000)")
    a.add_argument("--batch-size", type=int, default=1, help="sequences per device per micro-step (default 1)")
    a.add_argument("--grad-accum", type=int, default=8, help="micro-steps per optimizer step (default 8)")
    a.add_argument("--optim", choices=("adamw", "sgd"), default="adamw", help="AdamW(0.9, 0.95) (default) or plain SGD")
    a.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    a.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping (default 1.0; 0 = off)")
    a.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        default="bfloat16",
        help="compute dtype (default bfloat16); trainable weights stay float32",
    )
    a.add_argument(
        "--loss-chunk", type=int, default=2048, help="tokens per chunk of the output-head loss (default 2048)"
    )
    a.add_argument(
        "--no-activation-checkpointing",
        action="store_true",
        help="keep every block's activations (faster, much more memory)",
    )
    a.add_argument(
        "--offload-activations",
        action="store_true",
        help="keep the checkpointed block inputs in (pinned) host memory until backward (the longest context on a GPU)",
    )
    a.add_argument(
        "--context-parallel",
        type=int,
        default=1,
        metavar="P",
        help="split every sequence into P slices over P processes (S2-Attn: each needs only a half-group halo "
        "from the previous one); data parallelism over the world size / P groups (default 1)",
    )
    a.add_argument(
        "--device",
        choices=("auto", "cuda", "cpu"),
        default="auto",
        help="cuda: process LOCAL_RANK drives GPU LOCAL_RANK (one process per GPU); cpu: gloo on CPU cores; "
        "auto (default): cuda when a GPU is visible",
    )
    a.add_argument(
        "--peak-tflops",
        type=float,
        help="the device's peak TFLOP/s in --dtype, for the MFU in the log "
        "(default: PEAK_BF16_TFLOPS, the known dense bf16 peaks of A100 to GB200; none on CPU)",
    )
    a.add_argument("--seed", type=int, default=42, help="seed of the adapters' init and of the data order (default 42)")
    a = p.add_argument_group("checkpoints and output")
    a.add_argument(
        "--save-every", type=int, default=100, help="checkpoint every N steps (default 100; 0 = only at the end)"
    )
    a.add_argument("--keep", type=int, default=2, help="checkpoints kept (default 2)")
    a.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    a.add_argument("--export-format", choices=("meta", "hf"), help="format of OUT/merged (default: the base model's)")
    args = p.parse_args(argv)
    if args.group_size is not None and args.group_size < 1:
        p.error(f"--group-size {args.group_size}: an S2-Attn group holds at least 1 token (default: --seq-len / 4)")
    args.group_size = args.group_size or max(1, args.seq_len // 4)
    on_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    runs_here = llama.BACKENDS if on_cuda else ("naive", "sdpa")
    args.backend = args.backend or default_backend(on_cuda, args.dtype)
    if args.backend not in runs_here:
        p.error(
            f"--backend {args.backend} runs on CUDA only: use --backend sdpa on CPU"
            if not on_cuda
            else f"--backend {args.backend} needs flash-attn (pip install flash-attn --no-build-isolation) "
            "or a torch with torch.nn.attention.varlen; or use --backend sdpa"
        )
    if (args.data is None) == (args.sft is None):
        p.error("give exactly one of --data (a token file) and --sft (supervised examples)")
    if args.init and (args.lora_rank or args.attn != "full"):
        p.error("--init pretrains a model from random weights: give it --lora-rank 0 and --attn full")
    if args.offload_activations and args.no_activation_checkpointing:
        p.error("--offload-activations offloads the checkpointed block inputs: drop --no-activation-checkpointing")
    if args.attn != "full" and args.group_size > args.seq_len:
        p.error(
            f"--group-size {args.group_size} is larger than --seq-len {args.seq_len}: S2-Attn needs groups shorter "
            "than the sequence"
        )
    P = args.context_parallel
    if P > 1 and args.attn == "full":
        p.error(
            "--context-parallel splits S2-Attn's groups over processes; full attention needs the whole sequence in "
            "every process: use --attn s2"
        )
    if P > 1 and args.backend == "naive":
        p.error("--context-parallel runs the sdpa and flash backends (naive is the definition, on whole sequences)")
    if P > 1 and args.seq_len % (P * args.group_size):
        p.error(
            f"--seq-len {args.seq_len} in --context-parallel {P} slices: each slice must be a whole number of "
            f"--group-size {args.group_size} groups, so --seq-len must be a multiple of {P * args.group_size}"
        )
    for name in ("seq_len", "steps", "batch_size", "grad_accum", "loss_chunk", "keep", "context_parallel"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def default_backend(on_cuda, dtype):
    """flash where it runs (CUDA, with flash-attn or torch's varlen kernel) and in bf16, else sdpa."""
    return "flash" if on_cuda and "flash" in llama.BACKENDS and dtype == "bfloat16" else "sdpa"


# ----------------------------------------------------------------------------- setup


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


def build_model(
    source,
    rank,
    world,
    device,
    *,
    init=False,
    seed=42,
    dtype="bfloat16",
    checkpointing=True,
    offload=False,
    context_parallel=1,
    **longlora,
):
    """The base model `source` (a checkpoint folder; with init=True a params.json or a ModelArgs, random
    weights) with LongLoRA applied (`longlora`: apply_longlora's settings) and sharded over the `world`
    processes, each holding only its rows of every tensor: the model is built on the meta device (no
    memory), LongLoRA is applied and FSDP2 shards it there, then each process allocates its shards on
    `device` and fills them from the checkpoint read one tensor at a time. Host memory per process: its
    share, plus one tensor."""
    margs, weights = llama.random_weights(source, seed, device) if init else llama.read_checkpoint(source)
    with torch.device("meta"):
        m = llama.Transformer(margs)
    apply_longlora(m, seed=seed, dtype=dtype, **longlora)
    parallelize(
        m,
        device=device,
        world=world,
        dtype=dtype,
        checkpointing=checkpointing,
        offload=offload,
        context_parallel=context_parallel,
    )
    m.to_empty(device=device)
    torch.manual_seed(seed)  # the adapters add_lora makes in one process, in its order: alike for any world size
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, lora.LoRALinear):
                a, b = (torch.empty(p.shape, dtype=weights.dtype) for p in (mod.lora_a, mod.lora_b))
                lora.init_adapter(a, b)
                keep_rows(mod.lora_a, a, rank, world)
                keep_rows(mod.lora_b, b, rank, world)
        for name, p in m.named_parameters():
            if "lora_" not in name:
                keep_rows(p, weights[name], rank, world)
    return m


def keep_rows(p, full, rank, world):
    """Copy this rank's rows of `full` into p, a parameter FSDP2 sharded on dim 0 the way torch.chunk
    splits: rank r holds rows [r * c, (r + 1) * c), c = ceil(rows / world) (fewer, or none, at the end)."""
    local = p.to_local()
    start = min(rank * -(-full.shape[0] // world), full.shape[0])
    local.copy_(full.narrow(0, start, local.shape[0]))


def apply_longlora(
    m,
    *,
    seq_len,
    rope_scale=None,
    lora_rank=8,
    lora_alpha=16,
    lora_targets=("wq", "wk", "wv", "wo"),
    trainable=("embed", "norm"),
    attn="s2",
    group_size=None,
    backend="sdpa",
    dtype="bfloat16",
    seed=42,
):
    """LongLoRA's three switches on model `m`, in place: Position Interpolation to reach `seq_len`
    (by `rope_scale`, default the smallest integer factor that does), LoRA+ (adapters of `lora_rank` on
    `lora_targets`, and the `trainable` groups), and the attention `attn` ("s2", "full" or "short") in
    groups of `group_size` (default seq_len / 4). Frozen weights in `dtype`, trainable ones in float32."""
    context = m.args.max_seq_len
    scale = rope_scale or max(1, math.ceil(seq_len / context))
    if int(context * scale) < seq_len:
        raise ValueError(
            f"--rope-scale {scale:g} extends the model's context of {context} tokens to {int(context * scale)}, "
            f"short of --seq-len {seq_len}: leave --rope-scale out (then it is {math.ceil(seq_len / context)})"
        )
    m.extend_context(scale)
    torch.manual_seed(seed)  # the same adapters on every rank
    if lora_rank:
        lora.add_lora(m, lora_rank, lora_alpha, targets=tuple(lora_targets))
        lora.set_trainable(m, extra=tuple(trainable))
    m.set_attention(
        group_size=None if attn == "full" else group_size or max(1, seq_len // 4), backend=backend, shift=attn == "s2"
    )
    for p in m.parameters():  # frozen weights in the compute dtype; trainable ones in float32 for the optimizer
        p.data = p.data.to(torch.float32 if p.requires_grad else getattr(torch, dtype))
    return m


def parallelize(m, *, device, world, dtype="bfloat16", checkpointing=True, offload=False, context_parallel=1):
    """Activation checkpointing per block, then FSDP2 over `world` processes: each block is one unit, then
    the root; parameters gathered in `dtype`, gradients reduced in float32. offload=True: the checkpointed
    block inputs wait for backward in host memory (pinned on CUDA) instead of the device's.
    context_parallel=P: each process runs S2-Attn on one of P slices of every sequence (halo_exchange)."""
    if context_parallel > 1:
        a = m.layers[0].attention
        m.set_attention(a.group_size, a.backend, a.shift, halo=halo_exchange(context_group(context_parallel)))
    if checkpointing:
        for block in m.layers:
            block.forward = functools.partial(checkpointed, block.forward, offload=offload, pin=device.type == "cuda")
    mp = MixedPrecisionPolicy(param_dtype=getattr(torch, dtype), reduce_dtype=torch.float32)
    mesh = init_device_mesh(device.type, (world,))
    for block in m.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(m, mesh=mesh, mp_policy=mp)
    return m


def checkpointed(forward, *args, offload=False, pin=False, **kwargs):
    """forward(*args, **kwargs) under activation checkpointing: only its inputs are kept for backward,
    which runs it again. offload: those inputs are kept in host memory, pinned where `pin` (torch 2.13's
    save_on_cpu copies them there asynchronously, 2.11's waits for each copy). (Non-reentrant checkpointing saves
    its inputs through autograd's saved-tensor hooks, outside its own, so save_on_cpu takes exactly them;
    the recompute in backward runs outside it, on the device.)"""
    with torch.autograd.graph.save_on_cpu(pin_memory=pin) if offload else contextlib.nullcontext():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)


# ----------------------------------------------------------------------------- context parallelism
# Every sequence is split into P contiguous slices held by P consecutive processes (a context group);
# data parallelism runs over the world / P groups. Slices start on S2-Attn group borders, so the only
# traffic is the halo: per layer, each process sends its last ceil(G/2) keys and values of the shifted
# heads to the next slice's process, and in backward their gradients come back.


def context_group(P):
    """This process's group of P consecutive ranks, [P * (rank // P), P * (rank // P) + P)."""
    group, _ = dist.new_subgroups(group_size=P)  # every rank makes every group, in the same order
    return group


def halo_exchange(group):
    """S2-Attn's halo for the context group `group` (s2attn._with_halo): halo(tail) sends this slice's
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


def longlora_settings(args):
    """apply_longlora's keyword arguments from the command line's flags."""
    return dict(
        seq_len=args.seq_len,
        rope_scale=args.rope_scale,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_targets=split_list(args.lora_targets),
        trainable=split_list(args.trainable),
        attn=args.attn,
        group_size=args.group_size,
        backend=args.backend,
    )


def split_list(text):
    """ "wq,wk" -> ("wq", "wk"); "" -> ()."""
    return tuple(t for t in text.split(",") if t)


def load_data(args, vocab_size):
    if args.data:
        ds = data.TokenWindows(args.data, args.seq_len, seed=args.seed)
        if ds.meta["max_id"] >= vocab_size:
            raise ValueError(
                f"{args.data} holds token ids up to {ds.meta['max_id']}, but the model's vocabulary has {vocab_size}: "
                f"it was tokenized with another tokenizer ({ds.meta['tokenizer']})"
            )
        return ds, 0
    tok = data.load_tokenizer(args.tokenizer or args.model)
    if tok.vocab_size > vocab_size:
        raise ValueError(
            f"the tokenizer has {tok.vocab_size} tokens but the model {vocab_size}: use the model's own tokenizer"
        )
    return data.SFTExamples(args.sft, tok, args.seq_len, seed=args.seed), tok.eos_id


# ----------------------------------------------------------------------------- checkpoints


def checkpoints(out):
    return sorted((out / "checkpoints").glob("step-*"))


def save_checkpoint(out, step, m, optim, args, rank, world, device):
    """Write checkpoints/step-N via a temporary folder renamed when complete: a kill at any moment leaves
    the previous checkpoint intact, and a half-written one is never mistaken for a checkpoint."""
    final, tmp = out / "checkpoints" / f"step-{step:07d}", out / "checkpoints" / f".partial-step-{step:07d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(m, optim, options=StateDictOptions(ignore_frozen_params=True))
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None  # this rank's GPU's: one per rank
    torch.save({"cpu": torch.get_rng_state(), "cuda": cuda_rng}, tmp / f"rng-{rank}.pt")
    dist.barrier()
    if rank == 0:
        (tmp / "state.json").write_text(json.dumps({"step": step, "world": world, "args": vars(args)}, indent=2))
        os.replace(tmp, final)
        for old in checkpoints(out)[: -args.keep]:
            shutil.rmtree(old)
    dist.barrier()


def load_checkpoint(ckpt, m, optim, args, rank, world, device):
    """Restore trainable weights, optimizer and RNG from `ckpt`; returns its step."""
    try:
        state = json.loads((ckpt / "state.json").read_text())
        saved = state["args"]
        changed = [
            f"--{k.replace('_', '-')} {saved.get(k)} -> {getattr(args, k)}"
            for k in SAME_ON_RESUME
            if saved.get(k) != getattr(args, k)
        ]
        before = saved["batch_size"] * state["world"] // saved.get("context_parallel", 1)
        if before != args.batch_size * world // args.context_parallel:
            changed.append(
                f"sequences per micro-step (batch size x processes / context parallel) {before} -> "
                f"{args.batch_size * world // args.context_parallel}"
            )
        if changed:
            raise ValueError(
                f"cannot resume {ckpt}: these settings differ from the run that wrote it: {'; '.join(changed)}"
            )
        model_sd, optim_sd = get_state_dict(m, optim, options=StateDictOptions(ignore_frozen_params=True))
        sd = {"model": model_sd, "optim": optim_sd}
        dcp.load(sd, checkpoint_id=str(ckpt))
        set_state_dict(
            m,
            optim,
            model_state_dict=sd["model"],
            optim_state_dict=sd["optim"],
            options=StateDictOptions(ignore_frozen_params=True, strict=False),
        )
        rng_file = ckpt / f"rng-{rank}.pt"  # a run resumed on more processes: the new ranks take rank 0's
        rng = torch.load(rng_file if rng_file.exists() else ckpt / "rng-0.pt", weights_only=True)
    except ValueError:
        raise
    except (Exception, dcp.api.CheckpointException) as e:  # a damaged checkpoint (the latter is a BaseException)
        # DCP's text holds tracebacks
        cause = ([line for line in str(e).splitlines() if line.strip()] or [type(e).__name__])[-1]
        raise ValueError(
            f"checkpoint {ckpt} cannot be read ({cause}); delete that folder to resume from the one before it"
        ) from e
    torch.set_rng_state(rng["cpu"])
    cuda_rng = rng["cuda"]  # None when the run was on CPU
    if device.type == "cuda" and isinstance(cuda_rng, list):  # older files: every visible GPU's
        cuda_rng = cuda_rng[device.index] if device.index < len(cuda_rng) else None
    if device.type == "cuda" and isinstance(cuda_rng, torch.Tensor):
        torch.cuda.set_rng_state(cuda_rng, device)
    return state["step"]


def export_plan(args, m, dataset):
    """(format of merged/, tokenizer to copy beside it), settled before training so that nothing fails
    after it: merged/ in --export-format, else in the base's own format (HF in, HF out; Meta in, Meta out);
    the tokenizer from --tokenizer, else from the --model folder, else the one the token file was made with."""
    fmt = args.export_format or ("hf" if (Path(args.model) / "config.json").exists() else "meta")
    if fmt == "hf" or args.lora_rank:  # the PEFT adapter needs a Hugging Face config for the base too
        try:
            hf.rope(m.args)
        except ValueError as e:
            if fmt == "hf":
                raise ValueError(f"{e}: pass --export-format meta") from None
            print(f"note: no PEFT adapter will be written ({e})", flush=True)
    sources = [args.tokenizer] if args.tokenizer else [args.model, getattr(dataset, "meta", {}).get("tokenizer")]
    for src in sources:
        p = Path(src or "")
        if (
            args.tokenizer
            or p.is_dir()
            and any((p / n).exists() for n in ("tokenizer.model", "tokenizer.json"))
            or p.is_file()
            and src != args.model
        ):
            data.load_tokenizer(src)  # a missing or unreadable tokenizer: an error now, not after training
            return fmt, src
    print(
        f"note: no tokenizer in {args.model} or where the token file was made; merged/ will have none (--tokenizer "
        "copies one)",
        flush=True,
    )
    return fmt, None


def export(out, m, args, rank, fmt="meta", tokenizer=None):
    """trainable.safetensors and adapter/ (LoRA runs), and merged/: the base model with the training
    folded in; each with the tokenizer beside it."""
    ignore_frozen = args.lora_rank > 0
    state = get_model_state_dict(
        m, options=StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=ignore_frozen)
    )
    if rank == 0:
        base = llama.init(args.model) if args.init else llama.load(args.model)
        for k in lora.CONTEXT:
            setattr(base.args, k, getattr(m.args, k))
        folders = [out / "merged"]
        if ignore_frozen:
            lora.save_trainable(m, out / "trainable.safetensors", state=state)
            hf_base = args.model if (Path(args.model) / "config.json").exists() else None
            if hf.save_peft(m.args, lora.lora_config(m), state, out / "adapter", base=hf_base):
                folders.append(out / "adapter")
            lora.merge_lora(lora.load_trainable(base, out / "trainable.safetensors"))
        else:
            base.load_state_dict({k: v.to(base.tok_embeddings.weight.dtype) for k, v in state.items()}, assign=True)
        llama.save(base, out / "merged", format=fmt, overwrite=True)
        for folder in folders if tokenizer else []:
            data.save_tokenizer(tokenizer, folder)
    dist.barrier()


# ----------------------------------------------------------------------------- training


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


def train_flops(margs, seq_len, *, group_size=None, lora=True):
    """Model FLOPs of one training pass over one sequence, for MFU (the recompute of activation
    checkpointing is not counted). Backward is 2x forward where weights train (gradients of inputs and
    weights), 1x for frozen matmuls (inputs only: LoRA's base weights and head), 2x for attention (q, k, v).
    The adapters' own rank-r matmuls are left out: under 1% at rank 8. group_size=None: full attention;
    lora=False: every weight trains."""
    f = llama.forward_flops(margs, seq_len, group_size)
    return 3 * f["attn"] + 2 * (f["proj"] + f["ffn"] + f["others"]) if lora else 3 * sum(f.values())


def peak_memory_gb(device):
    """(device, host) peak memory of this process so far in GiB: the GPU's allocations on CUDA, the
    process's resident memory on CPU; and the process's resident memory (ru_maxrss: KiB on Linux)."""
    host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return (torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else host), host


def learning_rate(step, *, lr, warmup, steps, schedule="constant"):
    """Linear warm-up over `warmup` steps, then constant, or a cosine decay to lr/10 at `steps`."""
    if step < warmup or schedule == "constant":
        return lr * min(1.0, step / max(1, warmup))
    done = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, done))))


def train(args, rank, world, device):
    """The run that `args` (parse_args) describes, as process `rank` of `world`."""
    out = Path(args.out)
    if world % args.context_parallel:
        raise ValueError(
            f"--context-parallel {args.context_parallel} does not divide the {world} processes: run a multiple of "
            f"{args.context_parallel} processes (data parallelism runs over world / P groups)"
        )
    ckpt = open_run_folder(out, args.resume)
    m = build_model(
        args.model,
        rank,
        world,
        device,
        init=args.init,
        seed=args.seed,
        dtype=args.dtype,
        checkpointing=not args.no_activation_checkpointing,
        offload=args.offload_activations,
        context_parallel=args.context_parallel,
        **longlora_settings(args),
    )
    dataset, pad_id = load_data(args, m.args.vocab_size)
    fmt, tokenizer = on_rank_zero(lambda: export_plan(args, m, dataset), rank)
    loaded = max_over_ranks(peak_memory_gb(device)[1], device)[0]  # host memory after loading, of the fullest process
    trainable = [p for p in m.parameters() if p.requires_grad]  # FSDP2's shards: the only copies there are
    if args.optim == "adamw":
        optim = torch.optim.AdamW(trainable, lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    else:
        optim = torch.optim.SGD(trainable, lr=args.lr)
    start = load_checkpoint(Path(ckpt), m, optim, args, rank, world, device) if ckpt else 0
    log = open_log(out, start, describe(args, m, trainable, world, device, start, loaded)) if rank == 0 else None
    peak = peak_tflops(device, args.dtype, args.peak_tflops)
    bar = tqdm(total=args.steps, initial=start, desc="train", disable=rank != 0, dynamic_ncols=True)
    saved = start if ckpt else None
    # the step's parts, with this run's settings bound. Context parallelism: the data-parallel group
    # `rank // P` of `world // P` trains on the samples a process of that rank would; its P processes
    # take the P slices of every sequence.
    P = args.context_parallel
    batches = functools.partial(
        micro_batches,
        dataset,
        pad_id=pad_id,
        grad_accum=args.grad_accum,
        batch_size=args.batch_size,
        rank=rank // P,
        world=world // P,
        part=rank % P,
        parts=P,
        seq_len=args.seq_len,
    )
    group_size = None if args.attn == "full" else args.group_size
    flops_of = functools.partial(train_flops, m.args, group_size=group_size, lora=args.lora_rank > 0)
    fwd_bwd = functools.partial(
        forward_backward,
        m,
        trainable=trainable,
        world=world,
        device=device,
        clip=args.clip,
        loss_chunk=args.loss_chunk,
        start=rank % P * args.seq_len // P,
    )
    tokens = args.grad_accum * args.batch_size * world // P * args.seq_len  # per step, all processes
    for step in range(start + 1, args.steps + 1):
        t0 = time.perf_counter()
        lr = learning_rate(step, lr=args.lr, warmup=args.warmup, steps=args.steps, schedule=args.schedule)
        for g in optim.param_groups:
            g["lr"] = lr
        micro = batches(step)
        flops = sum(x.shape[0] * flops_of(x.shape[1] * P) for x, _ in micro) / P  # this process's share
        loss, norm = fwd_bwd(micro)
        check_finite(step, loss, norm, saved)
        optim.step()
        optim.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the step's kernels are done: the timer measures them, not their launch
        dt = time.perf_counter() - t0
        mem = max_over_ranks(peak_memory_gb(device), device)  # the fullest process's (device, host) peaks
        if rank == 0:
            write_log(log, bar, step, loss, lr, norm, tokens, dt, flops, peak, mem)
        if args.save_every and step % args.save_every == 0 and step < args.steps:  # outside the timed step
            save_checkpoint(out, step, m, optim, args, rank, world, device)
            saved = step
    bar.close()
    if decide(start < args.steps or not (out / "merged").exists()):
        if args.save_every and start < args.steps:  # (a resume that only redoes a failed export has its checkpoint)
            save_checkpoint(out, args.steps, m, optim, args, rank, world, device)
        export(out, m, args, rank, fmt, tokenizer)
    if rank == 0:
        log.close()
        done = [out / "merged"] + [
            out / n for n in ("adapter", "trainable.safetensors") if args.lora_rank and (out / n).exists()
        ]
        print("done: " + ", ".join(str(p) for p in done), flush=True)


def check_finite(step, loss, norm, saved):
    """Stop before the update if the step's loss or gradient norm is not finite (alike on every process:
    both are reduced over all of them); `saved` is the step of the last checkpoint, if any."""
    if math.isfinite(loss) and math.isfinite(norm):
        return
    resume = f"--resume restarts from the checkpoint of step {saved}" if saved else "No checkpoint was written yet"
    raise ValueError(
        f"step {step}: the loss is {loss} and the gradient norm {norm}; stopped before the update, and nothing was "
        f"saved after it. {resume}; lower --lr or check the data, then --resume "
        "(or start a new --out with --dtype float32)"
    )


def open_run_folder(out, resume):
    """The checkpoint to resume from (None: start), after checking that `out` may take this run; every
    process must see the folder. A folder with a checkpoint or an export holds a run; one with only a
    log.jsonl holds a run that stopped before its first checkpoint: nothing there can be resumed, so a
    new run replaces the log."""
    ckpt = decide(str(checkpoints(out)[-1]) if checkpoints(out) else None)
    exported = decide(any((out / name).exists() for name in ("merged", "trainable.safetensors", "adapter")))
    if (ckpt or exported) and not resume:
        raise FileExistsError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
    if resume and not ckpt:
        raise ValueError(
            f"--resume: {out} holds no checkpoint to continue from"
            + (" (that run saved none: --save-every 0)" if exported else "")
            + "; run without --resume to start from the beginning, or choose another --out"
        )
    if dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    check_all(
        out.is_dir() and (ckpt is None or Path(ckpt).is_dir()),
        f"these processes do not see {ckpt or out}: --out must be a "
        "folder that every node shares, since every process writes and reads its checkpoints",
    )
    return ckpt


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
                if isinstance(e, (FileNotFoundError, ValueError, ImportError))
                else ValueError(f"{type(e).__name__}: {e}")
            )
    result = decide(result)
    if isinstance(result, Exception):
        raise result
    return result


def micro_batches(dataset, step, *, pad_id, grad_accum, batch_size, rank, world, part=0, parts=1, seq_len=None):
    """This process's `grad_accum` micro-batches of optimizer step `step` (from 1). The run's samples are
    numbered in one sequence, step by step, micro-step by micro-step, process by process, row by row,
    and sample i is dataset[i]: so a step trains on the same samples for any number of processes with
    the same batch_size x world (1 process x 2 rows = 2 processes x 1 row), and a resumed run goes on
    where it stopped. Context parallelism (parts > 1): `rank` and `world` count data-parallel groups;
    sequences are padded to `seq_len` and this process takes slice `part` of `parts`, the tokens
    [part * n, (part + 1) * n) with their targets (n = seq_len / parts: a slice's last target is the
    next slice's first token)."""
    first = (step - 1) * grad_accum * world * batch_size  # the samples of the steps before
    batches = []
    for i in range(grad_accum):
        start = first + (i * world + rank) * batch_size  # this process's rows of micro-step i
        x, t = data.collate([dataset[start + row] for row in range(batch_size)], pad_id, seq_len if parts > 1 else None)
        n = x.shape[1] // parts  # (parts = 1: the whole batch)
        batches.append((x[:, part * n : (part + 1) * n], t[:, part * n : (part + 1) * n]))
    return batches


def forward_backward(m, micro, trainable, *, world, device, clip, loss_chunk, start=0):
    """Gradients of the mean loss over every target of the step, on all processes, clipped to `clip`
    (0: not clipped). Returns (mean loss, gradient norm) as floats: everything stays on the device until
    that one read, so there is no host sync inside the step and no CPU tensor in a collective. start:
    the position of the micro-batches' first token (context parallelism: this process's slice)."""
    n_targets = torch.tensor(float(sum((t != data.IGNORE).sum() for _, t in micro)), device=device)
    # copies from pageable memory wait for the GPU: all here, while it idles
    micro = [(x.to(device), t.to(device)) for x, t in micro]
    dist.all_reduce(n_targets)
    loss_sum = torch.zeros((), device=device)
    for x, t in micro:
        loss = m(x, t, loss_chunk=loss_chunk, start=start)  # summed over this micro-batch's targets
        # FSDP averages gradients over processes: scale by `world` so the result is the mean over tokens (with
        # context parallelism too: each slice's gradient includes what its halo carried to the next slice)
        (loss * world / n_targets.clamp(min=1)).backward()
        loss_sum += loss.detach().float()
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, clip if clip > 0 else float("inf"))
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # a DTensor: on every rank
    dist.all_reduce(loss_sum)
    loss, norm = torch.stack([loss_sum / n_targets.clamp(min=1), grad_norm.float()]).tolist()  # the step's one sync
    return loss, norm


def max_over_ranks(values, device):
    """The largest of each value over all processes (a list of floats)."""
    t = torch.tensor(values if isinstance(values, (list, tuple)) else [values], device=device, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def describe(args, m, trainable, world, device, start, loaded):
    """The run's first line: what trains, on what, how."""
    n_trainable, n_total = sum(p.numel() for p in trainable), sum(p.numel() for p in m.parameters())
    attention = (
        f"attention {args.attn}" + (f" (G={args.group_size})" if args.attn != "full" else "") + f", {args.backend}"
    )
    return "; ".join(
        [
            f"{n_trainable:,} of {n_total:,} parameters train ({100 * n_trainable / n_total:.2f}%)",
            f"{world} process(es) on {device.type}"
            + (
                f" ({world // args.context_parallel} data-parallel x {args.context_parallel} context-parallel: "
                f"slices of {args.seq_len // args.context_parallel} tokens)"
                if args.context_parallel > 1
                else ""
            ),
            f"global batch {args.batch_size * world // args.context_parallel * args.grad_accum} x {args.seq_len} "
            "tokens",
            attention,
            f"RoPE positions / {m.args.rope_interpolation:g}",
        ]
        + ([f"resuming after step {start}"] if start else [])
        + [f"{loaded:.2f} GB host memory per process after loading"]
    )


def open_log(out, start, first_line):
    """Print the run's first line and open log.jsonl to append, without the steps after `start` that a
    killed run logged after its last checkpoint."""
    print(first_line, flush=True)
    path = out / "log.jsonl"
    if path.exists():
        if not start:
            print(f"replacing {path}: the run that wrote it stopped before its first checkpoint", flush=True)
        kept = [
            line
            for line in path.read_text().splitlines()
            if line.startswith("{") and line.endswith("}") and json.loads(line)["step"] <= start
        ]
        (out / ".log.jsonl.tmp").write_text("".join(line + "\n" for line in kept))
        os.replace(out / ".log.jsonl.tmp", path)
    return open(path, "a")


def write_log(log, bar, step, loss, lr, grad_norm, tokens, dt, flops, peak, mem):
    """One line of log.jsonl, and the progress bar's figures: `tokens` and `flops` of the step, `dt` its
    seconds, `peak` the device's TFLOP/s (None: no MFU), `mem` the (device, host) peak GB."""
    rec = {
        "step": step,
        "loss": loss,
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens": tokens,
        "tokens_per_s": tokens / dt,
        "step_s": dt,
        "tflops": flops / dt / 1e12,
        "mfu": flops / dt / 1e12 / peak if peak else None,
        "peak_mem_gb": mem[0],
        "host_mem_gb": mem[1],
    }
    log.write(json.dumps(rec) + "\n")
    log.flush()
    bar.set_postfix(
        loss=f"{loss:.4f}",
        lr=f"{lr:.2e}",
        tok_s=f"{tokens / dt:.0f}",
        mem=f"{mem[0]:.1f}G",
        **({"mfu": f"{rec['mfu']:.0%}"} if peak else {}),
    )
    bar.update()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv:  # the demo lives in demo.py, which imports this file: hand the process over to it
        os.execv(sys.executable, [sys.executable, str(Path(__file__).with_name("demo.py"))])
    args = parse_args(argv)
    try:
        rank, world, device = setup_distributed(args.device)
        train(args, rank, world, device)
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        code = 2
    else:
        code = 0
    sys.stdout.flush()
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(code)


if __name__ == "__main__":
    main()
