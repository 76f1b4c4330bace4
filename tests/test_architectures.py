"""Mistral, Qwen2 and Qwen3 beside Llama, and YaRN beside Position Interpolation, each against transformers'
own class: loading, saving back as the same class, LoRA on biased projections, and what is refused."""

import json

import pytest
import torch

import hf
import lora
import model
from common import hf_model, logits, logits_hf, tiny_model, tokens

transformers = pytest.importorskip(
    "transformers", reason="transformers is the independent reference: pip install -r requirements-dev.txt"
)

# transformers config class and kwargs -> the variants a loader must get right: GQA, MHA, odd head counts, tied
# and untied embeddings, head_dim apart from hidden_size / heads, Qwen2's biases, Qwen3's q/k norms
VARIANTS = {
    "llama-head-dim": ("LlamaConfig", {"num_key_value_heads": 2, "head_dim": 24}),
    "mistral": ("MistralConfig", {"num_key_value_heads": 2, "sliding_window": None, "rope_theta": 1e6}),
    "mistral-head-dim": ("MistralConfig", {"num_key_value_heads": 1, "sliding_window": None, "head_dim": 8}),
    "qwen2-tied": ("Qwen2Config", {"num_key_value_heads": 2, "tie_word_embeddings": True, "rope_theta": 1e6}),
    "qwen2-odd": ("Qwen2Config", {"hidden_size": 72, "num_attention_heads": 9, "num_key_value_heads": 3}),
    "qwen3": ("Qwen3Config", {"num_key_value_heads": 2, "head_dim": 24}),
    "qwen3-tied-mha": ("Qwen3Config", {"num_key_value_heads": 4, "head_dim": 16, "tie_word_embeddings": True}),
    "qwen3-odd": (
        "Qwen3Config",
        {"hidden_size": 72, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 10},
    ),
}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}


@pytest.mark.parametrize("variant", VARIANTS)
def test_load_and_save_match_transformers(tmp_path, variant):
    """model.load gives transformers' logits; model.save writes a folder transformers opens as the same class
    with the same logits, and model.load reads back exactly."""
    config, kw = VARIANTS[variant]
    theirs = hf_model(config, **kw)
    theirs.save_pretrained(tmp_path / "hf")
    m = model.load(tmp_path / "hf")
    assert m.args.model_type == theirs.config.model_type
    assert (m.args.qkv_bias, m.args.qk_norm) == (config == "Qwen2Config", config == "Qwen3Config")
    x = tokens(N=40)
    torch.testing.assert_close(logits(m, x), logits_hf(theirs, x), rtol=1e-4, atol=1e-5)
    model.save(m, tmp_path / "ours", format="hf")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    assert type(again) is type(theirs)
    torch.testing.assert_close(logits_hf(again, x), logits(m, x), rtol=1e-4, atol=1e-5)
    m2 = model.load(tmp_path / "ours")
    assert m2.args == m.args and torch.equal(logits(m2, x), logits(m, x))


@pytest.mark.parametrize(
    "config,rope",
    [
        ("Qwen3Config", YARN),
        ("LlamaConfig", {**YARN, "beta_fast": 8, "beta_slow": 2, "attention_factor": 1.3, "truncate": False}),
        ("Qwen2Config", {**YARN, "factor": 2.0, "original_max_position_embeddings": 32}),
    ],
    ids=["qwen3", "llama-all-keys", "qwen2"],
)
def test_yarn_config_loads_with_transformers_logits_past_its_original_context(tmp_path, config, rope):
    theirs = hf_model(config, num_key_value_heads=2, rope_parameters={**rope, "rope_theta": 10000.0})
    theirs.save_pretrained(tmp_path)
    m = model.load(tmp_path)
    assert m.args.rope_yarn and m.args.max_seq_len == 64
    x = tokens(N=60)  # past the original 16 (or 32) positions
    torch.testing.assert_close(logits(m, x), logits_hf(theirs, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("base", ["llama", "qwen3"])
def test_extend_context_yarn_exports_what_transformers_reads(tmp_path, base):
    if base == "llama":
        m = tiny_model()
    else:
        hf_model("Qwen3Config", num_key_value_heads=2, head_dim=24).save_pretrained(tmp_path / "base")
        m = model.load(tmp_path / "base")
    plain = logits(m, tokens(N=40))
    m.extend_context(2, method="yarn").extend_context(2, method="yarn")  # factors multiply: 4 x 64 tokens
    a = m.args
    assert (a.rope_yarn, a.rope_scaling_factor, a.rope_original_context, a.max_seq_len) == (True, 4.0, 64, 256)
    assert (logits(m, tokens(N=40)) - plain).abs().max() > 1e-3  # YaRN changed the model
    model.save(m, tmp_path / "yarn", format="hf")
    cfg = json.loads((tmp_path / "yarn" / "config.json").read_text())
    assert cfg["rope_parameters"]["rope_type"] == "yarn" and cfg["max_position_embeddings"] == 256
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "yarn", dtype=torch.float32).eval()
    x = tokens(N=200)
    torch.testing.assert_close(logits_hf(theirs, x), logits(m, x), rtol=1e-4, atol=1e-5)
    assert torch.equal(logits(model.load(tmp_path / "yarn"), x), logits(m, x))


def test_yarn_and_pi_do_not_stack():
    with pytest.raises(ValueError, match="YaRN does not stack on Position Interpolation"):
        tiny_model().extend_context(2).extend_context(2, method="yarn")
    with pytest.raises(ValueError, match="this model's RoPE is YaRN .*use method='yarn'"):
        tiny_model().extend_context(2, method="yarn").extend_context(2)
    with pytest.raises(ValueError, match="method 'pi' or 'yarn'"):
        tiny_model().extend_context(2, method="ntk")
    m = tiny_model().extend_context(2, method="yarn").extend_context(1)  # factor 1: nothing to stack
    assert (m.args.rope_interpolation, m.args.rope_scaling_factor) == (1.0, 2.0)


@pytest.mark.parametrize("config", ["Qwen2Config", "Qwen3Config"])
def test_lora_keeps_the_bias_frozen_and_lora_plus_trains_the_qk_norms(tmp_path, config):
    hf_model(config, num_key_value_heads=2).save_pretrained(tmp_path)
    m = lora.add_lora(model.load(tmp_path), rank=4, alpha=8)
    trainable = lora.set_trainable(m)
    assert not any(k.endswith(".bias") for k in trainable)
    qk = {k for k in trainable if "q_norm" in k or "k_norm" in k}
    assert len(qk) == (4 if config == "Qwen3Config" else 0)  # 2 layers x (q_norm, k_norm)
    bias = m.layers[0].attention.wq.bias
    assert (bias is not None) == (config == "Qwen2Config")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    x = tokens(N=40)
    before = logits(m, x)
    lora.merge_lora(m)
    assert m.layers[0].attention.wq.bias is bias  # the merge kept it, untouched
    torch.testing.assert_close(logits(m, x), before, rtol=1e-5, atol=1e-5)


def test_sliding_window_keys_that_slide_nothing_load():
    cfg = {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": 96,
        "intermediate_size": 80,
    }
    for qwen in ({"use_sliding_window": False, "layer_types": ["sliding_attention"] * 2}, {"max_window_layers": 28}):
        assert hf.args_fields({**cfg, "model_type": "qwen2", "use_sliding_window": True, **qwen}, "c")["qkv_bias"]
    assert hf.args_fields({**cfg, "model_type": "mistral", "sliding_window": None}, "c")["model_type"] == "mistral"


@pytest.mark.parametrize(
    "config,match",
    [
        ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "GPT2LMHeadModel .model_type 'gpt2'. is not"),
        ({"model_type": "llama", "architectures": ["LlamaForSequenceClassification"]}, "is not supported; this loa"),
        ({"model_type": "mistral"}, r"sliding_window 4096\) is not implemented"),  # MistralConfig's default
        ({"model_type": "mistral", "sliding_window": 4096}, "sliding_window: null"),
        ({"model_type": "qwen2", "use_sliding_window": True, "max_window_layers": 1}, "use_sliding_window: false"),
        (
            {"model_type": "qwen3", "use_sliding_window": True, "layer_types": ["full_attention", "sliding_attention"]},
            "sliding-window",
        ),
        ({"model_type": "llama", "attention_bias": True}, "biases on o_proj or the MLP"),
        ({"rope_parameters": {**YARN, "mscale": 1.0, "mscale_all_dim": 1.0}}, "mscale_all_dim .DeepSeek's"),
        ({"rope_parameters": {"rope_type": "longrope"}}, "RoPE scaling 'longrope' is not supported"),
    ],
)
def test_what_is_refused_is_named(config, match):
    cfg = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 96}
    with pytest.raises(ValueError, match=match):
        hf.args_fields({**cfg, "intermediate_size": 80, **config}, "config.json")


def test_a_qwen_model_has_no_meta_format_and_fields_no_architecture_are_refused(tmp_path):
    hf_model("Qwen3Config", num_key_value_heads=2).save_pretrained(tmp_path / "qwen3")
    m = model.load(tmp_path / "qwen3")
    with pytest.raises(ValueError, match="a qwen3 model saves with format='hf'"):
        model.save(m, tmp_path / "meta", format="meta")
    m.args.model_type = "llama"  # q/k norms that no Llama has
    with pytest.raises(ValueError, match="qk_norm=True: no such Hugging Face model"):
        model.save(m, tmp_path / "hf", format="hf")
    assert not (tmp_path / "meta").exists() and not (tmp_path / "hf").exists()


def test_a_yarn_adapter_is_refused_on_a_base_yarn_cannot_extend(tmp_path):
    m = lora.add_lora(tiny_model().extend_context(2, method="yarn"), rank=2, alpha=4)
    lora.set_trainable(m)
    lora.save_trainable(m, tmp_path / "trainable.safetensors")
    with pytest.raises(ValueError, match="trained with YaRN, which this base's RoPE scaling cannot take"):
        lora.load_trainable(tiny_model(use_scaled_rope=True), tmp_path / "trainable.safetensors")
    again = lora.load_trainable(tiny_model(), tmp_path / "trainable.safetensors")
    assert (again.args.rope_yarn, again.args.rope_scaling_factor, again.args.max_seq_len) == (True, 2.0, 128)
