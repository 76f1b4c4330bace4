"""Tokenizers, token files, training windows and SFT examples."""

import base64
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import data

ROOT = Path(__file__).resolve().parent.parent
TEXTS = [
    "To be, or not to be, that is the question.",
    "Whether 'tis nobler in the mind to suffer",
    "The slings and arrows of outrageous fortune",
]


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    d = tmp_path_factory.mktemp("spm")
    (d / "corpus.txt").write_text("\n".join(TEXTS * 50))
    return data.train_tokenizer([d / "corpus.txt"], vocab_size=300, out=d / "tok")


def test_sentencepiece_tokenizer(spm):
    tok = data.load_tokenizer(spm.parent)  # the folder works as well as the file
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 300)
    ids = tok.encode(TEXTS[0], bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and tok.decode(ids) == TEXTS[0]


def test_token_file_round_trip(spm, tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "b.txt").write_text(TEXTS[1])
    (tmp_path / "folder" / "a.txt").write_text(TEXTS[0])
    (tmp_path / "more.jsonl").write_text(json.dumps({"text": TEXTS[2], "meta": {}}) + "\n\n")
    meta = data.tokenize(spm, tmp_path / "out.bin", [tmp_path / "folder", tmp_path / "more.jsonl"])
    tokens, meta2 = data.read_tokens(tmp_path / "out.bin")
    assert meta == meta2 and meta["dtype"] == "uint16" and meta["documents"] == 3
    tok = data.load_tokenizer(spm)
    expected = [i for t in TEXTS for i in tok.encode(t, bos=True, eos=True)]  # folders in sorted order
    assert tokens.tolist() == expected and meta["tokens"] == len(expected) and meta["max_id"] == max(expected)
    docs = np.split(tokens, np.flatnonzero(tokens == tok.bos_id)[1:])
    assert [tok.decode(d.tolist()) for d in docs] == TEXTS


def test_token_file_dtype_follows_the_vocabulary(spm, tmp_path, monkeypatch):
    big = data.load_tokenizer(spm)
    big.vocab_size = 128256  # a Llama 3 vocabulary does not fit uint16
    monkeypatch.setattr(data, "load_tokenizer", lambda path: big)
    (tmp_path / "t.txt").write_text(TEXTS[0])
    assert data.tokenize(spm, tmp_path / "out.bin", [tmp_path / "t.txt"])["dtype"] == "uint32"
    assert data.read_tokens(tmp_path / "out.bin")[0].dtype == np.uint32


def test_tokenize_never_destroys_what_exists(spm, tmp_path):
    (tmp_path / "t.txt").write_text(TEXTS[0])
    data.tokenize(spm, tmp_path / "out.bin", [tmp_path / "t.txt"])
    before = (tmp_path / "out.bin").read_bytes(), (tmp_path / "out.json").read_text()
    with pytest.raises(FileExistsError, match="--overwrite"):
        data.tokenize(spm, tmp_path / "out.bin", [tmp_path / "t.txt"])
    (tmp_path / "bad.jsonl").write_text('{"content": "no text field"}\n')
    with pytest.raises(ValueError, match=r'bad.jsonl:1 has no "text" field'):
        data.tokenize(spm, tmp_path / "out.bin", [tmp_path / "t.txt", tmp_path / "bad.jsonl"], overwrite=True)
    assert ((tmp_path / "out.bin").read_bytes(), (tmp_path / "out.json").read_text()) == before
    # no temporary left
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "bad.jsonl",
        "out.bin",
        "out.json",
        "t.txt",
    ]


def test_truncated_token_file_is_detected(spm, tmp_path):
    (tmp_path / "t.txt").write_text(TEXTS[0])
    data.tokenize(spm, tmp_path / "out.bin", [tmp_path / "t.txt"])
    (tmp_path / "out.bin").write_bytes((tmp_path / "out.bin").read_bytes()[:-4])
    with pytest.raises(ValueError, match="truncated"):
        data.read_tokens(tmp_path / "out.bin")


def test_cli_errors_are_one_line(spm, tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "data.py"),
            "tokenize",
            "--tokenizer",
            str(spm),
            "--out",
            str(tmp_path / "o.bin"),
            str(tmp_path / "missing"),
        ],
        capture_output=True,
        text=True,
    )
    assert (
        r.returncode != 0
        and "error: input" in r.stderr
        and "does not exist" in r.stderr
        and "Traceback" not in r.stderr
    )


def test_windows_order_depends_only_on_seed_and_index(tmp_path):
    tokens = np.arange(16 * 10 + 5, dtype=np.uint16)  # distinct ids: a window is known by its first token
    tokens.tofile(tmp_path / "t.bin")
    (tmp_path / "t.json").write_text(
        json.dumps({"dtype": "uint16", "tokens": len(tokens), "max_id": int(tokens.max())})
    )
    ds, same, other = (data.TokenWindows(tmp_path / "t.bin", 16, seed=s) for s in (0, 0, 1))
    assert ds.n == 10
    starts = []
    for i in range(ds.n):
        x, y = ds[i]
        assert torch.equal(x, same[i][0]) and torch.equal(y, x + 1) and x[0] % 16 == 0  # targets: the next tokens
        starts.append(int(x[0]) // 16)
    assert sorted(starts) == list(range(10))  # one pass visits every window once
    assert starts != [int(other[i][0][0]) // 16 for i in range(10)]  # another seed, another order
    assert starts != [int(ds[10 + i][0][0]) // 16 for i in range(10)]  # a new order on the next pass
    with pytest.raises(ValueError, match="too few for one window"):
        data.TokenWindows(tmp_path / "t.bin", len(tokens), seed=0)


def test_sft_masks_the_prompt(spm):
    tok = data.load_tokenizer(spm)
    ex = {"instruction": TEXTS[0], "input": TEXTS[1], "output": TEXTS[2]}
    x, y = data.sft_example(tok, ex, seq_len=512)
    prompt = tok.encode(data.PROMPT.format(instruction=TEXTS[0], input="\n\n" + TEXTS[1]), bos=True)
    answer = tok.encode(TEXTS[2], bos=False, eos=True)
    assert x.tolist() == (prompt + answer)[:-1]
    assert y.tolist() == [data.IGNORE] * (len(prompt) - 1) + answer  # every answer token and EOS, nothing else
    x, y = data.sft_example(tok, ex, seq_len=len(prompt) + 2)  # truncated: still learns the first answer tokens
    assert len(x) == len(y) == len(prompt) + 2 and y.tolist()[-3:] == answer[:3]
    with pytest.raises(ValueError, match="needs 'instruction' and 'output'"):
        data.sft_example(tok, {"question": "?"}, 64)


def test_collate_right_pads(spm, tmp_path):
    (tmp_path / "sft.json").write_text(
        json.dumps([{"instruction": "a", "output": TEXTS[0]}, {"instruction": TEXTS[1], "output": "b"}])
    )
    ds = data.SFTExamples(tmp_path / "sft.json", data.load_tokenizer(spm), seq_len=64)
    samples = [ds[0], ds[1]]
    x, y = data.collate(samples, pad_id=2)
    for b, (xs, ys) in enumerate(samples):
        n = len(xs)
        assert torch.equal(x[b, :n], xs) and torch.equal(y[b, :n], ys)
        assert (x[b, n:] == 2).all() and (y[b, n:] == data.IGNORE).all()


def hf_tokenizer_folder(folder, config):
    """A byte-level BPE tokenizer.json trained on TEXTS, with `config` as its tokenizer_config.json."""
    tokenizers = pytest.importorskip("tokenizers", reason="pip install tokenizers")
    tk = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<|begin|>", "<|end|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(TEXTS * 20, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tk.save(str(folder / "tokenizer.json"))
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_hf_tokenizer_json(tmp_path):
    tok = data.load_tokenizer(
        hf_tokenizer_folder(tmp_path, {"bos_token": "<|begin|>", "eos_token": {"content": "<|end|>"}})
    )
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    ids = tok.encode(TEXTS[0], eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and ids.count(1) == 1 and tok.decode(ids) == TEXTS[0]


def test_llama3_tiktoken_format(tmp_path):
    pytest.importorskip("tiktoken", reason="pip install tiktoken")
    merges = [b"th", b"the", b" t", b"to", b" to"]
    ranks = [bytes([i]) for i in range(256)] + merges
    (tmp_path / "tokenizer.model").write_text(
        "".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(ranks))
    )
    tok = data.load_tokenizer(tmp_path / "tokenizer.model")
    # Llama 3: 128000, 128001
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (
        len(ranks),
        len(ranks) + 1,
        len(ranks) + 256,
    )
    ids = tok.encode("to the", eos=True)
    # pre-tokens "to" and " the"; BPE merges by rank: "to" -> 259; " the" -> " ", "th" (256) -> " ", "the" (257)
    assert ids == [len(ranks), 259, 32, 257, len(ranks) + 1] and tok.decode(ids) == "to the"


@pytest.mark.parametrize("kind", ["sentencepiece", "tiktoken", "tokenizer.json"])
def test_saved_tokenizer_opens_in_transformers_and_encodes_alike(spm, tmp_path, kind):
    """save_tokenizer writes what AutoTokenizer needs; it then encodes as load_tokenizer does, BOS first,
    newlines and repeated spaces included."""
    transformers = pytest.importorskip("transformers", reason="pip install transformers")
    if kind == "sentencepiece":
        pytest.importorskip(
            "google.protobuf", reason="AutoTokenizer reads a sentencepiece file with protobuf: pip install protobuf"
        )
        src = spm
    elif kind == "tiktoken":
        pytest.importorskip("tiktoken", reason="pip install tiktoken")
        ranks = [bytes([i]) for i in range(256)] + [b"th", b"the", b" t", b"to", b" to"]
        src = tmp_path / "llama3.model"
        src.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(ranks)))
    else:  # copied with its tokenizer_config.json (its tokenizer.json adds no BOS: compared without)
        src = (
            hf_tokenizer_folder(tmp_path / "src", {"bos_token": "<|begin|>", "eos_token": "<|end|>"}) / "tokenizer.json"
        )
    data.save_tokenizer(src, tmp_path / "out")
    ours, theirs = data.load_tokenizer(tmp_path / "out"), transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    text = "  To be, or not\n\nto be:  that is  the question. 1234 \u00e9"
    assert ours.encode(text) == data.load_tokenizer(src).encode(text)
    bos = kind != "tokenizer.json"
    assert theirs(text, add_special_tokens=bos).input_ids == ours.encode(text, bos=bos)


def test_sft_examples_are_checked_when_opened(spm, tmp_path, capsys):
    """A missing field stops at once, naming the example; a prompt that fills seq_len (nothing of the
    answer would be learned) leaves its example out, with a note."""
    tok = data.load_tokenizer(spm)
    examples = [{"instruction": "a", "output": TEXTS[0]}, {"instruction": TEXTS[1] * 4, "output": "b"}]
    (tmp_path / "sft.json").write_text(json.dumps(examples + [{"instruction": "c"}]))
    with pytest.raises(ValueError, match=r"sft.json, example 3: an SFT example needs 'instruction' and 'output'"):
        data.SFTExamples(tmp_path / "sft.json", tok, seq_len=64)
    (tmp_path / "sft.json").write_text(json.dumps(examples))
    ds = data.SFTExamples(tmp_path / "sft.json", tok, seq_len=64)
    assert ds.n == 1 and ds.examples == examples[:1] and "1 of 2 examples" in capsys.readouterr().out
    data.SFTExamples(tmp_path / "sft.json", tok, seq_len=24)  # example 1's answer is cut: a note says so
    assert "1 of 2 examples in" in (out := capsys.readouterr().out) and "are cut at --seq-len 24" in out, out


# ----------------------------------------------------------------------------- chat formats

CHATML = (  # Qwen's turn markers
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (  # Meta's header tokens, as Llama 3's tokenizer_config.json writes them
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{ m['content'] | trim }}{{ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
MISTRAL_TEMPLATE = (  # BOS once, [INST] around user turns, EOS after each answer; no system role
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
CHAT_STYLES = {  # name: (special tokens, tokenizer_config.json)
    "chatml": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], {"eos_token": "<|im_end|>", "chat_template": CHATML}),
    "llama3": (
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3_TEMPLATE},
    ),
    "mistral": (["<s>", "</s>"], {"bos_token": "<s>", "eos_token": "</s>", "chat_template": MISTRAL_TEMPLATE}),
}
CONVERSATION = [
    {"role": "user", "content": TEXTS[0]},
    {"role": "assistant", "content": TEXTS[1]},
    {"role": "user", "content": "to be or not to be?"},
    {"role": "assistant", "content": TEXTS[2]},
]


def chat_tokenizer_folder(folder, style):
    """A byte-level BPE tokenizer.json trained on TEXTS with the special tokens of a chat style, and its
    tokenizer_config.json with a chat template written for it."""
    tokenizers = pytest.importorskip("tokenizers", reason="pip install tokenizers")
    specials, config = CHAT_STYLES[style]
    tk = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<unk>", *specials],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(TEXTS * 20, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def runs(decode, ids, learned):
    """The texts of the learned stretches of ids, in order."""
    out, run = [], []
    for i, keep in zip(ids + [None], learned + [False]):
        if keep:
            run.append(i)
        elif run:
            out, run = out + [decode(run)], []
    return out


@pytest.mark.parametrize("style", CHAT_STYLES)
def test_chat_template_ids_are_transformers_and_only_answers_are_learned(tmp_path, style):
    """A folder's chat template gives the ids transformers' apply_chat_template gives for the same folder,
    with and without the generation prompt, one turn and several; what is learned is each assistant turn's
    text and its end-of-turn marker, and nothing else."""
    transformers = pytest.importorskip("transformers", reason="pip install transformers")
    folder = chat_tokenizer_folder(tmp_path, style)
    tok, theirs = data.load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
    assert tok.chat_format == "template"
    for messages in (CONVERSATION[:2], CONVERSATION, CONVERSATION[:3]):
        for prompt in (False, True):
            ids, learned = data.chat_ids(tok, messages, add_generation_prompt=prompt)
            assert ids == theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=prompt)["input_ids"]
    ids, learned = data.chat_ids(tok, CONVERSATION)
    end = {"chatml": "<|im_end|>\n", "llama3": "<|eot_id|>", "mistral": "</s>"}[style]
    assert runs(theirs.decode, ids, learned) == [TEXTS[1] + end, TEXTS[2] + end]
    x, y = data.sft_example(tok, {"messages": CONVERSATION}, seq_len=len(ids))
    assert x.tolist() == ids[:-1] and y.tolist() == [
        t if keep else data.IGNORE for t, keep in zip(ids[1:], learned[1:])
    ]


def test_llama2_and_llama3_formats_without_a_template(spm, tmp_path):
    """Bases without a chat template: Llama 2's [INST] turns (a system text opens the first user turn; each
    answer ends with EOS) on a sentencepiece tokenizer, Meta's Llama 3 headers on a tiktoken one; learned:
    each answer and its end marker."""
    tok = data.load_tokenizer(spm)
    assert tok.chat_format == "inst"
    messages = [{"role": "system", "content": "Be brief."}, *CONVERSATION]
    ids, learned = data.chat_ids(tok, messages)
    sys_turn = "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n" + TEXTS[0] + " [/INST] "
    expected = tok.encode(sys_turn) + tok.encode(TEXTS[1], bos=False, eos=True)
    expected += tok.encode("[INST] to be or not to be? [/INST] ") + tok.encode(TEXTS[2], bos=False, eos=True)
    assert ids == expected and [ids[i] for i, keep in enumerate(learned) if keep] == (
        tok.encode(TEXTS[1], bos=False, eos=True) + tok.encode(TEXTS[2], bos=False, eos=True)
    )
    pytest.importorskip("tiktoken", reason="pip install tiktoken")
    ranks = [bytes([i]) for i in range(256)] + [b"th", b"the", b" t", b"to", b" to"]
    (tmp_path / "tokenizer.model").write_text(
        "".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(ranks))
    )
    tok = data.load_tokenizer(tmp_path / "tokenizer.model")
    s = tok.special_ids

    def header(role):  # <|start_header_id|> role <|end_header_id|> "\n\n" (two byte-level newlines, 10)
        return [s["<|start_header_id|>"], *tok.encode(role, bos=False), s["<|end_header_id|>"], 10, 10]

    ids, learned = data.chat_ids(tok, CONVERSATION[:2], add_generation_prompt=False)
    answer = tok.encode(TEXTS[1], bos=False) + [s["<|eot_id|>"]]
    assert tok.chat_format == "llama3" and ids == [tok.bos_id, *header("user"), *tok.encode(TEXTS[0], bos=False)] + [
        s["<|eot_id|>"],
        *header("assistant"),
        *answer,
    ]
    assert [ids[i] for i, keep in enumerate(learned) if keep] == answer
    assert data.chat_ids(tok, CONVERSATION[:1], add_generation_prompt=True)[0][-len(header("assistant")) :] == header(
        "assistant"
    )


def test_bad_chat_examples_are_named(tmp_path):
    """A conversation with no assistant turn, a role the template refuses, a malformed message and a template
    that writes earlier turns otherwise than later: one line naming the example, when the file is opened."""
    tok = data.load_tokenizer(chat_tokenizer_folder(tmp_path / "mistral", "mistral"))
    cases = [
        ([{"role": "user", "content": "a"}], "example 2: the conversation has no assistant turn"),
        (
            [{"role": "system", "content": "a"}, *CONVERSATION[:2]],
            "example 2: the chat template fails.*roles are supported",
        ),
        ([{"role": "user", "text": "a"}], "example 2: 'messages' must be a list of"),
    ]
    for messages, message in cases:
        (tmp_path / "sft.jsonl").write_text(
            json.dumps({"messages": CONVERSATION[:2]}) + "\n" + json.dumps({"messages": messages})
        )
        with pytest.raises(ValueError, match=message):
            data.SFTExamples(tmp_path / "sft.jsonl", tok, seq_len=256)
    tok.chat_template = CHATML.replace("m['content']", "(m['content'] if loop.last else m['content'][:3])")
    with pytest.raises(ValueError, match="writes assistant turn 2 otherwise once later turns follow"):
        data.chat_ids(tok, CONVERSATION)
    (tmp_path / "sft.jsonl").write_text('{"messages": [')
    with pytest.raises(ValueError, match="sft.jsonl is not valid JSON lines"):
        data.SFTExamples(tmp_path / "sft.jsonl", tok, seq_len=256)


def test_chat_templates_write_the_formats_without_one(spm, tmp_path):
    """What an export carries for the formats of bases without a template (data.CHAT_TEMPLATES) writes the
    text those formats are made of: Llama 2's [INST] turns with a system text, Meta's Llama 3 headers."""
    import copy

    tok = data.load_tokenizer(spm)
    messages = [{"role": "system", "content": "Be brief."}, *CONVERSATION]
    as_template = copy.copy(tok)
    as_template.chat_format, as_template.chat_template = "template", data.CHAT_TEMPLATES["inst"]
    expected = f"<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n{TEXTS[0]} [/INST] {TEXTS[1]}</s>"
    expected += f"<s>[INST] to be or not to be? [/INST] {TEXTS[2]}</s>"
    assert data.render_chat(as_template, messages) == expected
    pytest.importorskip("tiktoken", reason="pip install tiktoken")
    ranks = [bytes([i]) for i in range(256)] + [b"th", b"the", b" t", b"to", b" to"]
    (tmp_path / "tokenizer.model").write_text(
        "".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(ranks))
    )
    tok = data.load_tokenizer(tmp_path / "tokenizer.model")
    as_template = copy.copy(tok)
    as_template.chat_format, as_template.chat_template = "template", data.CHAT_TEMPLATES["llama3"]
    for prompt in (False, True):
        ids = data.chat_ids(tok, messages, add_generation_prompt=prompt)[0]
        assert data.render_chat(as_template, messages, prompt) == tok._decode(ids)  # tiktoken writes its specials


def test_chat_masks_survive_tokens_that_cross_a_turns_border(tmp_path):
    """The [INST] template an export carries, on a byte-level BPE tokenizer: ' [/INST] ' + the answer merges the
    space into the answer's first token ('Ġ' + 'Whether' -> 'ĠWhether'), which a token-by-token prefix rule would
    refuse. The ids are still transformers', and the learned tokens are those holding the answers. A prompt's ids
    alone (learned=False, what eval.py ask needs) work for a template that rewrites earlier turns."""
    transformers = pytest.importorskip("transformers", reason="pip install transformers")
    folder = chat_tokenizer_folder(tmp_path, "mistral")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": data.CHAT_TEMPLATES["inst"]}))
    tok, theirs = data.load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "system", "content": ""}, *CONVERSATION]  # an empty system text: written, as the template does
    ids, learned = data.chat_ids(tok, messages)
    assert ids == theirs.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert [r.strip() for r in runs(theirs.decode, ids, learned)] == [TEXTS[1] + "</s>", TEXTS[2] + "</s>"]
    tok.chat_template = CHATML.replace("m['content']", "(m['content'] if loop.last else m['content'][:3])")
    assert data.chat_ids(tok, CONVERSATION, learned=False)[1] == [False] * len(
        data.chat_ids(tok, CONVERSATION, learned=False)[0]
    )


def test_held_out_windows_are_never_trained_on(tmp_path):
    """TokenWindows(holdout=f): the file's last windows, a fraction f of them, are held out: the training
    samples, over many passes, read every other window and none of those."""
    tokens = np.arange(16 * 20 + 1, dtype=np.uint16)
    data.write_tokens(tokens, tmp_path / "t.bin", {"tokenizer": "none"})
    ds = data.TokenWindows(tmp_path / "t.bin", 16, seed=0, holdout=0.2)
    assert (ds.n, ds.held) == (16, 4)
    seen = {int(ds[i][0][0]) // 16 for i in range(200)}
    held = {int(x[0]) // 16 for x, _ in ds.held_out()}
    assert seen == set(range(16)) and held == {16, 17, 18, 19}
