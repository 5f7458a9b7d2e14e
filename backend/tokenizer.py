"""The model's tokenizer through HF `tokenizers` directly (tokenizer.json), with transformers'
AutoTokenizer only as a fallback for checkpoints that have no tokenizer.json.

Loading through the Rust tokenizer keeps transformers' model stack out of the serving process
(in Triton's Python-backend stub that stack may not even import) and skips its per-call overhead.
"""
import json
import os

from tokenizers import Tokenizer as RustTokenizer


class Tokenizer:
    def __init__(self, path: str):
        self.backend_tokenizer = RustTokenizer.from_file(os.path.join(path, "tokenizer.json"))
        config_path = os.path.join(path, "tokenizer_config.json")
        config = json.load(open(config_path)) if os.path.exists(config_path) else {}
        eos = config.get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        self.eos_token_id = self.backend_tokenizer.token_to_id(eos) if eos else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.backend_tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def get_vocab(self) -> dict[str, int]:
        return self.backend_tokenizer.get_vocab()

    def __len__(self):
        return self.backend_tokenizer.get_vocab_size()


def load_tokenizer(path: str):
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        return Tokenizer(path)
    from transformers import AutoTokenizer   # sentencepiece-only checkpoints
    return AutoTokenizer.from_pretrained(path)
