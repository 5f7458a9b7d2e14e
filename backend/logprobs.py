"""Log-probabilities of sampled tokens, as vLLM reports them by default ("raw" log-probs: from the
model's distribution, before temperature, penalties and top-k/top-p/min-p): the sampled token's
log-prob and its rank among the whole vocabulary (1 = most likely), plus the k most likely tokens.

Computed on the device in the sampling step, only for the rows of requests that asked, and packed
into one float tensor [rows, 2 + 2k] (log-prob, rank, k log-probs, k ids) so that it reaches the
host in the step's one non-blocking copy. Ranks and ids are exact in fp32 below 2**24.
"""
from dataclasses import dataclass

import torch

from backend.transfer import to_device


@dataclass
class TokenLogprobs:
    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]     # the most likely (id, log-prob), best first: rank i + 1


def compute(raw_logits: torch.Tensor, tokens: torch.Tensor, k: int) -> torch.Tensor:
    """raw_logits [R, V] fp32 (untouched by sampling), tokens [R] the ids drawn: packed [R, 2 + 2k]."""
    logprobs = torch.log_softmax(raw_logits.float(), dim=-1)
    chosen = logprobs.gather(1, tokens.view(-1, 1))
    rank = (logprobs > chosen).sum(dim=-1, keepdim=True) + 1
    parts = [chosen, rank.float()]
    if k:
        top = logprobs.topk(k, dim=-1)
        parts += [top.values, top.indices.float()]
    return torch.cat(parts, dim=1)


def unpack(row: list[float], token_id: int, k: int, num_top: int) -> TokenLogprobs:
    """One packed row (as a host list) computed with k top entries, of which num_top were asked."""
    values, ids = row[2:2 + k], row[2 + k:2 + 2 * k]
    return TokenLogprobs(token_id, row[0], int(row[1]), [(int(i), v) for i, v in zip(ids[:num_top], values)])


def as_vllm_dict(entry: TokenLogprobs, decode) -> dict[int, dict]:
    """{token_id: {"logprob", "rank", "decoded_token"}}: the sampled token, then the top ones
    (the sampled token appears once, with its own rank)."""
    out = {entry.token_id: {"logprob": entry.logprob, "rank": entry.rank, "decoded_token": decode(entry.token_id)}}
    for rank, (token_id, logprob) in enumerate(entry.top, start=1):
        if token_id not in out:
            out[token_id] = {"logprob": logprob, "rank": rank, "decoded_token": decode(token_id)}
    return out


def prompt_chunk_logprobs(seqs, num_new_tokens, hidden: torch.Tensor, compute_logits) -> dict:
    """For the sequences of a step that asked prompt_logprobs: the log-probs of their prompt tokens
    whose predecessor is in this step's chunk. hidden holds the step's tokens, packed in seqs' order.
    Returns {seq: [(position, TokenLogprobs), ...]}; synchronous (only requests that ask pay)."""
    rows, targets, owners = [], [], []
    start = 0
    for seq, n in zip(seqs, num_new_tokens):
        c, k = seq.num_computed_tokens, seq.params.prompt_logprobs
        if k is not None:
            for p in range(c, min(c + n, seq.num_prompt_tokens - 1)):   # token p + 1 given tokens 0..p
                rows.append(start + p - c)
                targets.append(seq.token_ids[p + 1])
                owners.append((seq, p + 1, k))
        start += n
    if not rows:
        return {}
    device = hidden.device
    top_k = max(k for *_, k in owners)
    logits = compute_logits(hidden[to_device(rows, device)])
    packed = compute(logits, to_device(targets, device), top_k).tolist()
    found: dict = {}
    for (seq, position, k), row, target in zip(owners, packed, targets):
        found.setdefault(seq, []).append((position, unpack(row, target, top_k, k)))
    return found
