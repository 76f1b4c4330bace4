"""LongLoRA fine-tuning: S2-Attn at the target length, Position Interpolation, LoRA+, plain torch FSDP2.

    python train.py                                                           # the demo (demo.py), on a CPU
    python train.py --model DIR --data train.bin --seq-len 8192 --out runs/a  # one process, CPU or GPU
    torchrun --nproc-per-node 8 train.py --model llama-2-7b --data redpajama.bin --seq-len 8192 --out runs/7b-8k
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 train.py ...  # nodes

The same code runs everywhere: without torchrun it makes a one-process group, so one process and 64 go
through the same FSDP2 path (--device: gloo on CPU; on CUDA one process per GPU, nccl). Past one GPU's
memory: --offload-activations (block inputs in host memory) and --context-parallel P (each sequence over
P processes, which exchange only S2-Attn's half-group halo; docs/memory.md). The defaults are the
paper's (§4.1; LongLoRA's own: the LongLoRA class): AdamW (0.9, 0.95), no weight decay, lr 2e-5 with 20
warm-up steps then constant, per-device batch 1 with 8 gradient-accumulation steps (global batch 64 on 8
GPUs), 1000 steps, bf16.

Writes to --out: log.jsonl (a line per step: loss, lr, grad norm, tokens/s, MFU, memory; a held-out loss every
--eval-every steps), checkpoints/step-NNNNNNN/ (--resume continues from the latest), and at the end, each with the
tokenizer: merged/ (the base with the training folded in; model.load, eval.py and, in HF format, transformers open
it), adapter/ (a PEFT adapter for the HF base) and trainable.safetensors (lora.load_trainable): docs/checkpoints.md.
"""

import argparse
import functools
import math
import os
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

import checkpoint
import data
import eval as ev
import lora
import model
import parallel
import quant

# ----------------------------------------------------------------------------- the method


def setting(default, help, **flag):  # a field of LongLoRA: its default, and its flag's help (and choices)
    return field(default=default, metadata=dict(help=help, **flag))


@dataclass(frozen=True)
class LongLoRA:
    """LongLoRA's settings, each default the paper's; the one list of them. train.py's flags are made from
    it (--seq-len, --group-size, ...); apply_longlora applies it to a model. Kernels, parallelism and
    precision are not LongLoRA's: build_model takes them apart."""

    seq_len: int = setting(8192, "training length in tokens (default 8192; §4.1: 8192 to 100k)")
    attn: str = setting("s2", "s2, full, or short: S2 unshifted (Table 1)", choices=("s2", "full", "short"))
    group_size: Optional[int] = setting(None, "S2-Attn group size in tokens (default seq-len/4, Table 11)")
    rope_scale: Optional[float] = setting(None, "Position Interpolation factor (default ceil(seq-len/context), §3)")
    rope_method: str = setting("pi", "Position Interpolation or YaRN (not the paper's)", choices=("pi", "yarn"))
    lora_rank: int = setting(8, "LoRA rank (default 8, §4.1); 0 = full fine-tuning")
    lora_alpha: float = setting(16, "LoRA alpha (default 16, §4.1)")
    lora_targets: tuple = setting(("wq", "wk", "wv", "wo"), "layers with adapters (default wq,wk,wv,wo, §4.1)")
    trainable: tuple = setting(("embed", "norm"), "trained besides adapters: embed,norm is LoRA+ (§3.3); '' LoRA")

    def __post_init__(self):
        """Lists given as strings ("wq,wk" -> ("wq", "wk"), "" -> ()), the derived default (groups of a quarter
        of the length) and the refusals, naming the flag."""
        for f in fields(self):
            if f.type is tuple and isinstance(getattr(self, f.name), str):
                object.__setattr__(self, f.name, tuple(x for x in getattr(self, f.name).split(",") if x))
        if self.seq_len < 1:
            raise ValueError(f"--seq-len {self.seq_len}: the training length is at least 1 token")
        G = self.group_size
        if G is not None and (isinstance(G, bool) or not isinstance(G, int) or G < 1):
            raise ValueError(f"--group-size {G}: an S2-Attn group holds at least 1 token (default: --seq-len / 4)")
        object.__setattr__(self, "group_size", G or max(1, self.seq_len // 4))
        if self.rope_scale is not None and not self.rope_scale >= 1:
            raise ValueError(
                f"--rope-scale {self.rope_scale:g}: positions are divided by it, so at least 1 (or leave it out)"
            )
        if self.lora_rank < 0 or self.lora_rank and not self.lora_alpha > 0:
            raise ValueError(
                f"--lora-rank {self.lora_rank} --lora-alpha {self.lora_alpha:g}: a rank of at least 0 (0: full "
                "fine-tuning) and an alpha above 0 (the adapters' scale is alpha / rank; the paper's: 8 and 16)"
            )
        if self.attn != "full" and self.group_size > self.seq_len:
            raise ValueError(
                f"--group-size {self.group_size} is larger than --seq-len {self.seq_len}: S2-Attn needs groups "
                "shorter than the sequence"
            )

    @classmethod
    def from_args(cls, args):  # from train.py's parsed flags
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def apply_longlora(m, cfg=LongLoRA(), *, backend="sdpa", dtype="bfloat16", seed=42):
    """LongLoRA's three switches on model `m`, in place: Position Interpolation (or YaRN) to reach cfg.seq_len,
    LoRA+ (adapters, and the trainable groups), the attention (S2, full or short) through `backend`. Frozen
    weights in `dtype`, trainable ones in float32; `seed` makes the adapters."""
    context = m.args.max_seq_len
    scale = cfg.rope_scale or max(1, math.ceil(cfg.seq_len / context))
    if int(context * scale) < cfg.seq_len:
        raise ValueError(
            f"--rope-scale {scale:g} extends the model's context of {context} tokens to {int(context * scale)}, "
            f"short of --seq-len {cfg.seq_len}: leave --rope-scale out (then it is {math.ceil(cfg.seq_len / context)})"
        )
    m.extend_context(scale, method=cfg.rope_method)
    torch.manual_seed(seed)  # the same adapters on every rank
    if cfg.lora_rank:
        lora.add_lora(m, cfg.lora_rank, cfg.lora_alpha, targets=cfg.lora_targets)
        lora.set_trainable(m, extra=cfg.trainable)
    m.set_attention(group_size=None if cfg.attn == "full" else cfg.group_size, backend=backend, shift=cfg.attn == "s2")
    for p in m.parameters():  # frozen weights in the compute dtype; trainable ones in float32 for the optimizer
        p.data = p.data.to(torch.float32 if p.requires_grad else getattr(torch, dtype))
    return m


def build_model(base, cfg, rank, world, device, *, backend="sdpa", seed=42, dtype="bfloat16", quantize=None, **kw):
    """The base `base` (model.read_checkpoint's (ModelArgs, Weights)) with LongLoRA `cfg` applied, sharded over
    `world` processes (kw: parallel.parallelize's): built on the meta device, then each process allocates and
    fills only its rows, one tensor at a time. quantize="nf4": QLoRA, frozen block weights in NF4 (quant.py)."""
    margs, weights = base
    with torch.device("meta"):
        m = model.Transformer(margs)
    apply_longlora(m, cfg, backend=backend, seed=seed, dtype=dtype)
    if quantize:
        quant.quantize_model(m)
    parallel.parallelize(m, device=device, world=world, dtype=dtype, **kw)
    adapters = lora.fresh_adapters(m, seed, weights.dtype)

    def read(name):
        return adapters[name] if name in adapters else weights[name]

    return parallel.materialize(m, device, rank, world, quant.reader(m, read) if quantize else read)


# ----------------------------------------------------------------------------- data


# ----------------------------------------------------------------------------- the loop


def learning_rate(step, *, lr, warmup, steps, schedule="constant"):
    """Linear warm-up over `warmup` steps, then constant, or a cosine decay to lr/10 at `steps`."""
    if step < warmup or schedule == "constant":
        return lr * min(1.0, step / max(1, warmup))
    done = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, done))))


def micro_batches(dataset, step, *, pad_id, grad_accum, batch_size, rank, world, part=0, parts=1, seq_len=None):
    """This process's `grad_accum` micro-batches of step `step` (from 1): (inputs, targets, documents of
    packed rows or None, tokens that are not padding). Samples are numbered step by step, micro-step by
    micro-step, process by process, row by row, so a step trains on the same ones for any world size with
    the same batch_size x world, and a resumed run goes on where it stopped. parts > 1 (context
    parallelism): rows padded to seq_len, this process's slice `part` of `parts` (with its targets)."""
    first = (step - 1) * grad_accum * world * batch_size  # the samples of the steps before
    batches = []
    for i in range(grad_accum):
        start = first + (i * world + rank) * batch_size  # this process's rows of micro-step i
        rows = [dataset[start + row] for row in range(batch_size)]
        x, t, *documents = data.collate(rows, pad_id, seq_len if parts > 1 else None)  # documents: packed rows
        n = x.shape[1] // parts  # (parts = 1: the whole batch)
        real = sum(min(max(len(r[0]) - part * n, 0), n) for r in rows)  # this slice's tokens that are not padding
        batches.append((x[:, part * n : (part + 1) * n], t[:, part * n : (part + 1) * n], *(documents or [None]), real))
    return batches


def forward_backward(m, micro, trainable, *, world, device, clip, start=0):
    """Gradients of the mean loss over every target of the step, on all processes, clipped to `clip` (0: not).
    Returns (mean loss, gradient norm, [positions, those not padding] over all processes), read in one host
    sync; no CPU tensor meets a collective. start: the first token's position (context parallelism's slice)."""
    counts = [sum(int((t != data.IGNORE).sum()) for _, t, _, _ in micro), sum(x.numel() for x, *_ in micro)]
    counts = torch.tensor([*counts, sum(r for *_, r in micro)], dtype=torch.float64, device=device)  # exact past 2^24
    # copies from pageable memory wait for the GPU: all here, while it idles
    micro = [(x.to(device), t.to(device), d if d is None else d.to(device)) for x, t, d, _ in micro]
    dist.all_reduce(counts)
    n_targets, loss_sum = counts[0].float(), torch.zeros((), device=device)
    for x, t, documents in micro:
        where = start if documents is None else documents  # a slice's first position, or packed documents
        loss = m(x, t, positions=where)  # summed over its targets
        # FSDP averages gradients over processes: scale by `world` so the result is the mean over tokens (with
        # context parallelism too: each slice's gradient includes what its halo carried to the next slice)
        (loss * world / n_targets.clamp(min=1)).backward()
        loss_sum += loss.detach().float()
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, clip if clip > 0 else float("inf"))
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # a DTensor: on every rank
    dist.all_reduce(loss_sum)
    loss, norm = (loss_sum / n_targets.clamp(min=1)).double(), grad_norm.double()
    loss, norm, *tokens = torch.stack([loss, norm, *counts[1:]]).tolist()  # the step's one sync
    return loss, norm, [int(n) for n in tokens]


def train(args, rank, world, device, stop=None):
    """The run that `args` (parse_args) describes, as process `rank` of `world`; `stop` (parallel.Stop):
    what asks it to stop early (default: only a launcher that died)."""
    out, P, stop = Path(args.out), args.context_parallel, stop or parallel.Stop(signals=False)
    if world % P:
        raise ValueError(f"--context-parallel {P} does not divide the {world} processes: run a multiple of {P}")
    # 1. The run folder, the data (checked against the base's config and tensor index, before its weights load),
    # the model (LongLoRA applied, sharded), and what the export will write.
    ckpt = checkpoint.open_run_folder(out, args.resume, args.steps)  # rank 0 holds its lock from here on
    base = parallel.random_weights(args.model, args.seed, device) if args.init else model.read_checkpoint(args.model)
    own = args.tokenizer or (args.model if args.sft or data.tokenizer_in(args.model) else None)  # its tokenizer
    whose = "--tokenizer" if args.tokenizer else "the model's own tokenizer"
    sets = (args.data, args.sft, args.seq_len, base[0].vocab_size, own, args.pack, args.seed, whose, args.chat_format)
    dataset, pad_id = data.training_set(*sets, args.eval_split)
    args.chat_format = getattr(getattr(dataset, "sft", dataset), "tok", args).chat_format  # SFT: the one it uses
    m = build_model(base, LongLoRA.from_args(args), rank, world, device, **run_settings(args))
    m.loss_chunk = args.loss_chunk
    fmt, tokenizer = parallel.on_rank_zero(lambda: checkpoint.export_plan(args, m, dataset), rank)
    loaded = parallel.max_over_ranks(parallel.peak_memory_gb(device)[1], device)[0]  # host GB, fullest process
    # 2. The optimizer over the trainable shards (FSDP2's: the only copies there are), resumed if asked.
    trainable = [p for p in m.parameters() if p.requires_grad]
    if args.optim == "adamw":
        optim = torch.optim.AdamW(trainable, lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    else:
        optim = torch.optim.SGD(trainable, lr=args.lr)
    start = checkpoint.load_checkpoint(Path(ckpt), m, optim, args, rank, world, device) if ckpt else 0
    held = held_out_set(args, dataset, base[0].vocab_size, own, whose) if args.eval_every else None
    evaluate = held and functools.partial(ev.held_out_losses, m, held, pad_id, args, rank, world, device)
    progress = checkpoint.Progress(args, m, trainable, rank, world, device, start, loaded, stop, evaluate)
    # 3. The steps. This process's share of each: with context parallelism, the data-parallel group
    # rank // P of world // P trains on the samples one process of that rank would, and this process
    # takes slice rank % P of every sequence, whose first token is at position `first`.
    share = dict(rank=rank // P, world=world // P, part=rank % P, parts=P)
    batching = dict(pad_id=pad_id, grad_accum=args.grad_accum, batch_size=args.batch_size, seq_len=args.seq_len)
    first = rank % P * args.seq_len // P
    for step in range(start + 1, args.steps + 1):
        t0 = time.perf_counter()
        lr = learning_rate(step, lr=args.lr, warmup=args.warmup, steps=args.steps, schedule=args.schedule)
        for g in optim.param_groups:
            g["lr"] = lr
        micro = micro_batches(dataset, step, **batching, **share)
        loss, norm, tokens = forward_backward(
            m, micro, trainable, world=world, device=device, clip=args.clip, start=first
        )
        check_finite(step, loss, norm, progress.stop.saved)
        optim.step()
        optim.zero_grad(set_to_none=True)
        asked = progress.step(step, t0, micro, loss, lr, norm, tokens)  # the log; whether any process must stop
        if (asked or args.save_every and step % args.save_every == 0) and step < args.steps:  # outside the timing
            checkpoint.save_checkpoint(out, step, m, optim, args, rank, world, device)
            progress.stop.saved = step
        if asked and step < args.steps:  # a signal, or a launcher gone, on any process: stop after the checkpoint
            progress.stopped(step, asked)
    progress.bar.close()
    # 4. The last checkpoint and the export (a resume that only redoes a failed export has its checkpoint).
    if parallel.decide(start < args.steps or not (out / "merged").exists()):
        if start < args.steps:
            checkpoint.save_checkpoint(out, args.steps, m, optim, args, rank, world, device)
        checkpoint.export(out, m, args, rank, fmt, tokenizer)
    progress.done(out)


def held_out_set(args, dataset, vocab_size, tokenizer, whose):
    """The held-out loss's (inputs, targets) pairs, at most --eval-windows: --eval-data's, read and checked as
    the training data (data.training_set's arguments), else the training data's --eval-split, never trained on."""
    if args.eval_data:
        files = (None, args.eval_data) if args.sft else (args.eval_data, None)
        held = (args.seq_len, vocab_size, tokenizer, False, args.seed, whose, args.chat_format)  # unpacked, all of it
        dataset = data.training_set(*files, *held, holdout=1)[0]
    return getattr(dataset, "sft", dataset).held_out()[: args.eval_windows]


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


# ----------------------------------------------------------------------------- the command line


def parse_args(argv=None):
    """The command line: the flags, then check_args (derived defaults, refusals) before anything loads."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # what to train
    a = p.add_argument_group("what to train")
    a.add_argument("--model", required=True, help="base model: a Meta or HF folder, or a merged/ of an earlier run")
    a.add_argument("--init", action="store_true", help="pretrain: random weights; --model is a params.json")
    a.add_argument("--data", help="token file (python data.py tokenize), read in windows of --seq-len tokens")
    a.add_argument("--sft", help="instructions instead: .json/.jsonl of LongAlpaca's or chat 'messages' examples")
    a.add_argument("--pack", action="store_true", help="--sft examples packed into rows, each attending to itself")
    a.add_argument(
        "--chat-format", choices=("auto", *data.CHAT_FORMATS), default="auto", help="--sft's (auto: its own)"
    )
    a.add_argument("--tokenizer", help="tokenizer for --sft and the export (default: --model's, else the data's)")
    a.add_argument("--out", required=True, help="run folder: log, checkpoints, trainable weights, merged model")
    # LongLoRA: one flag per field of LongLoRA (lists as comma-separated strings)
    a = p.add_argument_group("LongLoRA")
    for f in fields(LongLoRA):
        kind = {tuple: str, Optional[int]: int, Optional[float]: float}.get(f.type, f.type)
        default = ",".join(f.default) if f.type is tuple else f.default
        a.add_argument("--" + f.name.replace("_", "-"), type=kind, default=default, **f.metadata)
    a.add_argument("--backend", choices=model.ALL_BACKENDS, help="attention kernel (default: flash on CUDA in bf16)")
    a.add_argument("--quantize", choices=("nf4",), help="QLoRA: the blocks' frozen weights in 4-bit NormalFloat")
    # optimisation
    a = p.add_argument_group("optimisation")
    a.add_argument("--lr", type=float, default=2e-5, help="peak learning rate (default 2e-5; the paper: 1e-5 at 70B)")
    a.add_argument("--warmup", type=int, default=20, help="linear warm-up steps, then --schedule (default 20)")
    a.add_argument(
        "--schedule", choices=("constant", "cosine"), default="constant", help="after warm-up (cosine: to lr/10)"
    )
    a.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000)")
    a.add_argument("--batch-size", type=int, default=1, help="sequences per device per micro-step (default 1)")
    a.add_argument("--grad-accum", type=int, default=8, help="micro-steps per optimizer step (default 8)")
    a.add_argument("--optim", choices=("adamw", "sgd"), default="adamw", help="AdamW(0.9, 0.95) (default) or plain SGD")
    a.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    a.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping (default 1.0; 0 = off)")
    a.add_argument("--seed", type=int, default=42, help="seed of the adapters' init and of the data order (default 42)")
    a = p.add_argument_group("held-out loss")
    a.add_argument(
        "--eval-every", type=int, default=0, metavar="K", help="a held-out loss every K steps (default 0: none)"
    )
    a.add_argument("--eval-data", help="its data: a token file (--data) or examples (--sft), checked as those")
    a.add_argument(
        "--eval-split", type=float, default=0.0, help="or this fraction of the training data, not trained on"
    )
    a.add_argument("--eval-windows", type=int, default=32, help="held-out sequences it takes at most (default 32)")
    # memory and devices
    a = p.add_argument_group("memory and devices")
    a.add_argument("--dtype", choices=("bfloat16", "float32"), help="compute (default bf16 on CUDA, float32 on CPU)")
    a.add_argument("--loss-chunk", type=int, default=2048, help="tokens per chunk of the loss (default 2048)")
    a.add_argument("--no-activation-checkpointing", action="store_true", help="keep every block's activations")
    a.add_argument("--offload-activations", action="store_true", help="checkpointed inputs in pinned host memory")
    a.add_argument("--context-parallel", type=int, default=1, metavar="P", help="each sequence over P processes")
    a.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="cuda: one process a GPU")
    a.add_argument("--compile", action="store_true", help="torch.compile each block (twice: 1st length, then all)")
    a.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s for the MFU (default: known GPUs')")
    # checkpoints and output
    a = p.add_argument_group("checkpoints and output")
    a.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (default 100; 0 = at the end)")
    a.add_argument("--keep", type=int, default=2, help="checkpoints kept (default 2)")
    a.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    a.add_argument("--export-format", choices=("meta", "hf"), help="format of OUT/merged (default: the base model's)")
    return check_args(p, p.parse_args(argv))


def check_args(p, args):
    """The derived defaults (--group-size, --backend) and the refusals of flags that cannot go together,
    each with the fix (p.error: exit 2), before anything loads."""
    try:
        args.group_size = LongLoRA.from_args(args).group_size
    except ValueError as e:
        p.error(str(e))
    on_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    args.dtype = args.dtype or model.default_dtype("cuda" if on_cuda else "cpu")  # as eval.py's (trained: float32)
    runs_here = model.BACKENDS if on_cuda else ("naive", "sdpa")
    args.backend = args.backend or parallel.default_backend(on_cuda, args.dtype)
    if args.backend not in runs_here:
        p.error(
            f"--backend {args.backend} runs on CUDA only: use --backend sdpa on CPU"
            if not on_cuda
            else f"--backend {args.backend} needs flash-attn (pip install flash-attn --no-build-isolation) "
            "or a torch with torch.nn.attention.varlen; or use --backend sdpa"
        )
    if (args.data is None) == (args.sft is None):
        p.error("give exactly one of --data (a token file) and --sft (supervised examples)")
    if args.pack and (args.sft is None or args.context_parallel > 1):
        p.error("--pack packs --sft examples into rows one process holds whole: give --sft, no --context-parallel")
    if args.init and (args.lora_rank or args.attn != "full"):
        p.error("--init pretrains a model from random weights: give it --lora-rank 0 and --attn full")
    if args.quantize and not args.lora_rank:
        p.error(f"--quantize {args.quantize} freezes the blocks' weights in 4 bits: train adapters (--lora-rank 8)")
    if args.offload_activations and args.no_activation_checkpointing:
        p.error("--offload-activations offloads the checkpointed block inputs: drop --no-activation-checkpointing")
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
    for name in (
        "seq_len",
        "steps",
        "batch_size",
        "grad_accum",
        "loss_chunk",
        "keep",
        "context_parallel",
        "eval_windows",
    ):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("warmup", "save_every", "clip", "weight_decay", "eval_every"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name):g} must be at least 0")
    if not args.lr > 0:
        p.error(f"--lr {args.lr:g}: the learning rate must be above 0 (the paper's: 2e-5)")
    if args.eval_every and not (args.eval_data or 0 < args.eval_split < 1) or args.eval_data and args.eval_split:
        p.error("--eval-every takes one of --eval-data (a file) and --eval-split (a fraction between 0 and 1)")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        p.error(f"--out {args.out} is a file: --out names the run's folder; choose another")
    return args


def run_settings(args):
    """build_model's settings besides LongLoRA's from the command line: kernel, seed, precision, memory, parallelism."""
    return dict(
        backend=args.backend, seed=args.seed, dtype=args.dtype, checkpointing=not args.no_activation_checkpointing,
        offload=args.offload_activations, context_parallel=args.context_parallel, quantize=args.quantize,
        compile=args.compile,
    )  # fmt: skip


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv:  # the demo lives in demo.py, which imports this file: hand the process over to it
        os.execv(sys.executable, [sys.executable, str(Path(__file__).with_name("demo.py"))])
    args = parse_args(argv)
    rank, code, out = int(os.environ.get("RANK", 0)), 0, Path(args.out)
    fresh = not out.exists()  # a run that fails before it writes anything leaves no new folder behind
    try:
        stop = parallel.Stop()  # SIGTERM and Ctrl-C: a checkpoint after the step in progress, then stop
        rank, world, device = parallel.setup_distributed(args.device)
        train(args, rank, world, device, stop)
    except parallel.Stopped as e:
        if rank == 0:
            print(e, file=sys.stderr, flush=True)
        code = e.exit
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        code = 2
        if fresh and rank == 0 and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
    sys.stdout.flush()
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(code)


if __name__ == "__main__":
    main()
