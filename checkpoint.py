"""A run's folder, for train.py: DCP checkpoints of what trains and the rules for resuming from them, the
log (trimmed on resume; Progress, a run's bookkeeping), and the export at the end (merged/, adapter/,
trainable.safetensors).

    ckpt = checkpoint.open_run_folder(out, resume, steps)       # the checkpoint to resume from, or None
    checkpoint.save_checkpoint(out, step, m, optim, args, rank, world, device)
    step = checkpoint.load_checkpoint(ckpt, m, optim, args, rank, world, device)
    checkpoint.export(out, m, args, rank, fmt, tokenizer)      # fmt, tokenizer: export_plan's, settled first

A checkpoint is checkpoints/step-NNNNNNN/: the trainable weights and the optimizer as DCP shards (each
process writes its own), each process's RNG state, and state.json (the step, the world size, the flags).
"""

import fcntl
import json
import math
import os
import shutil
import socket
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
from tqdm import tqdm

import data
import hf
import lora
import model
import parallel
import quant


def open_run_folder(out, resume, steps=None):
    """The checkpoint to resume from (None: start), after checking that `out` may take this run of `steps`
    steps; every process must see the folder, and rank 0 holds its lock (lock). A folder with a checkpoint or
    an export holds a run; one with only a log.jsonl holds a run that stopped before its first checkpoint:
    nothing there can be resumed, so a new run replaces the log."""
    parallel.on_rank_zero(lambda: lock(out, create=not resume), dist.get_rank())
    ckpt = parallel.decide(str(checkpoints(out)[-1]) if checkpoints(out) else None)
    exported = parallel.decide(any((out / name).exists() for name in ("merged", "trainable.safetensors", "adapter")))
    if (ckpt or exported) and not resume:
        raise FileExistsError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
    if resume and not ckpt:
        raise ValueError(
            f"--resume: {out} holds no checkpoint to continue from"
            + (" (it holds an export but no checkpoint)" if exported else "")
            + "; run without --resume to start from the beginning, or choose another --out"
        )
    at = int(Path(ckpt).name.removeprefix("step-")) if ckpt else 0
    if resume and steps is not None and (at > steps or at == steps and exported):  # (at == steps: redo the export)
        raise ValueError(
            f"--resume: the run in {out} is at step {at}{' and exported' if exported else ''}, so --steps {steps} "
            "leaves nothing to train: pass a larger --steps to train on"
        )
    if dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    parallel.check_all(
        out.is_dir() and (ckpt is None or Path(ckpt).is_dir()),
        f"these processes do not see {ckpt or out}: --out must be a "
        "folder that every node shares, since every process writes and reads its checkpoints",
    )
    return ckpt


_LOCKS = {}  # folder -> the open descriptor whose lock this process holds, for its whole life


def lock(out, create=True):
    """An exclusive lock on the folder `out` (made if new and `create`), held until this process ends,
    however it ends (the operating system drops it): a second run on the folder, fresh, --resume or
    export-only, is refused at once, naming the process that holds it. Nothing is written. The lock is
    the host's: on a network filesystem a run on another host does not see it; where the filesystem
    refuses locks, a note says so and the run goes on."""
    if out.resolve() in _LOCKS or not (create or out.is_dir()):
        return
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FileExistsError(
            f"{out} is in use by {holder(out)}: a run folder takes one run at a time; let that run end or stop it, "
            "or choose another --out"
        ) from None
    except OSError as e:
        os.close(fd)
        print(f"note: {out} cannot be locked ({e.strerror}): make sure that no other run uses it", flush=True)
        return
    _LOCKS[out.resolve()] = fd


def holder(out):
    """Who holds the lock on `out`: the process as Linux lists it in /proc/locks (matched by the folder's
    inode), or "another process" where that is not visible from here."""
    inode = str(os.stat(out).st_ino)
    try:
        with open("/proc/locks") as f:  # "1: FLOCK  ADVISORY  WRITE 4242 00:2f:1234 0 EOF" ("1: -> FLOCK" waits)
            rows = [line.split() for line in f]
        pids = [r[4] for r in rows if r[1] == "FLOCK" and r[5].rsplit(":", 1)[-1] == inode and r[4] != "0"]
        cmd = Path(f"/proc/{pids[0]}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except (OSError, IndexError):
        return "another process (not visible from here)"
    return f"process {pids[0]} on {socket.gethostname()} ({cmd if len(cmd) < 100 else cmd[:97] + '...'})"


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
    "rope_method",
    "pack",
    "chat_format",
    "eval_split",
    "quantize",
    "grad_accum",
    "dtype",
    "seed",
    "optim",
    "weight_decay",
    "init",
)


def load_checkpoint(ckpt, m, optim, args, rank, world, device):
    """Restore trainable weights, optimizer and RNG from `ckpt`; returns its step."""
    try:
        state = json.loads((ckpt / "state.json").read_text())
        saved = {
            "rope_method": "pi",
            "pack": False,
            "quantize": None,
            "chat_format": "inst" if state["args"].get("sft") else "auto",  # SFT was in Llama 2's [INST] turns
            "eval_split": 0.0,
            **state["args"],
        }  # runs from before these flags
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


def describe(args, m, trainable, world, device, start, loaded):
    """The run's first line: what trains, on what, how."""
    nf4 = [w for w in m.modules() if isinstance(w, quant.NF4Weight)]  # --quantize: numel counts its bytes
    n_total = sum(p.numel() for p in m.parameters() if p.is_floating_point()) + sum(math.prod(w.shape) for w in nf4)
    n_trainable = sum(p.numel() for p in trainable)
    P, G = args.context_parallel, f" (G={args.group_size})" if args.attn != "full" else ""
    parts = [f"{n_trainable:,} of {n_total:,} parameters train ({100 * n_trainable / n_total:.2f}%)"]
    parts.append(f"{world} process(es) on {device.type}")
    if P > 1:
        parts[-1] += f" ({world // P} data-parallel x {P} context-parallel: slices of {args.seq_len // P} tokens)"
    packed = " (examples packed)" if args.pack else ""
    parts.append(f"global batch {args.batch_size * world // P * args.grad_accum} x {args.seq_len} tokens{packed}")
    parts.append(f"attention {args.attn}{G}, {args.backend}")
    rope = f"YaRN x{m.args.rope_scaling_factor:g}" if m.args.rope_yarn else f"positions / {m.args.rope_interpolation:g}"
    parts.append(f"RoPE {rope}")
    if nf4:
        parts.append(f"frozen block weights in NF4 ({sum(w.nbytes for w in nf4) / 2**30:.3g} GB over all processes)")
    parts += [f"resuming after step {start}"] if start else []
    return "; ".join(parts + [f"{loaded:.2f} GB host memory per process after loading"])


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


def write_log(log, bar, step, loss, lr, grad_norm, tokens, dt, flops, peak, mem, held=None):
    """One line of log.jsonl, and the progress bar's figures: `tokens` (the step's positions, over all
    processes, and how many of them are not padding) and `flops` of the step, `dt` its seconds, `peak` the
    device's TFLOP/s (None: no MFU), `mem` the (device, host) peak GB."""
    tokens, real = tokens
    rec = dict(step=step, loss=loss, lr=lr, grad_norm=grad_norm, tokens=tokens, tokens_per_s=tokens / dt, step_s=dt)
    rec.update(real_tokens=real, padding=1 - real / tokens)
    rec.update(tflops=flops / dt / 1e12, mfu=flops / dt / 1e12 / peak if peak else None)
    rec.update(peak_mem_gb=mem[0], host_mem_gb=mem[1], **(held or {}))
    log.write(json.dumps(rec) + "\n")
    log.flush()
    mfu = {"mfu": f"{rec['mfu']:.0%}"} if peak else {}
    pad = {"pad": f"{rec['padding']:.0%}"} if real < tokens else {}
    pad |= {k.removesuffix("_loss"): f"{v:.4f}" for k, v in (held or {}).items() if k.endswith("loss")}
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / dt:.0f}", mem=f"{mem[0]:.1f}G", **pad, **mfu)
    bar.update()


class Progress:
    """A run's bookkeeping beside its loop: the first line, log.jsonl and the progress bar on rank 0; each step's
    time, model FLOPs (MFU) and peak memory; whether any process is asked to stop, and the step of the last
    checkpoint (stop.saved)."""

    def __init__(self, args, m, trainable, rank, world, device, start, loaded, stop=None, evaluate=None):
        self.args, self.m, self.rank, self.device, self.start = args, m, rank, device, start
        self.stop, self.evaluate = stop or parallel.Stop(signals=False), evaluate  # evaluate(): held-out losses
        self.stop.saved = start or None  # the step of the last checkpoint, which a second signal names
        first_line = describe(args, m, trainable, world, device, start, loaded)
        self.log = open_log(Path(args.out), start, first_line) if rank == 0 else None
        self.bar = tqdm(total=args.steps, initial=start, desc="train", disable=rank != 0, dynamic_ncols=True)
        self.peak = parallel.peak_tflops(device, args.dtype, args.peak_tflops)

    def step(self, step, t0, micro, loss, lr, norm, tokens):
        """Log step `step`, begun at t0 on `micro`; returns the signal asking any process to stop (all stop), or 0."""
        a, device = self.args, self.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the step's kernels are done: the timer measures them, not their launch
        dt = time.perf_counter() - t0
        # this process's share of the step's model FLOPs; over all processes, the fullest one's peak memory
        # (device, host), and whether any is asked to stop
        G = None if a.attn == "full" else a.group_size
        flops = parallel.step_flops(self.m.args, micro, a.context_parallel, group_size=G, lora=a.lora_rank > 0)
        *mem, asked = parallel.max_over_ranks([*parallel.peak_memory_gb(device), self.stop.code()], device)
        held = {}  # every --eval-every steps and at the last, outside the step's time: its own, eval_s
        if self.evaluate and (step % a.eval_every == 0 or step == a.steps):
            t1 = time.perf_counter()
            held = {**self.evaluate(), "eval_s": time.perf_counter() - t1}
        if self.rank == 0:
            write_log(self.log, self.bar, step, loss, lr, norm, tokens, dt, flops, self.peak, mem, held)
            if a.compile and step == self.start + 1:  # said once: this step's time and speed count the compiling
                self.bar.write(f"step {step}: {dt:.1f} s, compiling the blocks included (--compile)")
        return int(asked)

    def stopped(self, step, asked):
        self.bar.close()
        why = self.stop.why(asked)
        raise parallel.Stopped(f"stopped at step {step} ({why}): --resume continues from step {step}", asked)

    def done(self, out):
        if self.rank == 0:
            self.log.close()
            names = ("merged", "adapter", "trainable.safetensors")
            print("done: " + ", ".join(str(out / n) for n in names if (out / n).exists()), flush=True)


def export_plan(args, m, dataset):
    """(format of merged/, tokenizer to copy beside it), settled before training so that nothing fails
    after it: merged/ in --export-format, else in the base's own format (HF in, HF out; Meta in, Meta out);
    the tokenizer from --tokenizer, else from the --model folder, else the one the token file was made with."""
    fmt = args.export_format or ("hf" if (Path(args.model) / "config.json").exists() else "meta")
    if fmt == "meta" and m.args.model_type != "llama":
        raise ValueError(f"Meta's format holds Llamas; a {m.args.model_type} model exports with --export-format hf")
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
        if args.tokenizer or p.is_dir() and data.tokenizer_in(p) or p.is_file() and src != args.model:
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
        base = model.build(*parallel.random_weights(args.model)) if args.init else model.load(args.model)
        for k in lora.CONTEXT:
            setattr(base.args, k, getattr(m.args, k))
        folders = [out / "merged"]
        if ignore_frozen:
            lora.save_trainable(m, out / "trainable.safetensors", state=state)
            hf_base = args.model if (Path(args.model) / "config.json").exists() else None
            if hf.save_peft(m.args, lora.lora_config(m), state, out / "adapter", base=hf_base):
                folders.append(out / "adapter")
            if args.quantize:  # the base as training saw it: quantized, then dequantized into its dtype
                quant.dequantize_model(quant.quantize_model(base))
            lora.merge_lora(lora.load_trainable(base, out / "trainable.safetensors"))
        else:
            base.load_state_dict({k: v.to(base.tok_embeddings.weight.dtype) for k, v in state.items()}, assign=True)
        model.save(base, out / "merged", format=fmt, overwrite=True)
        tok = data.load_tokenizer(tokenizer) if tokenizer else None
        for folder in folders if tok else []:
            data.save_tokenizer(tokenizer, folder)
            if args.sft:  # the chat format the examples were written in travels with the model
                data.save_chat_format(data.use_chat_format(tok, args.chat_format), folder)
        if fmt == "hf":  # the base's BOS / EOS ids and generation_config.json, so that generate() stops as it does
            hf.carry_generation_config(args.model, out / "merged", tok and tok.bos_id, tok and tok.eos_id)
    dist.barrier()
