"""eval.py: both perplexity conventions against a brute-force computation, the passkey prompt and its
answer parsing, generation with and without the KV cache, the command line."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import eval as ev
import model
from common import tiny_model

ROOT = Path(__file__).resolve().parent.parent


def brute_force_nll(m, tokens, start, t):
    """-log p(tokens[t] | tokens[start:t]) from its own forward pass over exactly that prefix."""
    with torch.no_grad():
        logits = m(torch.from_numpy(tokens[start:t].astype(np.int64))[None])[0, -1].double()
    return -torch.log_softmax(logits, -1)[int(tokens[t])].item()


@pytest.mark.parametrize("stride", [4, 8])
def test_both_conventions_match_brute_force(stride):
    m = tiny_model()
    tokens = np.random.default_rng(0).integers(0, m.args.vocab_size, 60).astype(np.uint16)
    L = 16
    starts = list(range(0, len(tokens) - L + 1, stride))
    # paper: every prediction in each window, mean per window, mean over windows
    window_means = [np.mean([brute_force_nll(m, tokens, s, t) for t in range(s + 1, s + L)]) for s in starts]
    assert ev.perplexity(m, tokens, L, stride, "paper", progress=False) == pytest.approx(
        math.exp(np.mean(window_means)), rel=1e-5
    )
    # strided: each token once, from the first window that scores it (the first window: all of it)
    scored = {t: s for s in reversed(starts) for t in range(max(s + 1, s + L - stride) if s else 1, s + L)}
    nll = [brute_force_nll(m, tokens, s, t) for t, s in scored.items()]
    assert sorted(scored) == list(range(1, starts[-1] + L))  # every token in reach scored exactly once
    assert ev.perplexity(m, tokens, L, stride, "strided", progress=False) == pytest.approx(
        math.exp(np.mean(nll)), rel=1e-5
    )


def test_perplexity_by_context_matches_brute_force():  # perplexity(by_context=True)
    m = tiny_model()
    tokens = np.random.default_rng(1).integers(0, m.args.vocab_size, 40).astype(np.uint16)
    L, stride = 12, 5
    starts = list(range(0, len(tokens) - L + 1, stride))
    got = ev.perplexity(m, tokens, L, stride, progress=False, by_context=True)[1]
    assert list(got) == [(1, 2), (2, 4), (4, 8), (8, 12)]
    for (lo, hi), ppl in got.items():  # predictions made from c = t - s tokens of context, lo <= c < hi
        nll = [brute_force_nll(m, tokens, s, s + c) for s in starts for c in range(lo, hi)]
        assert ppl == pytest.approx(math.exp(np.mean(nll)), rel=1e-5)
    # every prediction sits in one bucket with the same weight, so the buckets average to the paper's perplexity
    n = {(lo, hi): hi - lo for lo, hi in got}
    mean = sum(n[k] * math.log(v) for k, v in got.items()) / sum(n.values())
    assert math.exp(mean) == pytest.approx(ev.perplexity(m, tokens, L, stride, progress=False), rel=1e-6)
    # by_context=True gives both from one forward pass per window, in either convention
    calls = []
    m.register_forward_hook(lambda *_: calls.append(1))
    ppl, by = ev.perplexity(m, tokens, L, stride, "strided", progress=False, by_context=True)
    assert len(calls) == len(starts) and by == pytest.approx(got, rel=1e-12)
    assert ppl == pytest.approx(ev.perplexity(m, tokens, L, stride, "strided", progress=False), rel=1e-12)


def test_perplexity_options_and_errors():
    m = tiny_model()
    tokens = np.random.default_rng(0).integers(0, m.args.vocab_size, 60).astype(np.uint16)
    one = ev.perplexity(m, tokens, 16, 4, max_windows=1, progress=False)
    assert one == pytest.approx(ev.perplexity(m, tokens[:16], 16, 4, progress=False))
    assert ev.perplexity(m, tokens, 16, 4, batch_size=3, progress=False) == pytest.approx(
        ev.perplexity(m, tokens, 16, 4, progress=False), rel=1e-6
    )
    with pytest.raises(ValueError, match="fewer than one window"):
        ev.perplexity(m, tokens, 100, progress=False)
    with pytest.raises(ValueError, match="would skip tokens"):
        ev.perplexity(m, tokens, 16, 32, "strided", progress=False)
    too_big = tokens.copy()
    too_big[7] = m.args.vocab_size + 3
    with pytest.raises(
        ValueError,
        match=f"the token file uses token ids up to {m.args.vocab_size + 3}, "
        f"but the model's vocabulary has {m.args.vocab_size} tokens",
    ):
        ev.perplexity(m, too_big, 16, 4, progress=False)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    (d / "corpus.txt").write_text(" ".join([ev.TASK, ev.FILLER, ev.NEEDLE.format(key=12345), ev.QUESTION] * 30))
    return data.load_tokenizer(data.train_tokenizer([d / "corpus.txt"], vocab_size=320, out=d))


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_prompt(tok, depth):
    ids = ev.passkey_prompt(tok, 400, depth, key=4242)
    per_filler = len(tok.encode(" " + ev.FILLER, bos=False))
    assert 400 - per_filler - 2 <= len(ids) <= 400 and ids[0] == tok.bos_id
    text = tok.decode(ids)
    assert text.startswith(ev.TASK) and text.endswith(ev.QUESTION)
    needle = text.index(ev.NEEDLE.format(key=4242))
    before, after = text[:needle].count(ev.FILLER), text[needle:].count(ev.FILLER)
    assert before == round(depth * (before + after))
    with pytest.raises(ValueError, match="too short to hold the passkey prompt"):
        ev.passkey_prompt(tok, 20, depth, key=1)
    roomy = ev.passkey_prompt(tok, 400, depth, key=4242, answer_tokens=ev.ANSWER_TOKENS)  # the answer fits in 400 too
    assert 400 - ev.ANSWER_TOKENS - per_filler - 2 <= len(roomy) <= 400 - ev.ANSWER_TOKENS


def test_parse_answer():
    assert ev.parse_answer(" 4242. Remember") == 4242
    assert ev.parse_answer(" the key") is None


def test_generation_with_kv_cache_equals_recomputation():
    m = tiny_model()
    prompt = list(range(5, 25))
    shapes = []
    hook = m.register_forward_hook(lambda mod, inp, out: shapes.append(tuple(out.shape)))
    with_cache = ev.generate(m, prompt, max_new_tokens=12)
    hook.remove()
    assert shapes == [(1, 1, m.args.vocab_size)] * 12  # the next token's logits only, from the prompt's pass too
    x, without = torch.tensor([prompt]), []
    with torch.no_grad():
        for _ in range(12):
            nxt = int(m(x)[0, -1].argmax())
            without.append(nxt)
            x = torch.cat([x, torch.tensor([[nxt]])], dim=1)
    assert with_cache == without
    m.set_attention(group_size=8)  # S2: no cache, the whole sequence again for every token
    x, s2 = torch.tensor([prompt]), []
    with torch.no_grad():
        for _ in range(12):
            s2.append(int(m(x)[0, -1].argmax()))
            x = torch.cat([x, torch.tensor([[s2[-1]]])], dim=1)
    assert ev.generate(m, prompt, max_new_tokens=12) == s2


def run_eval(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "eval.py"), *args], capture_output=True, text=True, cwd=ROOT, timeout=300
    )


def test_cli_ppl_json_and_passkey(tmp_path, tok):
    m = tiny_model(vocab_size=320, max_seq_len=256)
    model.save(m, tmp_path / "m")
    tokens = np.random.default_rng(0).integers(0, 320, 300).astype(np.uint16)
    tokens.tofile(tmp_path / "t.bin")
    (tmp_path / "t.json").write_text(json.dumps({"dtype": "uint16", "tokens": 300, "max_id": int(tokens.max())}))
    r = run_eval(
        "ppl",
        "--model",
        str(tmp_path / "m"),
        "--data",
        str(tmp_path / "t.bin"),
        "--seq-len",
        "32,64",
        "--json",
        str(tmp_path / "p.json"),
    )
    assert r.returncode == 0, r.stderr
    got = json.loads((tmp_path / "p.json").read_text())
    assert list(got) == ["32", "64"] and got["64"] == pytest.approx(
        ev.perplexity(m, tokens, 64, progress=False), rel=1e-6
    )
    r = run_eval(
        "ppl", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "t.bin"), "--seq-len", "32", "--by-context"
    )
    assert r.returncode == 0, r.stderr
    by = ev.perplexity(m, tokens, 32, progress=False, by_context=True)[1]
    lines = r.stdout.splitlines()  # the table alone: the progress bars are on stderr, closed before it
    assert lines[0].split() == ["length", "perplexity"] and lines[1].split() == [
        "32",
        f"{ev.perplexity(m, tokens, 32, progress=False):.4f}",
    ]
    assert [line.split()[1:] for line in lines[2:]] == [[f"{lo}-{hi - 1}", f"{v:.4f}"] for (lo, hi), v in by.items()]
    r = run_eval(
        "passkey",
        "--model",
        str(tmp_path / "m"),
        "--tokenizer",
        tok.name,
        "--lengths",
        "200",
        "--trials",
        "2",
        "--depths",
        "0,1",
        "--json",
        str(tmp_path / "k.json"),
    )
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "k.json").read_text()).keys() == {"200"}
    accuracy = json.loads((tmp_path / "k.json").read_text())["200"]
    assert [line.split() for line in r.stdout.splitlines()] == [
        ["length", "depth", "0%", "depth", "100%"],
        ["200"] + [f"{a:.0%}" for a in accuracy.values()],
    ]


def test_cli_errors_name_the_fix(tmp_path, tok, capsys):
    """eval.main in this process (the CLI's runs are above): a missing model, a vocabulary the data or the
    tokenizer overruns, a token file made with another tokenizer than the model's own (train.py refuses it
    too), bad flags and a length past the context end in one line that says what to do,
    no traceback; --beyond-context runs past the context."""
    model.save(tiny_model(vocab_size=320, max_seq_len=256), tmp_path / "m")
    model.save(tiny_model(vocab_size=200), tmp_path / "small")
    tokens = np.random.default_rng(0).integers(0, 320, 300).astype(np.uint16)
    tokens.tofile(tmp_path / "t.bin")
    (tmp_path / "t.json").write_text(json.dumps({"dtype": "uint16", "tokens": 300, "max_id": int(tokens.max())}))
    ppl = ["ppl", "--data", str(tmp_path / "t.bin"), "--seq-len"]

    def error(*argv):  # what the command says on stderr, having exited with status 2 (train.py's and argparse's)
        with pytest.raises(SystemExit) as e:
            ev.main(list(argv))
        assert e.value.code == 2
        return capsys.readouterr().err

    assert error(*ppl, "32", "--model", str(tmp_path / "nope")).startswith("error:")
    for cmd in (ppl + ["32"], ["passkey", "--tokenizer", tok.name, "--lengths", "200", "--trials", "1"]):
        assert "but the model's vocabulary has 200 tokens" in error(*cmd, "--model", str(tmp_path / "small"))
    for flags, expect in (
        (["--group-size", "0", "--attn", "s2"], "--group-size 0: an S2-Attn group holds at least 1 token"),
        (["--seq-len", "1"], "--seq-len takes lengths of at least 2 tokens"),
    ):
        err = error(*ppl, "32", "--model", str(tmp_path / "m"), *flags)
        assert expect in err, err
    model.save(tiny_model(vocab_size=320, max_seq_len=256), tmp_path / "own")
    data.save_tokenizer(tok.name, tmp_path / "own")  # a model with its tokenizer; the token file says another made it
    meta = {"dtype": "uint16", "tokens": 300, "max_id": int(tokens.max()), "tokenizer": "other.model"}
    (tmp_path / "t.json").write_text(json.dumps({**meta, "tokenizer_sha256": "0" * 64}))
    assert "it was tokenized with another tokenizer (other.model), not with the model's own tokenizer" in error(
        *ppl, "32", "--model", str(tmp_path / "own")
    )
    (tmp_path / "t.json").write_text(json.dumps({**meta, "tokenizer_sha256": data.fingerprint(tok)}))
    ev.main([*ppl, "32", "--model", str(tmp_path / "own")])  # made with the model's own: scored
    assert capsys.readouterr().out.split()[:3] == ["length", "perplexity", "32"]
    too_long = error(*ppl, "300", "--model", str(tmp_path / "m"))
    assert "length 300 is past the model's context of 256 tokens: pass --beyond-context" in too_long
    ev.main([*ppl, "300", "--model", str(tmp_path / "m"), "--beyond-context"])
    out = capsys.readouterr().out.split()
    assert out[:3] == ["length", "perplexity", "300"] and float(out[3]) > 0, out


def test_plot_or_a_clear_message(tmp_path):
    results = {1024: 9.5, 2048: 8.7}
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install matplotlib"):
            ev.plot_perplexity(results, tmp_path / "p.png", "t")
        return
    ev.plot_perplexity(results, tmp_path / "p.png", "t")
    ev.plot_passkey({1024: {0.0: 1.0, 1.0: 0.5}, 2048: {0.0: 0.0, 1.0: 1.0}}, tmp_path / "k.png", "t")
    assert (tmp_path / "p.png").stat().st_size > 1000 and (tmp_path / "k.png").stat().st_size > 1000


# ----------------------------------------------------------------------------- asking the model


def chat_model_folder(folder):
    """A random Qwen3-style HF model with a ChatML tokenizer, its generation_config.json ending answers at
    <|im_end|>, as train.py exports one."""
    transformers = pytest.importorskip("transformers", reason="pip install transformers")
    from test_data import chat_tokenizer_folder

    from common import hf_model

    hf_model(
        "Qwen3Config", vocab_size=320, num_key_value_heads=2, head_dim=24, max_position_embeddings=256
    ).save_pretrained(folder)
    chat_tokenizer_folder(folder, "chatml")
    end = transformers.AutoTokenizer.from_pretrained(folder).convert_tokens_to_ids("<|im_end|>")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [end]}))
    return folder, transformers


def test_ask_answers_as_transformers_generate_does(tmp_path):
    """eval.py ask at temperature 0 streams the answer transformers' greedy generate() gives on the same
    folder, from the same chat-template prompt (the document, a blank line, the question), stopping at the
    folder's EOS ids; then its speed. Sampling is seeded: the same seed, the same answer."""
    folder, transformers = chat_model_folder(tmp_path / "m")
    (tmp_path / "doc.txt").write_text("To be, or not to be, that is the question.\n" * 3)
    question = "What is the question?"
    r = run_eval("ask", "--model", folder, "--file", tmp_path / "doc.txt", "--question", question, "--temperature", "0",
                 "--max-new-tokens", "24")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    tok, hf = (
        transformers.AutoTokenizer.from_pretrained(folder),
        transformers.AutoModelForCausalLM.from_pretrained(folder),
    )
    content = (tmp_path / "doc.txt").read_text() + "\n\n" + question
    ids = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)["input_ids"]
    out = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids) :]
    assert r.stdout == tok.decode(out, skip_special_tokens=True) + "\n"
    assert "tokens/s; a prompt of" in r.stderr
    sampled = [run_eval("ask", "--model", folder, "--question", "Who?", "--seed", s, "--max-new-tokens", "12").stdout
               for s in ("1", "1", "2")]  # fmt: skip
    assert sampled[0] == sampled[1] != sampled[2]


def test_ask_says_how_far_a_document_is_past_the_context_and_chats(tmp_path):
    """A document longer than the model's context: refused before anything runs, saying by how much. With
    no --question, one question a line, each answered in turn, the conversation kept."""
    folder, _ = chat_model_folder(tmp_path / "m")
    (tmp_path / "doc.txt").write_text("To be, or not to be. " * 200)
    r = run_eval("ask", "--model", folder, "--file", tmp_path / "doc.txt", "--question", "?")
    assert r.returncode == 2 and "more than the model's context of 256. Shorten --file" in r.stderr, r.stderr
    r = subprocess.run(
        [sys.executable, str(ROOT / "eval.py"), "ask", "--model", str(folder), "--max-new-tokens", "8"],
        input="Who?\nAnd then?\n\n", capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0 and r.stderr.count("tokens/s") == 2, r.stderr[-2000:]


def test_chat_keeps_its_cache_true_across_turns(tmp_path):
    """Each reply feeds the model only what its KV cache lacks, also after a reply cut by max_new_tokens (whose
    last token was never fed): the cache holds exactly the ids it says, and a second turn answers as a fresh
    chat does. top_p 0 keeps the most likely token."""
    folder, _ = chat_model_folder(tmp_path / "m")
    m, tok = ev.load_model(folder, dtype="float32", device="cpu"), data.load_tokenizer(folder)
    chat, messages = ev.Chat(m, tok, ev.stop_ids(folder, tok)), [{"role": "user", "content": "Who are you?"}]
    for turn in range(2):
        answer = chat.reply(messages, max_new_tokens=5, temperature=0)
        assert chat.cache.pos == len(chat.seen) == chat.cache.layers[0]["k"].shape[1]
        fresh = ev.Chat(m, tok, ev.stop_ids(folder, tok)).reply(messages, max_new_tokens=5, temperature=0)
        assert answer == fresh, turn
        messages += [{"role": "assistant", "content": tok.decode(answer)}, {"role": "user", "content": "And then?"}]
    logits = torch.tensor([0.0, 3.0, 1.0])
    assert ev.pick(logits, temperature=1.0, top_p=0.0, generator=torch.Generator().manual_seed(0)) == 1
