"""LoRA by hand: fresh adapters change nothing, merging is exact, LoRA+ trains exactly what the paper says."""

import pytest
import torch

import lora
import model
from common import tiny_model, tokens


def logits(m, tok):
    with torch.no_grad():
        return m(tok)


def perturb_adapters(m, seed=2):
    """Give every lora_b a random value: a trained adapter (fresh ones are zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_b" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def test_fresh_adapters_change_nothing():
    m = tiny_model()
    before = logits(m, tokens())
    lora.add_lora(m, rank=8, alpha=16)
    assert torch.equal(logits(m, tokens()), before)
    names = [n for n, _ in m.named_parameters() if "lora" in n]
    assert len(names) == 2 * 4 * m.args.n_layers  # lora_a and lora_b on wq, wk, wv, wo of every layer
    assert "layers.0.attention.wq.weight" in m.state_dict()  # Meta's names survive


def test_adapter_is_the_low_rank_update():
    """Independent of LoRALinear's forward: W x + (alpha/r) B A x, written out."""
    m = lora.add_lora(tiny_model(dtype=torch.float64), rank=4, alpha=8, targets=("wv",))
    perturb_adapters(m)
    wv = m.layers[0].attention.wv
    x = torch.randn(3, m.args.dim, dtype=torch.float64)
    expected = x @ wv.weight.T + 2.0 * (x @ wv.lora_a.T) @ wv.lora_b.T
    torch.testing.assert_close(wv(x), expected)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_merge_is_exact(dtype, tol):
    m = lora.add_lora(tiny_model(dtype=dtype), rank=8, alpha=16, targets=("wq", "wk", "wv", "wo", "w1"))
    perturb_adapters(m)
    with_adapters = logits(m, tokens())
    lora.merge_lora(m)
    assert not any("lora" in n for n, _ in m.named_parameters())
    assert isinstance(m.layers[0].feed_forward.w1, torch.nn.Linear)
    torch.testing.assert_close(logits(m, tokens()), with_adapters, rtol=tol, atol=tol)


def test_merged_model_saves_and_loads_as_a_plain_llama(tmp_path):
    m = lora.add_lora(tiny_model(), rank=4, alpha=8)
    perturb_adapters(m)
    expected = logits(m, tokens())
    model.save(lora.merge_lora(m), tmp_path)
    torch.testing.assert_close(logits(model.load(tmp_path), tokens()), expected, rtol=1e-5, atol=1e-5)


def lora_names(m):
    return {
        f"layers.{i}.attention.{w}.{ab}"
        for i in range(m.args.n_layers)
        for w in ("wq", "wk", "wv", "wo")
        for ab in ("lora_a", "lora_b")
    }


def norm_names(m):
    return {f"layers.{i}.{n}.weight" for i in range(m.args.n_layers) for n in ("attention_norm", "ffn_norm")} | {
        "norm.weight"
    }


def test_lora_plus_trains_exactly_adapters_embedding_and_norms():
    m = lora.add_lora(tiny_model(), rank=8, alpha=16)
    trainable = lora.set_trainable(m)
    expected = lora_names(m) | norm_names(m) | {"tok_embeddings.weight"}
    assert set(trainable) == expected
    assert {n for n, p in m.named_parameters() if p.requires_grad} == expected  # not the output head
    assert not m.output.weight.requires_grad


def test_plain_lora_and_partial_extras():
    m = lora.add_lora(tiny_model(), rank=8, alpha=16)
    assert set(lora.set_trainable(m, extra=())) == lora_names(m)
    assert set(lora.set_trainable(m, extra=("norm",))) == lora_names(m) | norm_names(m)


def test_gradients_reach_exactly_the_trainable_set():
    m = lora.add_lora(tiny_model(), rank=4, alpha=8)
    perturb_adapters(m)
    trainable = set(lora.set_trainable(m))
    m(tokens()).logsumexp(-1).mean().backward()
    with_grad = {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == trainable


def test_trainable_weights_file_restores_the_model(tmp_path):
    """A LongLoRA adapter = adapters + embedding + norms: applied to the base model, the file alone
    reproduces the fine-tuned model."""
    base = tiny_model()
    m = lora.add_lora(tiny_model(), rank=4, alpha=8)
    lora.set_trainable(m)
    perturb_adapters(m)
    with torch.no_grad():  # as if training had moved the embedding and the norms too
        m.tok_embeddings.weight.add_(0.01)
        m.layers[1].ffn_norm.weight.mul_(1.1)
    m.args.rope_interpolation, m.args.max_seq_len = 4.0, 256  # trained with Position Interpolation, 4x
    lora.save_trainable(m, tmp_path / "trainable.safetensors")
    restored = lora.load_trainable(base, tmp_path / "trainable.safetensors")
    assert (restored.args.rope_interpolation, restored.args.max_seq_len) == (4.0, 256)
    assert lora.lora_config(restored) == {"rank": 4, "alpha": 8, "targets": ["wk", "wo", "wq", "wv"]}
    assert torch.equal(logits(restored, tokens(N=100)), logits(m, tokens(N=100)))


def test_trainable_file_from_another_model_is_refused(tmp_path):
    m = lora.add_lora(tiny_model(), rank=4, alpha=8)
    lora.set_trainable(m)
    lora.save_trainable(m, tmp_path / "t.safetensors")
    other = tiny_model(vocab_size=50)
    before = other.tok_embeddings.weight.clone()
    with pytest.raises(
        ValueError, match=r"does not fit this model:\n  tok_embeddings.weight: file \(96, 64\), model \(50, 64\)"
    ):
        lora.load_trainable(other, tmp_path / "t.safetensors")
    assert torch.equal(other.tok_embeddings.weight, before) and lora.lora_config(other) is None  # nothing changed


def test_adapters_for_layers_the_model_lacks_are_refused(tmp_path):
    m = lora.add_lora(tiny_model(n_layers=3), rank=4, alpha=8)
    lora.set_trainable(m, extra=())
    lora.save_trainable(m, tmp_path / "t.safetensors")
    with pytest.raises(ValueError, match="layers.2.attention.wq.lora_a: file \\(4, 64\\), model has no such parameter"):
        lora.load_trainable(tiny_model(n_layers=2), tmp_path / "t.safetensors")


def test_lora_errors():
    m = tiny_model()
    with pytest.raises(ValueError, match="choose from"):
        lora.add_lora(m, rank=8, alpha=16, targets=("q_proj",))
    with pytest.raises(ValueError, match="rank must be a positive int"):
        lora.add_lora(m, rank=0, alpha=16)
    lora.add_lora(m, rank=4, alpha=8)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        lora.add_lora(m, rank=4, alpha=8)
    with pytest.raises(ValueError, match="unknown trainable group"):
        lora.set_trainable(m, extra=("embeddings",))
    with pytest.raises(ValueError, match="nothing would train"):
        lora.set_trainable(tiny_model(), extra=())


def test_tied_embeddings_train_through_the_shared_head():
    m = lora.add_lora(tiny_model(tie_embeddings=True), rank=4, alpha=8)
    trainable = lora.set_trainable(m)
    assert "tok_embeddings.weight" in trainable and m.output is None
