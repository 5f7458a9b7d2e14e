"""Beam search over a SequenceGroup, as HF transformers' beam search ranks candidates.

Each step every live beam proposes its top tokens; of the 2*width best (beam score + log prob)
candidates, end-of-sequence ones become finished hypotheses (when ranked within the width)
and the others fill the next width beams. A hypothesis is scored sum_logprobs / len**length_penalty.
"""
import torch

from backend.sequence import Sequence, SequenceGroup


def length_normalized(score: float, length: int, length_penalty: float) -> float:
    return score / (max(length, 1) ** length_penalty)


def select_beams(group: SequenceGroup, logprobs: torch.Tensor, eos_ids: set[int]):
    """logprobs [W_live, V] for group.live() in order. Returns [(parent, token, new_score)] for the
    next beams, after adding finished hypotheses to group.beam_hyps."""
    beams = group.live()
    width = group.params.beam_width
    scores = torch.tensor([b.cum_logprob for b in beams], dtype=torch.float64).unsqueeze(1) + logprobs.double()
    top_scores, top_idx = scores.flatten().topk(min(2 * width, scores.numel()))
    vocab = logprobs.shape[1]
    chosen = []
    for rank, (score, idx) in enumerate(zip(top_scores.tolist(), top_idx.tolist())):
        parent, token = beams[idx // vocab], idx % vocab
        if token in eos_ids:
            if rank < width:
                add_hypothesis(group, parent, token, score)
            continue
        chosen.append((parent, token, score))
        if len(chosen) == width:
            break
    return chosen


def add_hypothesis(group: SequenceGroup, parent: Sequence, token: int | None, score: float):
    """Keep the best `width` finished beams. token None: the beam ends as it is (length limit)."""
    hyp = parent.fork(parent.index)
    if token is not None:
        hyp.token_ids.append(token)
    hyp.cum_logprob = score
    p = group.params
    group.beam_hyps.append((length_normalized(score, hyp.num_output_tokens, p.length_penalty), hyp))
    group.beam_hyps.sort(key=lambda x: -x[0])
    del group.beam_hyps[p.beam_width:]


def is_done(group: SequenceGroup, best_live_score: float, output_len: int) -> bool:
    """HF's stopping rule: enough hypotheses, and (unless early stopping) no live beam can beat the worst."""
    p = group.params
    if len(group.beam_hyps) < p.beam_width:
        return False
    if p.early_stopping:
        return True
    worst = group.beam_hyps[-1][0]
    return worst >= length_normalized(best_live_score, output_len, p.length_penalty)
