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
    """decode(ids, skip_special_tokens=True, spaces_between_special_tokens=True) -> str: the Rust
    tokenizer's decode where there is one (skips transformers' per-call conversions).

    With skip_special_tokens false, the text is built as vLLM's detokenizer (and transformers'
    slow decode) builds it: the runs of ordinary tokens are decoded apart, each added token is its
    own piece, and the pieces are joined with a space when spaces_between_special_tokens, else
    with nothing. (HF tokenizers' own decode has no such flag.)"""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        def plain(ids, skip_special_tokens=True):
            return backend.decode(ids, skip_special_tokens=skip_special_tokens)
        added = backend.get_added_tokens_decoder()
    else:
        plain = tokenizer.decode
        added = getattr(tokenizer, "added_tokens_decoder", {})
    added = {i: t.content for i, t in added.items()}

    def decode(ids, skip_special_tokens=True, spaces_between_special_tokens=True):
        if skip_special_tokens or added.keys().isdisjoint(ids):
            return plain(ids, skip_special_tokens=skip_special_tokens)
        pieces, run = [], []
        for t in ids:
            if t in added:
                if run:
                    pieces.append(plain(run, skip_special_tokens=False))
                    run = []
                pieces.append(added[t])
            else:
                run.append(t)
        if run:
            pieces.append(plain(run, skip_special_tokens=False))
        return (" " if spaces_between_special_tokens else "").join(pieces)

    return decode


def stream_decoder(tokenizer, context: list[int], skip_special_tokens: bool):
    """HF tokenizers' own incremental decoder (DecodeStream: one call per token, the same windowed
    rule as decode_delta in Rust), primed with the prompt's context; None where it does not apply:
    no Rust tokenizer, a tokenizers release without it, special tokens kept (their spacing is
    decode()'s, see fast_decoder), or a context that ends inside a character.
    step(token) -> the new text, "" while a character is incomplete."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not skip_special_tokens:
        return None
    if backend.decode(context, skip_special_tokens=True).endswith("\ufffd"):
        return None   # a prompt ending inside a character: decode_delta's rule (the two differ there)
    try:
        from tokenizers.decoders import DecodeStream
    except ImportError:
        return None
    stream = DecodeStream(skip_special_tokens=True)
    for token in context:
        stream.step(backend, token)
    return lambda token: stream.step(backend, token) or ""


def decode_delta(decode, token_ids: list[int], state: DetokenizerState, skip_special_tokens=True,
                 end: int | None = None, spaces_between_special_tokens=True) -> str:
    """Text added by the tokens past state.read_offset, up to token_ids[:end] (prompt + output);
    decode is fast_decoder(tokenizer)."""
    end = len(token_ids) if end is None else end
    flags = dict(skip_special_tokens=skip_special_tokens, spaces_between_special_tokens=spaces_between_special_tokens)
    prefix = decode(token_ids[state.prefix_offset:state.read_offset], **flags)
    full = decode(token_ids[state.prefix_offset:end], **flags)
    if len(full) <= len(prefix) or full.endswith("\ufffd"):
        return ""
    state.prefix_offset, state.read_offset = state.read_offset, end
    return full[len(prefix):]
