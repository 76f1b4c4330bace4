"""The Llama definition against transformers' LlamaForCausalLM, Meta shards, save/load round trips, errors."""

import json
import sys
from dataclasses import replace

import pytest
import torch

import model
import parallel
from common import hf_model, logits, logits_hf, tiny_model, tokens, write_meta_shards
from model import ModelArgs, Transformer

transformers = pytest.importorskip(
    "transformers", reason="transformers is the independent reference: pip install -r requirements-dev.txt"
)

HF_CONFIGS = {  # transformers config kwargs -> the variants of Llama a loader must get right
    "mha": {},
    "gqa": {"num_key_value_heads": 2},
    "tied": {"num_key_value_heads": 2, "tie_word_embeddings": True},
    "linear-pi": {"num_key_value_heads": 2, "rope_scaling": {"rope_type": "linear", "factor": 4.0}},
    "llama3.1": {
        "num_key_value_heads": 1,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    },
    "odd-heads": {"hidden_size": 72, "num_attention_heads": 9, "num_key_value_heads": 3, "rope_theta": 100000.0},
}


@pytest.mark.parametrize("variant", HF_CONFIGS)
def test_load_hf_matches_transformers(tmp_path, variant):
    hf = hf_model("LlamaConfig", **HF_CONFIGS[variant])
    hf.save_pretrained(tmp_path)
    m = model.load(tmp_path)
    tok = tokens(N=40)  # longer than original_max_position_embeddings: exercises the llama3 scaling
    torch.testing.assert_close(logits(m, tok), logits_hf(hf, tok), rtol=1e-4, atol=1e-5)


def test_load_hf_reads_the_older_top_level_rope_keys(tmp_path):
    """Files written before transformers 5 keep rope_theta and rope_scaling at the top level."""
    linear = {"rope_type": "linear", "factor": 2.0}
    hf = hf_model("LlamaConfig", num_key_value_heads=2, rope_theta=50000.0, rope_scaling=linear)
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg.update(rope_theta=50000.0, rope_scaling={"type": "linear", "factor": 2.0}, head_dim=None, num_key_value_heads=2)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    m = model.load(tmp_path)
    assert (m.args.rope_theta, m.args.rope_interpolation) == (50000.0, 2.0)
    torch.testing.assert_close(logits(m, tokens()), logits_hf(hf, tokens()), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", ["gqa", "tied", "linear-pi"])
def test_save_hf_loads_in_transformers(tmp_path, variant):
    """Our HF writer, checked by transformers' reader: catches a wrong q/k permutation or config key."""
    kw = {"gqa": {}, "tied": {"tie_embeddings": True}, "linear-pi": {"rope_interpolation": 4.0}}[variant]
    m = tiny_model(**kw)
    model.save(m, tmp_path, format="hf", max_shard_bytes=60_000)  # small shards: exercises the index
    assert (tmp_path / "model.safetensors.index.json").exists()
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    torch.testing.assert_close(logits_hf(hf, tokens(N=40)), logits(m, tokens(N=40)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fmt", ["meta", "hf"])
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"tie_embeddings": True},
        {"rope_interpolation": 2.5, "max_seq_len": 160},
        {"use_scaled_rope": True, "rope_theta": 500000.0, "rope_original_context": 16},
    ],
    ids=["plain", "tied", "pi", "llama3.1"],
)
def test_save_load_round_trip_is_exact(tmp_path, fmt, kw):
    m = tiny_model(**kw)
    model.save(m, tmp_path, format=fmt)
    m2 = model.load(tmp_path)
    if fmt == "hf":  # HF stores the FFN width itself, not Meta's recipe for it
        assert m2.args == replace(
            m.args, multiple_of=m2.args.multiple_of, ffn_dim_multiplier=m2.args.ffn_dim_multiplier
        )
    else:
        assert m2.args == m.args
    sd, sd2 = m.state_dict(), m2.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert torch.equal(logits(m, tokens()), logits(m2, tokens()))


def test_pi_and_llama31_together_round_trip_in_meta_format_only(tmp_path):
    m = tiny_model(use_scaled_rope=True, rope_theta=500000.0, rope_interpolation=2.0)
    model.save(m, tmp_path / "meta", format="meta")
    assert torch.equal(logits(model.load(tmp_path / "meta"), tokens()), logits(m, tokens()))
    with pytest.raises(ValueError, match="save with format='meta'"):
        model.save(m, tmp_path / "hf", format="hf")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("generation,n_shards", [(2, 1), (2, 2), (2, 4), (3, 2), (3, 4)])
def test_meta_shards_merge_back(tmp_path, generation, n_shards):
    kw = {"rope_theta": 500000.0, "ffn_dim_multiplier": 1.3} if generation == 3 else {}
    m = tiny_model(**kw)
    write_meta_shards(m, tmp_path, n_shards, generation)
    m2 = model.load(tmp_path)
    assert m2.args.vocab_size == m.args.vocab_size and m2.args.hidden_dim == m.args.hidden_dim
    assert m2.args.max_seq_len == (8192 if generation == 3 else 4096)
    assert torch.equal(logits(m2, tokens()), logits(m, tokens()))


def test_meta_checkpoint_without_output_head_is_tied(tmp_path):
    """Tied Meta-layout checkpoints store no output.weight; params.json need not say so."""
    m = tiny_model(tie_embeddings=True)
    write_meta_shards(m, tmp_path, 2, generation=3)
    m2 = model.load(tmp_path)
    assert m2.args.tie_embeddings and torch.equal(logits(m2, tokens()), logits(m, tokens()))


def test_meta_checkpoint_matches_transformers(tmp_path):
    """Meta layout -> our model, the same weights in HF layout -> transformers: same logits."""
    # intermediate_size: Meta's FFN recipe for dim 64, multiple_of 32
    hf = hf_model("LlamaConfig", num_key_value_heads=2, intermediate_size=192)
    hf.save_pretrained(tmp_path / "hf")
    m = model.load(tmp_path / "hf")
    m.args = replace(m.args, multiple_of=32)  # what Meta's params.json would say for this width
    write_meta_shards(m, tmp_path / "meta", n_shards=2)
    torch.testing.assert_close(
        logits(model.load(tmp_path / "meta"), tokens()), logits_hf(hf, tokens()), rtol=1e-4, atol=1e-5
    )


def test_load_with_dtype_and_bf16_storage(tmp_path):
    m = tiny_model(dtype=torch.bfloat16)
    model.save(m, tmp_path)
    assert model.load(tmp_path).tok_embeddings.weight.dtype == torch.bfloat16
    m32 = model.load(tmp_path, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in m32.parameters())
    assert torch.equal(m32.layers[0].attention.wq.weight, m.layers[0].attention.wq.weight.float())


def test_attention_switches_at_run_time():
    m, tok = tiny_model(), tokens(N=32)
    full = logits(m, tok)
    m.set_attention(group_size=8)
    s2 = logits(m, tok)
    assert not torch.allclose(s2, full, atol=1e-3)
    m.set_attention(group_size=8, backend="naive")
    torch.testing.assert_close(logits(m, tok), s2, rtol=1e-4, atol=1e-5)
    m.set_attention(group_size=64)  # one group holds everything in both halves: full attention again
    torch.testing.assert_close(logits(m, tok), full, rtol=1e-4, atol=1e-5)
    m.set_attention(group_size=None)
    assert m.layers[1].attention.backend == "naive"
    torch.testing.assert_close(logits(m, tok), full, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="unknown attention backend"):
        m.set_attention(backend="xformers")
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        m.set_attention(group_size=0)


@pytest.mark.parametrize("P,G,heads", [(2, 8, (4, 2)), (4, 6, (3, 1))])
def test_slices_with_a_halo_give_the_whole_sequence_loss(P, G, heads):
    """The model run on P slices of each sequence (forward's int `positions`: RoPE at the slice's positions;
    parallel.split_sequences with the halo carried from slice to slice in this process, layer by layer, as
    train.py carries it between processes) gives the unsplit loss, and the same gradients, in float64."""
    H, Hkv = heads
    m = tiny_model(dtype=torch.float64, dim=16 * H, n_heads=H, n_kv_heads=Hkv, max_seq_len=128).train()
    x, t = tokens(N=24 * P), tokens(N=24 * P, seed=2)
    calls, last = [], {}  # the layers that asked, in order; layer -> the previous slice's tail

    def halo(tail):
        layer = len(calls) % m.args.n_layers
        calls.append(layer)
        prev, last[layer] = last.get(layer, tail[:, :0]), tail
        return prev

    grads = []
    for split in (False, True):
        m.zero_grad()
        m.set_attention(group_size=G)
        if split:
            parallel.split_sequences(m, halo)
        n = x.shape[1] // P if split else x.shape[1]
        loss = sum(m(x[:, i : i + n], t[:, i : i + n], positions=i) for i in range(0, x.shape[1], n))
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in m.parameters()]))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-12, atol=1e-12)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="full attention needs whole sequences"):
        parallel.split_sequences(m.set_attention(group_size=None), halo)


def test_kv_cache_gives_the_logits_of_a_full_forward():
    m, tok = tiny_model(), tokens(N=20)
    cache = model.KVCache(m.args.n_layers)
    with torch.no_grad():
        parts = (
            [m(tok[:, :12], positions=cache)]
            + [m(tok[:, t : t + 1], positions=cache) for t in range(12, 17)]
            + [m(tok[:, 17:], positions=cache)]
        )
    assert cache.pos == 20
    torch.testing.assert_close(torch.cat(parts, dim=1), logits(m, tok), rtol=1e-5, atol=1e-5)
    m.set_attention(group_size=8)
    with pytest.raises(ValueError, match="uses full attention"), torch.no_grad():
        m(tok[:, :1], positions=cache)
    with pytest.raises(TypeError, match="positions: a KVCache"):
        m(tok, positions=-1)


def test_model_is_causal():
    m, tok = tiny_model(), tokens(N=20)
    tok2 = tok.clone()
    tok2[:, 12:] = (tok2[:, 12:] + 1) % m.args.vocab_size
    for g in (None, 8):
        m.set_attention(group_size=g)
        assert torch.equal(logits(m, tok)[:, :12], logits(m, tok2)[:, :12])


def test_ffn_width_follows_meta():
    """Llama 2 7B: 11008; Llama 3 8B: 14336 (ffn_dim_multiplier 1.3, multiple_of 1024)."""
    assert ModelArgs(dim=4096, multiple_of=256).hidden_dim == 11008
    assert ModelArgs(dim=4096, n_kv_heads=8, multiple_of=1024, ffn_dim_multiplier=1.3).hidden_dim == 14336
    assert ModelArgs(dim=8192, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3).hidden_dim == 28672


# ----------------------------------------------------------------------------- errors


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        model.load(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        model.load(tmp_path)
    (tmp_path / "params.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no consolidated.NN.pth"):
        model.load(tmp_path)


def test_params_json_that_does_not_match_the_weights(tmp_path):
    write_meta_shards(tiny_model(), tmp_path, 1)
    params = json.loads((tmp_path / "params.json").read_text())
    (tmp_path / "params.json").write_text(json.dumps({**params, "n_layers": 3}))
    with pytest.raises(ValueError, match=r"do not match its config:\n  missing layers.2"):
        model.load(tmp_path)
    (tmp_path / "params.json").write_text(json.dumps({**params, "multiple_of": 256}))
    with pytest.raises(ValueError, match=r"feed_forward.w1.weight is \(192, 64\), the config says \(256, 64\)"):
        model.load(tmp_path)


def test_shards_of_different_sizes(tmp_path):
    write_meta_shards(tiny_model(), tmp_path / "a", 2)
    write_meta_shards(tiny_model(), tmp_path / "b", 4)
    (tmp_path / "b" / "consolidated.01.pth").replace(tmp_path / "a" / "consolidated.01.pth")
    with pytest.raises(ValueError, match="shards of different sizes"):
        model.load(tmp_path / "a")


def test_corrupt_shard(tmp_path):
    write_meta_shards(tiny_model(), tmp_path, 1)
    f = tmp_path / "consolidated.00.pth"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(ValueError, match="incomplete or not a PyTorch checkpoint"):
        model.load(tmp_path)


def test_config_files_that_are_broken_or_incomplete(tmp_path):
    write_meta_shards(tiny_model(), tmp_path, 1)
    (tmp_path / "params.json").write_text('{"dim": 64,')
    with pytest.raises(ValueError, match="params.json is not valid JSON"):
        model.load(tmp_path)
    (tmp_path / "params.json").write_text('{"dim": 64}')
    with pytest.raises(ValueError, match=r"params.json lacks \['n_layers', 'n_heads'\]"):
        model.load(tmp_path)
    (tmp_path / "params.json").unlink()
    (tmp_path / "consolidated.00.pth").unlink()
    (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden_size": 64}')
    with pytest.raises(ValueError, match=r"config.json lacks \['num_hidden_layers'"):
        model.load(tmp_path)


def test_not_a_supported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="reads LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCa"):
        model.load(tmp_path)


def test_save_never_overwrites_silently(tmp_path):
    m = tiny_model()
    model.save(m, tmp_path)
    before = (tmp_path / "consolidated.00.pth").read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        model.save(tiny_model(seed=1), tmp_path, format="hf")
    assert (tmp_path / "consolidated.00.pth").read_bytes() == before and not (tmp_path / "config.json").exists()
    model.save(tiny_model(seed=1), tmp_path, format="hf", overwrite=True)  # replaces, leaving no stale Meta files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert torch.equal(logits(model.load(tmp_path), tokens()), logits(tiny_model(seed=1), tokens()))


def test_bad_model_args():
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        ModelArgs(dim=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="vocab_size is not set"):
        Transformer(replace(ModelArgs(dim=64, n_heads=4, n_layers=1), vocab_size=-1))


def mapped_file(t):
    """The file whose memory mapping holds tensor t's data, or None (from /proc/self/maps)."""
    ptr = t.data_ptr()
    for line in open("/proc/self/maps"):
        addr, *rest = line.split()
        lo, hi = (int(x, 16) for x in addr.split("-"))
        if lo <= ptr < hi:
            return rest[4] if len(rest) > 4 else None
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_loading_one_shard_copies_nothing(tmp_path):
    """A single-shard Meta checkpoint (Llama 2 7B is one) is used in place: every weight is a view of the
    memory-mapped file, so loading a 13 GB checkpoint does not take 13 GB of RAM, let alone twice that.
    (With several shards the merged tensors are the one copy; the shards stay mapped, not loaded.)"""
    write_meta_shards(tiny_model(), tmp_path, 1)
    m = model.load(tmp_path)
    shard = str(tmp_path / "consolidated.00.pth")
    assert {mapped_file(p) for p in m.parameters()} == {shard}
    # the check can fail
    assert shard not in {mapped_file(p) for p in model.load(tmp_path, dtype=torch.float64).parameters()}


# The paper's Table 7 (TFLOPs of one forward pass of Llama 2 7B):
# N -> (attn, proj, ffn, others, total), S2 (attn, total).
TABLE_7 = {
    8192: ((35.2, 35.2, 70.9, 2.2, 143.5), (8.8, 117.1)),
    16384: ((140.7, 70.4, 141.8, 4.3, 357.2), (35.2, 251.7)),
    32768: ((562.9, 140.7, 283.7, 8.7, 996.0), (140.7, 573.8)),
    65536: ((2251.8, 281.5, 567.4, 17.3, 3118.0), (562.9, 1429.1)),
}


@pytest.mark.parametrize("N", sorted(TABLE_7))
def test_forward_flops_reproduce_table_7(N):
    args = model.ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000)  # Llama 2 7B
    (attn, proj, ffn, others, total), (s2_attn, s2_total) = TABLE_7[N]
    full, s2 = model.forward_flops(args, N), model.forward_flops(args, N, group_size=N // 4)
    tf = lambda f: {k: round(v / 1e12, 1) for k, v in f.items()}  # noqa: E731  the table's precision
    assert tf(full) == {"attn": attn, "proj": proj, "ffn": ffn, "others": others}
    assert tf(s2) == {"attn": s2_attn, "proj": proj, "ffn": ffn, "others": others}
    # the table's totals add its rounded columns, so they may differ from the exact sum by the rounding
    assert abs(sum(full.values()) / 1e12 - total) <= 0.1 and abs(sum(s2.values()) / 1e12 - s2_total) <= 0.1


def test_forward_flops_counts_matmuls_of_a_tiny_model():
    """Independent count: every matmul of a GQA model, from the shapes the module really has."""
    args = model.ModelArgs(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=97, multiple_of=16)
    m = model.Transformer(args)
    N, hd = 40, args.head_dim
    linear = sum(
        2 * N * mod.in_features * mod.out_features
        for name, mod in m.named_modules()
        if isinstance(mod, torch.nn.Linear)
    )
    f = model.forward_flops(args, N)
    # gate: SiLU and the product
    head, gate = (
        2 * N * args.dim * args.vocab_size,
        2 * args.n_layers * N * args.hidden_dim,
    )
    assert f["proj"] + f["ffn"] - gate + head == linear  # the Linear layers: projections, FFN, output head
    assert f["attn"] == args.n_layers * args.n_heads * 4 * N * N * hd
    # S2 with a partial last group: 40 = 3 groups of 12 + 4
    assert model.forward_flops(args, N, group_size=12)["attn"] == args.n_layers * args.n_heads * 4 * (3 * 144 + 16) * hd


@pytest.mark.parametrize("chunk", [1, 7, 2048])
@pytest.mark.parametrize("tied", [False, True])
def test_loss_in_the_forward_equals_cross_entropy_of_the_logits(chunk, tied):
    """model(tokens, targets): the chunked loss is the cross-entropy of model(tokens)'s logits, skipping
    IGNORE targets, per token or summed, and so are its gradients (with parallel.training_nll's recomputed
    chunks too)."""
    m = tiny_model(dtype=torch.float64, tie_embeddings=tied)
    x, t = tokens(n=2, N=24), tokens(n=2, N=24, seed=2)
    t[0, 3:9] = model.IGNORE
    m.loss_chunk = chunk
    per_token = m(x, t, reduction="none")
    with pytest.raises(ValueError, match="'sum' .* or 'none'"):
        m(x, t, reduction="mean")
    ref = torch.nn.functional.cross_entropy(
        m(x).flatten(0, 1), t.flatten(), ignore_index=model.IGNORE, reduction="none"
    ).view(t.shape)
    torch.testing.assert_close(per_token, ref, rtol=1e-12, atol=1e-12)
    assert (per_token[0, 3:9] == 0).all()
    expected = torch.autograd.grad(ref.sum(), list(m.parameters()))
    for m.nll in (model.chunked_nll, parallel.training_nll):  # training_nll: each chunk recomputed in backward
        for a, b in zip(torch.autograd.grad(m(x, t), list(m.parameters())), expected):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(m(x, last_only=True), m(x)[:, -1:], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 7, 2048])
def test_loss_with_a_frozen_head_has_the_gradients_of_cross_entropy(chunk):
    """A frozen output weight (LoRA): the training loss makes d loss / d h in the forward (parallel.NLLFrozenHead);
    with per-token weights on the loss (any incoming gradient), every trained parameter's gradient is that
    of the cross-entropy of the logits, IGNORE targets skipped."""
    m = tiny_model(dtype=torch.float64)
    m.nll = parallel.training_nll  # as parallel.parallelize puts it in
    m.output.weight.requires_grad_(False)
    x, t = tokens(n=2, N=24), tokens(n=2, N=24, seed=2)
    t[1, :5] = model.IGNORE
    weights = torch.rand(t.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = torch.nn.functional.cross_entropy(
        m(x).flatten(0, 1), t.flatten(), ignore_index=model.IGNORE, reduction="none"
    ).view(t.shape)
    m.loss_chunk = chunk
    ours = m(x, t, reduction="none")
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    trained = [p for p in m.parameters() if p.requires_grad]
    for a, b in zip(*[torch.autograd.grad((loss * weights).sum(), trained) for loss in (ours, ref)]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_extend_context_and_the_refusal_past_it():
    """extend_context(s) divides positions by s and lengthens the context s times; a longer sequence is a
    clear error unless beyond_context is set; a cache counts the tokens it has seen."""
    m = tiny_model(max_seq_len=16)
    x = tokens(n=1, N=32)
    with pytest.raises(
        ValueError, match="32 tokens are more than the model's context of 16: extend it with m.extend_context"
    ):
        m(x)
    m.beyond_context = True
    plain = m(x)
    m.beyond_context = False
    m.extend_context(2)
    assert (m.args.rope_interpolation, m.args.max_seq_len) == (2.0, 32)
    stretched = m(x)  # within the context now, and different: positions are halved
    assert (stretched - plain).abs().max() > 1e-3
    ref = tiny_model(max_seq_len=32, rope_interpolation=2.0)
    torch.testing.assert_close(stretched, ref(x), rtol=0, atol=0)
    cache = model.KVCache(len(m.layers))
    m(x[:, :30], positions=cache)
    with pytest.raises(ValueError, match="33 tokens are more than"):
        m(x[:, :3], positions=cache)
    with pytest.raises(ValueError, match="at least 1"):
        m.extend_context(0.5)
