"""Incremental detokenizer: text deltas that never split a multi-byte character.

Each step decodes only a short window of recent tokens (prefix_offset..end) and emits the part
beyond what the window's first half (prefix_offset..read_offset) already decoded to. A window
ending in U+FFFD means an incomplete UTF-8 sequence: wait for more tokens.
"""
from dataclasses import dataclass

CONTEXT_TOKENS = 5   # prompt tokens decoded before the first output token, so a leading space survives


@dataclass
class DetokenizerState:
    prefix_offset: int
    read_offset: int
    text: str = ""          # all output text so far (stop strings applied by the engine)


def new_state(num_prompt_tokens: int) -> DetokenizerState:
    return DetokenizerState(max(0, num_prompt_tokens - CONTEXT_TOKENS), num_prompt_tokens)


def fast_decoder(tokenizer):
    """The Rust tokenizer's decode where there is one (skips transformers' per-call conversions)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return lambda ids, skip_special_tokens=True: backend.decode(ids, skip_special_tokens=skip_special_tokens)
    return tokenizer.decode


def decode_delta(decode, token_ids: list[int], state: DetokenizerState, skip_special_tokens=True,
                 end: int | None = None) -> str:
    """Text added by the tokens past state.read_offset, up to token_ids[:end] (prompt + output);
    decode is fast_decoder(tokenizer)."""
    end = len(token_ids) if end is None else end
    prefix = decode(token_ids[state.prefix_offset:state.read_offset], skip_special_tokens=skip_special_tokens)
    full = decode(token_ids[state.prefix_offset:end], skip_special_tokens=skip_special_tokens)
    if len(full) <= len(prefix) or full.endswith("\ufffd"):
        return ""
    state.prefix_offset, state.read_offset = state.read_offset, end
    return full[len(prefix):]
