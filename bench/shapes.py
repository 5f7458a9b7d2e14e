"""Benchmark model shapes (random weights via load_format=dummy) and a synthetic tokenizer.

No hub here: a shape directory holds config.json and a word-level tokenizer whose vocabulary is
"t0".."t{V-1}", so random token ids decode to text and encode back to the same ids.
"""
import json
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SHAPES = {
    "llama3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                      rope_theta=500000.0, max_position_embeddings=8192, tie_word_embeddings=False,
                      rms_norm_eps=1e-5),
    "llama3-70b": dict(model_type="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                       num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
                       rope_theta=500000.0, max_position_embeddings=8192, tie_word_embeddings=False,
                       rms_norm_eps=1e-5),
    "qwen3-0.6b": dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       rope_theta=1000000.0, max_position_embeddings=40960, tie_word_embeddings=True,
                       rms_norm_eps=1e-6),
}


def params_of(shape: str) -> int:
    c = SHAPES[shape]
    h, i, l, v, d = (c[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size", "head_dim"))
    attn = h * d * (c["num_attention_heads"] * 2 + c["num_key_value_heads"] * 2)
    embed = v * h * (1 if c["tie_word_embeddings"] else 2)
    return l * (attn + 3 * h * i) + embed


def make_shape_dir(shape: str, root: str) -> str:
    path = os.path.join(root, shape)
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        return path
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(SHAPES[shape], f)
    vocab = {f"t{i}": i for i in range(SHAPES[shape]["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)   # joins words with spaces
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(path)
    return path


def ids_to_text(ids) -> str:
    return " ".join(f"t{i}" for i in ids)
