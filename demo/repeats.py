"""The demo model's pretraining data (demo/make.sh): a token file with passages said three times mixed in.

python demo/repeats.py runs/make-demo/train.bin --out runs/make-demo/mix.bin --seq-len 128 --every 4
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402


def with_repeats(src, out, seq_len, every=4, windows=None, seed=0, overwrite=False):
    """A pretraining file that teaches a small model to copy from its context (what makes longer context
    worth having; large models learn it from scale). Chunk by chunk, `src`'s text in order, seq_len tokens
    at a time, except that one chunk in `every` (drawn at random; every=1: all of them) is a passage said
    three times: the first m tokens (seq_len / 8 <= m <= 3 seq_len / 4) of either a random stretch of
    `src` or random tokens, repeated, cut at seq_len. Ends with the text, or, given `windows`, after that
    many chunks (the text starting over if it runs out)."""
    tokens, meta = data.read_tokens(src)
    tokens, n = np.asarray(tokens), len(tokens) - seq_len
    if n < 0 or (every == 1 and windows is None):
        raise ValueError(
            f"{src} has fewer than {seq_len} tokens" if n < 0 else "every=1 repeats forever: give the number of windows"
        )
    rng, chunks, pos = np.random.default_rng(seed), [], 0
    while (pos <= n) if windows is None else len(chunks) < windows:
        if every == 1 or rng.integers(every) == 0:
            m = int(rng.integers(seq_len // 8, 3 * seq_len // 4 + 1))
            p = (
                tokens[(s := int(rng.integers(n))) : s + seq_len]
                if rng.integers(2)
                else rng.integers(3, meta["vocab_size"], seq_len)
            )
            chunks.append(np.tile(p[:m], 3)[:seq_len])
        else:
            chunks.append(tokens[pos % (n + 1) : pos % (n + 1) + seq_len])
            pos += seq_len
    ids = np.concatenate(chunks).astype(tokens.dtype)
    repeats = {"src": str(src), "seq_len": seq_len, "every": every, "windows": windows, "seed": seed}
    return data.write_tokens(ids, out, {**meta, "repeats": repeats}, overwrite=overwrite)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="token file to draw from, FILE.bin")
    p.add_argument("--out", required=True, help="the token file to write, FILE.bin")
    p.add_argument("--seq-len", type=int, required=True, help="chunk length: the training --seq-len")
    p.add_argument("--every", type=int, default=4, help="one chunk in EVERY is a repeated passage (1: all; default 4)")
    p.add_argument("--windows", type=int, help="stop after this many chunks (required with --every 1)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing token file")
    args = p.parse_args(argv)
    try:
        meta = with_repeats(args.src, args.out, args.seq_len, args.every, args.windows, args.seed, args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"{args.out}: {meta['tokens']:,} tokens")


if __name__ == "__main__":
    main()
