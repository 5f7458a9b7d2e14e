"""Scheduler: each step fills a token budget, vLLM V1 style (no prefill/decode phases).

Every sequence has num_computed_tokens; a step gives each running sequence the tokens it still
lacks (1 for a decode, a chunk for an unfinished prompt), then admits waiting sequences while the
budget, max_num_seqs and free blocks allow. A prompt longer than the budget is chunked across
steps. When a running sequence needs a block and none is free, the latest-arrived running
sequence is preempted (its blocks freed, recomputed later from the start).
"""
from collections import deque
from dataclasses import dataclass, field

from backend.block_manager import BlockManager
from backend.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)   # tokens computed for each seq this step
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __bool__(self):
        return bool(self.seqs)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence):
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.block_manager.allocate(seq, seq.num_computed_tokens + n):
                victim = self.running.pop()
                self._preempt(victim, out)
                if victim is seq:
                    break
            else:
                self._schedule(seq, n, out)
                budget -= n
                i += 1
        if out.preempted:  # the pool is short: admitting more would only thrash
            return out
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.block_manager.allocate(seq, seq.num_computed_tokens + n):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self._schedule(seq, n, out)
            budget -= n
        return out

    def _schedule(self, seq: Sequence, n: int, out: SchedulerOutput):
        out.seqs.append(seq)
        out.num_new_tokens.append(n)

    def _preempt(self, seq: Sequence, out: SchedulerOutput):
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        out.preempted.append(seq)

    def advance(self, out: SchedulerOutput):
        """After the forward pass: the scheduled tokens are now in the cache."""
        for seq, n in zip(out.seqs, out.num_new_tokens):
            seq.num_computed_tokens += n

    def finish(self, seq: Sequence, reason: str):
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.block_manager.free(seq)
        if seq in self.running:
            self.running.remove(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
