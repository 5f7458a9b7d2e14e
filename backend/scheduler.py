"""Scheduler: each step fills a token budget, vLLM V1 style (no prefill/decode phases).

Every sequence has num_computed_tokens; a step gives each running sequence the tokens it still
lacks (1 for a decode, a chunk for an unfinished prompt), then admits waiting sequences while
the budget, max_num_seqs and free blocks allow, reusing cached prefix blocks. A prompt longer
than the budget is chunked across steps. When a running sequence needs a block and none is
free, the running sequence that comes last in scheduling order (lowest priority, latest
arrival) is preempted: its blocks are freed and it is recomputed later from the start.
"""
import bisect
from dataclasses import dataclass, field

from backend.block_manager import BlockManager
from backend.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)   # tokens computed for each seq this step
    preempted: list[Sequence] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)   # copy-on-write (src, dst)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def sampling_seqs(self) -> list[Sequence]:
        """The sequences that draw a token this step: those whose scheduled tokens reach their end
        (a decode, or a prompt's last chunk), in step order; one logits row each."""
        return [s for s, n in zip(self.seqs, self.num_new_tokens) if s.num_computed_tokens + n == s.num_tokens]

    def __bool__(self):
        return bool(self.seqs)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 policy: str = "fcfs"):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.policy = policy
        self.waiting: list[Sequence] = []      # kept in scheduling order
        self.running: list[Sequence] = []      # kept in scheduling order; the last is the first victim
        self.num_preemptions = 0
        self.admit_only: set[str] | None = None   # if set, only these request ids are admitted (fault isolation)

    def _key(self, seq: Sequence):
        return seq.sort_key() if self.policy == "priority" else (0, seq.arrival)

    def add(self, seq: Sequence):
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=self._key)

    def add_forked(self, parent: Sequence, child: Sequence):
        """A sample or beam forked from a running sequence: it shares its parent's blocks."""
        self.block_manager.fork(parent, child)
        child.status = SequenceStatus.RUNNING
        bisect.insort(self.running, child, key=self._key)

    def recompute_last(self, seq: Sequence):
        """seq computes its last token again next step (beams that must advance together)."""
        seq.num_computed_tokens -= 1

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        bm = self.block_manager
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not bm.allocate(seq, seq.num_computed_tokens + n):
                victim = self.running.pop()
                self._preempt(victim, out)
                if victim is seq:
                    break
            else:
                self._schedule(seq, n, out)
                budget -= n
                i += 1
        if not out.preempted:  # when the pool is short, admitting more would only thrash
            self._admit(budget, out)
        out.block_copies, bm.pending_copies = bm.pending_copies, []
        return out

    def _admit(self, budget: int, out: SchedulerOutput):
        bm = self.block_manager
        if not self.waiting:
            return
        seats = sum(s.seats() for s in self.running)   # a request about to fork holds its samples' seats
        i = 0
        while i < len(self.waiting) and budget > 0:
            seq = self.waiting[i]
            if self.admit_only is not None and seq.request_id not in self.admit_only:
                i += 1
                continue
            if seats + seq.seats() > self.max_num_seqs:
                break
            hits = bm.match_prefix(seq)
            cached = min(len(hits) * bm.block_size, seq.num_tokens - 1)
            n = min(seq.num_tokens - cached, budget)
            free_hits = sum(1 for b in hits if bm.ref_counts[b] == 0)
            total_blocks = -(-(cached + n) // bm.block_size)
            if total_blocks - len(hits) + free_hits > bm.num_free_blocks:
                break
            self.waiting.pop(i)
            seq.num_computed_tokens = bm.take_prefix(seq, hits)
            if not bm.allocate(seq, seq.num_computed_tokens + n):
                raise RuntimeError("block accounting error: admission check passed but allocation failed")
            seq.status = SequenceStatus.RUNNING
            seats += seq.seats()
            bisect.insort(self.running, seq, key=self._key)
            self._schedule(seq, n, out)
            budget -= n

    def _schedule(self, seq: Sequence, n: int, out: SchedulerOutput):
        out.seqs.append(seq)
        out.num_new_tokens.append(n)

    def _preempt(self, seq: Sequence, out: SchedulerOutput):
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        self.add(seq)
        self.num_preemptions += 1
        out.preempted.append(seq)

    def advance(self, out: SchedulerOutput):
        """After the forward pass: the scheduled tokens are in the cache; hash newly full blocks."""
        for seq, n in zip(out.seqs, out.num_new_tokens):
            seq.num_computed_tokens += n
            self.block_manager.cache_full_blocks(seq)

    def recompute(self, seqs: list[Sequence]):
        """Send seqs back to waiting to be computed again from their tokens (after a failed step,
        whose KV writes and tokens in flight cannot be trusted)."""
        for seq in dict.fromkeys(seqs):
            if seq.is_finished or seq.status == SequenceStatus.WAITING:
                continue
            self._remove(self.running, seq)
            self.block_manager.free(seq)
            seq.num_computed_tokens = seq.num_placeholders = 0
            self.add(seq)

    @staticmethod
    def _remove(queue: list[Sequence], seq: Sequence):
        for i, s in enumerate(queue):   # identity, not ==: forks compare equal to nothing else anyway
            if s is seq:
                del queue[i]
                return

    def retire(self, seq: Sequence):
        """Stop scheduling seq (its last token is in flight and it ends there), keeping its blocks
        until finish()."""
        self._remove(self.running, seq)

    def finish(self, seq: Sequence, reason: str):
        """Finish seq wherever it is; its blocks go back to the pool at once. A token of it still in
        flight (async scheduling) is dropped."""
        was = seq.status
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.num_placeholders = 0
        self.block_manager.free(seq)
        queue = self.running if was == SequenceStatus.RUNNING else self.waiting if was == SequenceStatus.WAITING else []
        self._remove(queue, seq)
