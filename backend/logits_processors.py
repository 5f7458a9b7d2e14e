"""Logits processors with vLLM's semantics: allowed_token_ids, bad_words, logit_bias and the
presence / frequency / repetition penalties, applied in that order (vLLM v1's sampler) to the
rows whose request asked for any of them, before min_tokens masking and sampling.

Batched on the device: each processor gathers, from the host, small index lists for only the rows
that need it (token ids, counts of the history) and makes one or two index tensors of them. A
batch in which no request asks costs one `if` (SamplingParams.processes_logits is cached).

The penalties and bad words read each Sequence's token_ids (prompt = the first num_prompt_tokens,
then the output): the engine core steps synchronously while such a request runs, so no sampled
token is still in flight (Sequence.num_placeholders is 0 here).

    presence/frequency (output only):  logits -= frequency * count + presence * (count > 0)
    repetition (prompt and output):    seen logits > 0 are divided by it, seen logits <= 0 multiplied
    bad_words:   for each word's token sequence w, if the output ends with w[:-1], w[-1] is -inf
    logit_bias:  logits[id] += bias;  allowed_token_ids: every other id is -inf
"""
import torch

from backend.sequence import Sequence
from backend.transfer import to_device

NEG_INF = float("-inf")


def apply_logits_processors(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """logits [S, V] fp32, one row per sequence of `seqs`; modified in place and returned. Rows whose
    request asks for none of the processors are left untouched (bit-identical)."""
    rows = [i for i, s in enumerate(seqs) if s.params.processes_logits]
    if not rows:
        return logits
    _allowed_token_ids(logits, [(i, seqs[i]) for i in rows if seqs[i].params.allowed_token_ids is not None])
    _bad_words(logits, [(i, seqs[i]) for i in rows if seqs[i].params.bad_words_token_ids])
    _logit_bias(logits, [(i, seqs[i]) for i in rows if seqs[i].params.logit_bias])
    _penalties(logits, [(i, seqs[i]) for i in rows if seqs[i].params.has_penalties])
    return logits


def _allowed_token_ids(logits: torch.Tensor, todo: list[tuple[int, Sequence]]):
    if not todo:
        return
    dev = logits.device
    local = [(k, t) for k, (_, seq) in enumerate(todo) for t in seq.params.allowed_token_ids]
    blocked = torch.ones(len(todo), logits.shape[1], dtype=torch.bool, device=dev)
    blocked[to_device([k for k, _ in local], dev), to_device([t for _, t in local], dev)] = False
    rows = to_device([i for i, _ in todo], dev)
    logits[rows] = logits[rows].masked_fill(blocked, NEG_INF)


def _bad_words(logits: torch.Tensor, todo: list[tuple[int, Sequence]]):
    """On the host: which word's last token would complete it now (the output ends with its prefix)."""
    hits_rows, hits_tokens = [], []
    for i, seq in todo:
        output = seq.token_ids[seq.num_prompt_tokens:]
        for word in seq.params.bad_words_token_ids:
            prefix = len(word) - 1
            if prefix <= len(output) and (prefix == 0 or output[-prefix:] == word[:-1]):
                hits_rows.append(i)
                hits_tokens.append(word[-1])
    if hits_rows:
        dev = logits.device
        logits[to_device(hits_rows, dev), to_device(hits_tokens, dev)] = NEG_INF


def _logit_bias(logits: torch.Tensor, todo: list[tuple[int, Sequence]]):
    if not todo:
        return
    dev = logits.device
    rows = [i for i, seq in todo for _ in seq.params.logit_bias]
    tokens = [t for _, seq in todo for t in seq.params.logit_bias]
    biases = [b for _, seq in todo for b in seq.params.logit_bias.values()]
    # (row, token) pairs are distinct (dict keys), so accumulate adds each bias once
    logits.index_put_((to_device(rows, dev), to_device(tokens, dev)),
                      to_device(biases, dev, logits.dtype), accumulate=True)


def _penalties(logits: torch.Tensor, todo: list[tuple[int, Sequence]]):
    if not todo:
        return
    dev, vocab = logits.device, logits.shape[1]
    out_rows, out_tokens, seen_rows, seen_tokens = [], [], [], []
    for k, (_, seq) in enumerate(todo):
        n = seq.num_prompt_tokens
        out_tokens += seq.token_ids[n:]
        out_rows += [k] * (len(seq.token_ids) - n)
        if seq.params.repetition_penalty != 1:
            seen_tokens += seq.token_ids
            seen_rows += [k] * len(seq.token_ids)
    rows = to_device([i for i, _ in todo], dev)
    x = logits[rows]
    counts = torch.zeros(len(todo), vocab, dtype=x.dtype, device=dev)
    if out_rows:
        counts.index_put_((to_device(out_rows, dev), to_device(out_tokens, dev)),
                          torch.ones(len(out_rows), dtype=x.dtype, device=dev), accumulate=True)
    if seen_rows:
        seen = torch.zeros(len(todo), vocab, dtype=torch.bool, device=dev)
        seen[to_device(seen_rows, dev), to_device(seen_tokens, dev)] = True
        rep = to_device([seq.params.repetition_penalty for _, seq in todo], dev, x.dtype)
        rep = torch.where(seen, rep.unsqueeze(1), torch.ones((), dtype=x.dtype, device=dev))
        x = torch.where(x > 0, x / rep, x * rep)
    freq = to_device([seq.params.frequency_penalty for _, seq in todo], dev, x.dtype)
    pres = to_device([seq.params.presence_penalty for _, seq in todo], dev, x.dtype)
    x = x - freq.unsqueeze(1) * counts
    x = x - pres.unsqueeze(1) * (counts > 0).to(x.dtype)
    logits[rows] = x
