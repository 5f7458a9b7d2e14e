"""Forks: n > 1 samples and beam search over a SequenceGroup, in one place.

n > 1: the request runs its prompt as one sequence; when the prompt's first token is drawn it
forks into n samples that share the prompt's blocks (copy on write later).

Beam search ranks candidates as HF transformers does: each step every live beam proposes its top
tokens; of the 2*width best (beam score + log prob) candidates, end-of-sequence ones become
finished hypotheses (when ranked within the width) and the others fill the next width beams.
A hypothesis is scored sum_logprobs / len**length_penalty. Beams advance in lockstep and step
synchronously: the next step's inputs depend on this step's ranking.
"""
import torch

from backend.scheduler import Scheduler
from backend.sequence import Sequence, SequenceGroup
from backend.transfer import to_device


def fork_samples(parent: Sequence, scheduler: Scheduler, device) -> list[Sequence]:
    """Split a request into its n samples as its prompt completes (the step that draws their first
    tokens). Children start where the parent will be after this step: the whole prompt computed."""
    group = parent.group
    group.forked = True
    children = []
    for i in range(1, group.params.n):
        child = parent.fork(i)
        child.num_computed_tokens = parent.num_tokens
        if group.params.seed is not None:
            child.generator = torch.Generator(device=device).manual_seed(group.params.seed + i)
        group.seqs.append(child)
        scheduler.add_forked(parent, child)
        children.append(child)
    return children


def length_normalized(score: float, length: int, length_penalty: float) -> float:
    return score / (max(length, 1) ** length_penalty)


def beam_step(group: SequenceGroup, logprobs_of: dict[int, torch.Tensor], scheduler: Scheduler,
              eos_ids: set[int], max_model_len: int) -> int:
    """One step of a beam group. logprobs_of: id(seq) -> log-probs [vocab] for the beams that ran
    this step. Returns the number of tokens the beams took (0 if they could not advance)."""
    live = group.live()
    if any(id(seq) not in logprobs_of for seq in live):
        # Not every beam reached this step (chunked recompute after preemption): let the early ones
        # compute their last token again next step, so that the beams advance together.
        for seq in live:
            if id(seq) in logprobs_of:
                scheduler.recompute_last(seq)
        return 0
    logprobs = torch.stack([logprobs_of[id(s)] for s in live])
    length_before = live[0].num_output_tokens
    chosen = select_beams(group, logprobs, eos_ids)
    # Fork first (a fork copies its parent's tokens as they are), then append.
    next_beams, used = [], set()
    for parent, token, score in chosen:
        seq = parent if id(parent) not in used else _fork_beam(parent, scheduler)
        used.add(id(parent))
        next_beams.append((seq, token, score))
    for seq in live:
        if id(seq) not in used:
            scheduler.finish(seq, "dropped")
            group.seqs.remove(seq)
    for seq, token, score in next_beams:
        seq.token_ids.append(token)
        seq.cum_logprob = score
    group.forked = True
    p = group.params
    # (live[0] may have been dropped this step: measure a surviving beam)
    at_limit = length_before + 1 >= p.max_tokens or (next_beams and next_beams[0][0].num_tokens >= max_model_len)
    if at_limit or not next_beams:
        for seq, _, _ in next_beams:
            add_hypothesis(group, seq, None, seq.cum_logprob)
        _finish_beams(group, "length" if at_limit else "stop", scheduler)
    elif is_done(group, max(s for _, _, s in next_beams), length_before):
        _finish_beams(group, "stop", scheduler)
    return len(next_beams)


def _fork_beam(parent: Sequence, scheduler: Scheduler) -> Sequence:
    group = parent.group
    child = parent.fork(len(group.seqs))
    group.seqs.append(child)
    scheduler.add_forked(parent, child)
    return child


def _finish_beams(group: SequenceGroup, reason: str, scheduler: Scheduler):
    """The group ends: its sequences become the n best hypotheses, best first."""
    for seq in group.live():
        scheduler.finish(seq, reason)
    hyps = [seq for _, seq in group.beam_hyps[:group.params.n]]
    for i, seq in enumerate(hyps):
        seq.index = i
        scheduler.finish(seq, reason)   # never scheduled: this only marks it finished
    group.seqs = hyps


def select_beams(group: SequenceGroup, logprobs: torch.Tensor, eos_ids: set[int]):
    """logprobs [W_live, V] for group.live() in order. Returns [(parent, token, new_score)] for the
    next beams, after adding finished hypotheses to group.beam_hyps."""
    beams = group.live()
    width = group.params.beam_width
    cum = to_device([b.cum_logprob for b in beams], logprobs.device, torch.float64)
    scores = cum.unsqueeze(1) + logprobs.double()
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
