"""Evaluation: perplexity over sliding windows, and passkey retrieval (the paper's Tables 4, 5, 9, 10
and its passkey test); and asking the model about a long document.

    python eval.py ppl --model runs/7b-8k/merged --data pg19-test.bin --seq-len 2048,4096,8192 --json ppl.json
    python eval.py passkey --model runs/7b-8k/merged --lengths 2048,4096,8192 --trials 10 --plot passkey.png
    python eval.py ask --model runs/7b-8k/merged --file paper.txt --question "What is the main finding?"
    python eval.py log runs/7b-8k --plot run.png       # a training run's loss, learning rate and speed

--model is anything model.load opens; add --trainable FILE to apply a trainable-weights file (adapters,
embedding, norms, RoPE scaling) to it instead. Evaluation runs with full attention unless --attn s2:
a model fine-tuned with S2-Attn needs nothing special at inference (paper §3.2).

Perplexity conventions (--convention): windows of --seq-len tokens start every --stride tokens (256 in
the paper, following Press et al.).
    paper    every next-token prediction inside each window is scored (seq-len - 1 of them), and the
             perplexity is exp of the mean over windows of each window's mean loss: LongLoRA's and
             Position Interpolation's evaluation scripts.
    strided  each token is scored once, by the first window that predicts it with the most context:
             the first window scores all its predictions, every later one only its last --stride
             (exp of the mean loss over scored tokens; the Hugging Face / YaRN convention).
"""

import argparse
import json
import math
import random
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import lora
import model

# ----------------------------------------------------------------------------- models


def load_model(path, trainable=None, dtype=None, device=None):
    """A model for evaluation: `path` (+ a trainable-weights file), in eval mode, on `device`."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, dtype or model.default_dtype(device))
    m = model.load(path, dtype=dtype)
    if trainable:
        lora.merge_lora(lora.load_trainable(m, trainable))
    return m.to(device).eval()


# ----------------------------------------------------------------------------- perplexity


def check_vocab(vocab_size, n, source):
    """A clear error when `source` (the token file, the tokenizer) uses ids 0..n-1 past a model's
    vocabulary of `vocab_size`, instead of a device-side assert on CUDA or an IndexError deep in the
    embedding on CPU."""
    if n > vocab_size:
        raise ValueError(
            f"{source} uses token ids up to {n - 1}, but the model's vocabulary has {vocab_size} tokens: "
            "the text was tokenized for another model; tokenize it with this model's tokenizer (python data.py "
            "tokenize --tokenizer MODEL ...)"
        )


def token_nll(m, x):
    """Negative log-likelihood of each next token: x (B, L) -> (B, L - 1)."""
    targets = F.pad(x[:, 1:], (0, 1), value=model.IGNORE)  # position i predicts token i + 1; the last predicts nothing
    return m(x, targets, reduction="none")[:, :-1]


def window_nll(m, tokens, seq_len, stride, max_windows=None, batch_size=1, progress=True):
    """(start, nll) for the windows of `seq_len` tokens every `stride` tokens: nll[j] is the loss of the
    prediction of token start + j + 1, made with j + 1 tokens of context."""
    starts = list(range(0, len(tokens) - seq_len + 1, stride))[:max_windows]
    if not starts:
        raise ValueError(f"{len(tokens)} tokens are fewer than one window of --seq-len {seq_len}")
    device = next(m.parameters()).device
    with torch.no_grad(), tqdm(total=len(starts), desc=f"ppl @ {seq_len}", disable=not progress, leave=False) as bar:
        for i in range(0, len(starts), batch_size):
            batch = starts[i : i + batch_size]
            x = torch.stack([torch.from_numpy(tokens[s : s + seq_len].astype("int64")) for s in batch]).to(device)
            yield from zip(batch, token_nll(m, x).double().cpu())
            bar.update(len(batch))


def perplexity(
    m, tokens, seq_len, stride=256, convention="paper", max_windows=None, batch_size=1, progress=True, by_context=False
):
    """Perplexity of `m` on the token array `tokens` with windows of `seq_len` every `stride` tokens.
    by_context=True: (perplexity, {(lo, hi): perplexity of the predictions made with lo <= c < hi tokens of
    context}, c in powers of two, 1, 2, 4, ... seq_len), both from the one pass over the windows. The second
    shows whether the model uses its window: where it stops falling, tokens further back no longer help."""
    if convention not in ("paper", "strided"):
        raise ValueError(f"convention must be 'paper' or 'strided', got {convention!r}")
    if convention == "strided" and stride > seq_len:
        raise ValueError(
            f"--stride {stride} is longer than --seq-len {seq_len}: the strided convention would skip tokens"
        )
    check_vocab(m.args.vocab_size, int(tokens.max()) + 1 if len(tokens) else 0, "the token file")
    window_means, total, count = [], 0.0, 0
    # summed over windows: loss of the prediction made with j + 1 tokens
    by_pos = torch.zeros(seq_len - 1, dtype=torch.float64)
    for s, row in window_nll(m, tokens, seq_len, stride, max_windows, batch_size, progress):
        window_means.append(row.mean().item())
        scored = row if s == 0 else row[-stride:]  # strided: only the tokens no earlier window scored
        total, count, by_pos = total + scored.sum().item(), count + len(scored), by_pos + row
    ppl = math.exp(sum(window_means) / len(window_means)) if convention == "paper" else math.exp(total / count)
    if not by_context:
        return ppl
    edges = [2**k for k in range(seq_len.bit_length()) if 2**k < seq_len] + [seq_len]
    return ppl, {
        (lo, hi): math.exp(by_pos[lo - 1 : hi - 1].mean().item() / len(window_means))
        for lo, hi in zip(edges, edges[1:])
    }


# ----------------------------------------------------------------------------- a held-out loss in training


@torch.no_grad()
def held_out_losses(m, samples, pad_id, args, rank, world, device):
    """train.py --eval-every: {"eval_loss": the mean loss over every target of `samples`, (inputs, targets)
    pairs, with the training attention; "eval_full_loss": with full attention, where training's is not (S2 in
    training, full at test: the paper's point; not with context parallelism, whose slices full attention
    cannot run)}. Sample j goes to data-parallel group j % groups; a group left without one runs a padding
    sample that counts nothing (FSDP's gathers stay in step): the same result for any number of processes."""
    P = args.context_parallel
    groups, group, part, n = world // P, rank // P, rank % P, args.seq_len // P
    attention = [("eval_loss", None)] + [("eval_full_loss", "full")] * (args.attn != "full" and P == 1)
    a = m.layers[0].attention
    losses, training = {}, (a.group_size, a.backend, a.shift)  # the attention training uses, put back after
    for name, attn in attention:
        m.set_attention(None) if attn == "full" else m.set_attention(*training)
        total = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, targets
        for j in range(group, -(-len(samples) // groups) * groups, groups):
            x, t = samples[j] if j < len(samples) else (torch.zeros(2, dtype=torch.long), torch.full((2,), data.IGNORE))
            x, t = data.collate([(x, t)], pad_id, args.seq_len if P > 1 else None)[:2]
            x, t = x[:, part * n : (part + 1) * n].to(device), t[:, part * n : (part + 1) * n].to(device)
            total += torch.stack([m(x, t, positions=part * n if P > 1 else None).double(), (t != data.IGNORE).sum()])
        torch.distributed.all_reduce(total)
        losses[name] = (total[0] / total[1].clamp(min=1)).item()
    m.set_attention(*training)
    return losses


# ----------------------------------------------------------------------------- passkey retrieval

TASK = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
ANSWER_TOKENS = 8  # generated after the prompt: enough for a key of up to 5 digits


def passkey_prompt(tok, length, depth, key, answer_tokens=0, needle=NEEDLE, question=QUESTION):
    """Token ids of the passkey prompt, at most `length - answer_tokens` tokens (room left for the answer):
    the task, filler, the needle after a fraction `depth` of the filler, more filler, the question."""
    room = length - answer_tokens

    def build(n):
        before = round(depth * n)
        text = " ".join(
            [TASK, " ".join([FILLER] * before), needle.format(key=key), " ".join([FILLER] * (n - before)), question]
        )
        return tok.encode(re.sub(" +", " ", text), bos=True)

    per_filler = len(tok.encode(" " + FILLER, bos=False))
    n = max(0, (room - len(build(0))) // per_filler)
    while n > 0 and len(build(n)) > room:
        n -= 1
    ids = build(n)
    if len(ids) > room:
        raise ValueError(
            f"--lengths {length} is too short to hold the passkey prompt and its answer "
            f"({len(ids)} + {answer_tokens} tokens without filler)"
        )
    return ids


def parse_answer(text):
    """The first number in the generated text, or None."""
    found = re.search(r"\d+", text)
    return int(found.group()) if found else None


def generate(m, ids, max_new_tokens, eos_id=None):
    """Greedy decoding. With full attention, a KV cache makes each new token cost one token's work; with
    S2-Attn the whole sequence is run again for every token (S2 has no cached form here)."""
    device = next(m.parameters()).device
    x = torch.tensor([ids], device=device)
    use_cache = all(layer.attention.group_size is None for layer in m.layers)
    cache = model.KVCache(len(m.layers)) if use_cache else None
    out = []
    with torch.no_grad():
        logits = m(x, last_only=True, positions=cache)  # the next token's logits: (1, 1, vocab), not (1, N, vocab)
        for _ in range(max_new_tokens):
            nxt = int(logits[0, -1].argmax())
            if nxt == eos_id:
                break
            out.append(nxt)
            if len(out) == max_new_tokens:
                break
            x = (
                torch.tensor([[nxt]], device=device)
                if use_cache
                else torch.cat([x, torch.tensor([[nxt]], device=device)], dim=1)
            )
            logits = m(x, last_only=True, positions=cache)
    return out


# ----------------------------------------------------------------------------- asking the model


class Chat:
    """A conversation with model `m` in its tokenizer's chat format (data.chat_ids), decoded with a KV cache
    kept from turn to turn: each reply feeds the model only the tokens of the conversation the cache has not
    seen. Sampling: temperature (0: greedy) and top-p; `stop`: the ids that end a reply (its EOS ids)."""

    def __init__(self, m, tok, stop):
        self.m, self.tok, self.stop = m, tok, set(stop)
        self.cache, self.seen = model.KVCache(len(m.layers)), []  # the cache holds the ids `seen`
        self.device = next(m.parameters()).device

    def reply(self, messages, max_new_tokens=512, temperature=0.6, top_p=0.9, generator=None, write=None):
        """The model's answer to `messages` (its ids), each piece of text written to `write` as it comes; a prompt
        that leaves no room for max_new_tokens in the model's context is refused first, saying by how much (unless
        m.beyond_context). self.prompt: the prompt's length in tokens."""
        ids = data.chat_ids(self.tok, messages, add_generation_prompt=True, learned=False)[0]
        self.prompt, context = len(ids), self.m.args.max_seq_len
        if len(ids) + max_new_tokens > context and not self.m.beyond_context:
            over = len(ids) + max_new_tokens - context
            raise ValueError(
                f"the prompt is {len(ids):,} tokens: with --max-new-tokens {max_new_tokens}, {over:,} more than the "
                f"model's context of {context:,}. Shorten --file or --max-new-tokens, or pass --beyond-context"
            )
        keep = 0  # the longest prefix the cache already holds (at least one token is fed)
        while keep < min(len(self.seen), len(ids) - 1) and self.seen[keep] == ids[keep]:
            keep += 1
        for layer in self.cache.layers if keep < self.cache.pos else []:  # forget what follows it
            layer["k"], layer["v"] = layer["k"][:, :keep], layer["v"][:, :keep]
        self.cache.pos, self.seen, feed, answer, shown = keep, ids[:keep], ids[keep:], [], ""
        with torch.no_grad():
            while len(answer) < max_new_tokens:
                logits = self.m(torch.tensor([feed], device=self.device), last_only=True, positions=self.cache)[0, -1]
                self.seen += feed  # what the cache holds
                nxt = pick(logits, temperature, top_p, generator)
                if nxt in self.stop:
                    break
                answer.append(nxt)
                text = self.tok.decode(answer)
                if write and not text.endswith("\ufffd"):  # (a character's bytes not all out yet)
                    write(text[len(shown) :])
                    shown = text
                feed = [nxt]
        if write and len(shown) < len(text := self.tok.decode(answer)):
            write(text[len(shown) :])
        return answer


def pick(logits, temperature=0.6, top_p=0.9, generator=None):
    """The next token from (vocab,) logits: the most likely at temperature 0; else sampled from the
    smallest set of most likely tokens whose probability reaches top_p, at `temperature` (a CPU generator)."""
    if temperature <= 0:
        return int(logits.argmax())
    p = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    p, order = p.sort(descending=True)
    p[1:][(p.cumsum(0) - p)[1:] >= top_p] = 0  # the tokens after the nucleus (the first is always in it)
    return int(order[torch.multinomial(p / p.sum(), 1, generator=generator)])


def stop_ids(folder, tok):
    """The ids that end an answer: the tokenizer's EOS, the EOS ids of the model folder's
    generation_config.json (Qwen's and Llama 3's list their end-of-turn tokens), and Llama 3's <|eot_id|>."""
    ids = {tok.eos_id} | ({tok.special_ids["<|eot_id|>"]} if "<|eot_id|>" in tok.special_ids else set())
    f = Path(folder) / "generation_config.json"
    eos = json.loads(f.read_text()).get("eos_token_id") if f.is_file() else None
    return ids | set(eos if isinstance(eos, list) else [eos] if eos is not None else [])


def ask(args):
    """eval.py ask: a question about --file (or a chat, one question a line, with no --question), streamed."""
    tok = data.use_chat_format(data.load_tokenizer(args.tokenizer or args.model), args.chat_format)
    check_vocab(model.read_checkpoint(args.model)[0].vocab_size, tok.vocab_size, f"the tokenizer {tok.name}")
    document = Path(args.file).read_text(encoding="utf-8") if args.file else None
    m = load_model(args.model, args.trainable, args.dtype)
    m.beyond_context = args.beyond_context
    chat, messages = Chat(m, tok, stop_ids(args.model, tok)), []
    generator = torch.Generator().manual_seed(args.seed)
    questions = [args.question] if args.question else iter(lambda: input("> ").strip(), "")
    for question in questions:
        first = document is not None and not messages
        messages.append({"role": "user", "content": f"{document}\n\n{question}" if first else question})
        t0 = time.perf_counter()
        write = lambda s: print(s, end="", flush=True)  # noqa: E731
        answer = chat.reply(messages, args.max_new_tokens, args.temperature, args.top_p, generator, write)
        dt = time.perf_counter() - t0
        print(flush=True)
        print(
            f"({len(answer)} tokens in {dt:.1f} s, {len(answer) / dt:.1f} tokens/s; a prompt of {chat.prompt:,})",
            file=sys.stderr,
        )
        messages.append({"role": "assistant", "content": tok.decode(answer)})


def passkey(m, tok, lengths, depths, trials, seed=0, progress=True):
    """{length: {depth: accuracy}} over `trials` random keys (1..50000) per cell, seeded."""
    rng = random.Random(seed)
    results = {}
    cells = [(L, d) for L in lengths for d in depths]
    for L, d in tqdm(cells, desc="passkey", disable=not progress, leave=False):
        hits = 0
        for _ in range(trials):
            key = rng.randint(1, 50000)
            prompt = passkey_prompt(tok, L, d, key, ANSWER_TOKENS)  # the prompt and its answer fit in L tokens
            answer = tok.decode(generate(m, prompt, max_new_tokens=ANSWER_TOKENS, eos_id=tok.eos_id))
            hits += parse_answer(answer) == key
        results.setdefault(L, {})[d] = hits / trials
    return results


# ----------------------------------------------------------------------------- plots


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("--plot needs matplotlib: pip install matplotlib") from e
    return plt


def plot_perplexity(results, path, title):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs = sorted(results)
    ax.plot(xs, [results[x] for x in xs], "o-")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="evaluation context (tokens)", ylabel="perplexity", title=title)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.minorticks_off()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_passkey(results, path, title):
    plt = _pyplot()
    lengths, depths = sorted(results), sorted(next(iter(results.values())))
    grid = [[results[L][d] for L in lengths] for d in depths]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.2 + 0.5 * len(depths)))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set(xlabel="context length (tokens)", ylabel="needle depth", title=title)
    for i, row in enumerate(grid):
        for j, acc in enumerate(row):
            # white on the dark ends of the colour map (red and green), black between
            ax.text(
                j,
                i,
                f"{acc:.0%}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if abs(acc - 0.5) > 0.3 else "black",
            )
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_run(log, path):
    """A picture of a training run from its log.jsonl (a run folder, or the file): the loss (and a held-out
    loss, where logged), the learning rate and tokens/s, step by step."""
    log = Path(log) / "log.jsonl" if Path(log).is_dir() else Path(log)
    if not log.is_file():
        raise FileNotFoundError(f"{log} does not exist: give a run folder (train.py --out) or its log.jsonl")
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    if not rows:
        raise ValueError(f"{log} holds no step yet")
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    steps = [r["step"] for r in rows]
    for key, label in (("loss", "training"), ("eval_loss", "held-out"), ("eval_full_loss", "held-out, full attention")):
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            axes[0].plot(*zip(*points), "-" if key == "loss" else "o-", label=label)
    axes[0].set(xlabel="step", ylabel="loss (nats per token)")
    axes[0].legend()
    axes[1].plot(steps, [r["lr"] for r in rows])
    axes[1].set(xlabel="step", ylabel="learning rate")
    axes[2].plot(steps, [r["tokens_per_s"] for r in rows])
    axes[2].set(xlabel="step", ylabel="tokens / s")
    fig.suptitle(log.parent.name)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ----------------------------------------------------------------------------- command line


def ints(s):
    return [int(x) for x in s.split(",") if x]


def table(cmd, results, by_context=None):
    """The results as text: perplexity (and by context) per length, or passkey accuracy per length and depth."""
    if cmd == "ppl":
        lines = [f"{'length':>8}  perplexity"]
        for L, ppl in results.items():
            lines.append(f"{L:>8}  {ppl:10.4f}")
            lines += [
                f"{'':>8}    context {lo:>6}-{hi - 1:<6} {v:.4f}"
                for (lo, hi), v in (by_context or {}).get(L, {}).items()
            ]
    else:
        depths = next(iter(results.values()))
        lines = [f"{'length':>8}  " + "  ".join(f"{f'depth {d:.0%}':>10}" for d in depths)]
        lines += [f"{L:>8}  " + "  ".join(f"{a:>10.0%}" for a in row.values()) for L, row in results.items()]
    return "\n".join(lines)


def parser():
    """eval.py's command line: the subcommands ppl and passkey and their flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, help_ in (
        ("ppl", "perplexity at several context lengths"),
        ("passkey", "passkey retrieval accuracy by length and depth"),
    ):
        s = sub.add_parser(name, help=help_, description=f"eval.py {name}: {help_} (eval.py --help: the whole story)")
        s.add_argument("--model", required=True, help="a folder model.load opens (Meta, HF, or a run's merged/)")
        s.add_argument(
            "--trainable", help="a trainable-weights file (train.py's trainable.safetensors) to apply to --model"
        )
        s.add_argument("--attn", choices=("full", "s2"), default="full", help="attention at evaluation (default full)")
        s.add_argument(
            "--group-size", type=int, help="S2 group size with --attn s2 (default: a quarter of each length)"
        )
        s.add_argument("--dtype", choices=("float32", "bfloat16"), help="default float32 on CPU, bfloat16 on CUDA")
        s.add_argument("--plot", help="write a PNG (needs matplotlib)")
        s.add_argument("--json", help="write the results as JSON")
        s.add_argument("--seed", type=int, default=0, help="seed (passkey keys and depths; default 0)")
        s.add_argument(
            "--beyond-context",
            action="store_true",
            help="allow lengths past the model's context (to measure how it fails there)",
        )
    s = sub.choices["ppl"]
    s.add_argument("--data", required=True, help="token file (FILE.bin from data.py tokenize) of the evaluation text")
    s.add_argument(
        "--seq-len", type=ints, required=True, help="comma-separated evaluation lengths, e.g. 2048,4096,8192"
    )
    s.add_argument("--stride", type=int, default=256, help="tokens between window starts (default 256, the paper's)")
    s.add_argument(
        "--convention", choices=("paper", "strided"), default="paper", help="which tokens are scored (see above)"
    )
    s.add_argument("--max-windows", type=int, help="evaluate at most this many windows per length")
    s.add_argument("--batch-size", type=int, default=1, help="windows per forward pass (default 1)")
    s.add_argument(
        "--by-context",
        action="store_true",
        help="also print perplexity by how many tokens of context each prediction had",
    )
    s = sub.choices["passkey"]
    s.add_argument("--lengths", type=ints, required=True, help="comma-separated prompt lengths in tokens")
    s.add_argument(
        "--depths",
        default="0,0.25,0.5,0.75,1",
        help="needle depths as fractions of the filler (default 0,0.25,0.5,0.75,1)",
    )
    s.add_argument("--trials", type=int, default=10, help="random keys per length and depth (default 10)")
    s.add_argument("--tokenizer", help="tokenizer (default: the one in --model)")
    s = sub.add_parser("log", help="plot a training run's log.jsonl", description="eval.py log: " + plot_run.__doc__)
    s.add_argument("run", help="a run folder (train.py --out) or its log.jsonl")
    s.add_argument("--plot", required=True, help="the PNG to write (needs matplotlib)")
    s = sub.add_parser("ask", help="ask the model about a document", description="eval.py ask: " + ask.__doc__)
    s.add_argument("--model", required=True, help="a folder model.load opens (Meta, HF, or a run's merged/)")
    s.add_argument(
        "--trainable", help="a trainable-weights file (train.py's trainable.safetensors) to apply to --model"
    )
    s.add_argument("--tokenizer", help="tokenizer (default: the one in --model)")
    s.add_argument("--file", help="the document the question is about (a text file)")
    s.add_argument("--question", help="the question (none: a chat, one question a line, an empty line ends it)")
    s.add_argument("--temperature", type=float, default=0.6, help="sampling temperature; 0 = greedy (default 0.6)")
    s.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling's probability mass (default 0.9)")
    s.add_argument("--max-new-tokens", type=int, default=512, help="the longest answer in tokens (default 512)")
    s.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    s.add_argument(
        "--chat-format", choices=("auto", "template", "llama3", "inst"), default="auto", help="as train.py's"
    )
    s.add_argument("--dtype", choices=("float32", "bfloat16"), help="default float32 on CPU, bfloat16 on CUDA")
    s.add_argument("--beyond-context", action="store_true", help="run a prompt longer than the model's context anyway")
    return p


def fail(e):
    """Exit as train.py and data.py do on bad input: one line, status 2."""
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    if args.cmd in ("ask", "log"):
        try:
            return ask(args) if args.cmd == "ask" else plot_run(args.run, args.plot)
        except (FileNotFoundError, ValueError, ImportError) as e:
            fail(e)
    lengths = args.seq_len if args.cmd == "ppl" else args.lengths
    if not lengths or min(lengths) < 2:
        p.error(f"--{'seq-len' if args.cmd == 'ppl' else 'lengths'} takes lengths of at least 2 tokens, e.g. 2048,4096")
    if args.group_size is not None and args.group_size < 1:
        p.error(
            f"--group-size {args.group_size}: an S2-Attn group holds at least 1 token (default: a quarter of each "
            "length)"
        )
    try:
        vocab = model.read_checkpoint(args.model)[0].vocab_size  # checked against the data before the weights load
        if args.cmd == "ppl":
            tokens, meta = data.read_tokens(args.data)
            max_id = meta["max_id"] if "max_id" in meta else int(tokens.max()) if len(tokens) else -1
            check_vocab(vocab, max_id + 1, f"--data {args.data}")
            # and its tokenizer, where both tell theirs (train.py checks the same)
            data.check_token_file(args.data, meta, vocab, data.tokenizer_in(args.model), "the model's own tokenizer")
        else:
            tokens = data.load_tokenizer(args.tokenizer or args.model)
            check_vocab(vocab, tokens.vocab_size, f"the tokenizer {tokens.name}")
            args.depths = [float(d) for d in args.depths.split(",")]
        m = load_model(args.model, args.trainable, args.dtype)
        m.beyond_context = args.beyond_context
        if max(lengths) > m.args.max_seq_len and not args.beyond_context:
            raise ValueError(
                f"length {max(lengths)} is past the model's context of {m.args.max_seq_len} tokens: pass "
                "--beyond-context to measure it there"
            )
        results, by_context = evaluate(m, args, lengths, tokens)
        print(table(args.cmd, results, by_context), flush=True)  # after the progress bars have closed
        if args.json:
            as_json = {
                str(L): v if args.cmd == "ppl" else {str(d): a for d, a in v.items()} for L, v in results.items()
            }
            Path(args.json).write_text(json.dumps(as_json, indent=2))
        if args.plot:
            run = Path(args.model).resolve()  # a run's merged/ is named by its run folder
            title = f"{run.parent.name if run.name == 'merged' else run.name} ({args.attn} attention)"
            (plot_perplexity if args.cmd == "ppl" else plot_passkey)(results, args.plot, title)
    except (FileNotFoundError, ValueError, ImportError) as e:
        fail(e)


def evaluate(m, args, lengths, source):
    """`args.cmd` at each length: ({length: perplexity}, {length: by-context buckets}) for ppl, whose
    `source` is the token array; ({length: {depth: accuracy}}, {}) for passkey, whose `source` is the
    tokenizer."""
    results, by_context = {}, {}
    for L in lengths:
        # S2's default G depends on L
        m.set_attention(group_size=args.group_size or max(1, L // 4) if args.attn == "s2" else None)
        if args.cmd == "ppl":
            got = perplexity(
                m,
                source,
                L,
                args.stride,
                args.convention,
                args.max_windows,
                args.batch_size,
                by_context=args.by_context,
            )
            results[L], by_context[L] = got if args.by_context else (got, {})
        else:
            results.update(passkey(m, source, [L], args.depths, args.trials, args.seed))
    return results, by_context


if __name__ == "__main__":
    main()
