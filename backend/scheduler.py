"""Scheduler: each step fills a token budget, vLLM V1 style (no prefill/decode phases).

Every sequence has num_computed_tokens; a step first gives each running decode its one token
(a prompt never stalls a decode: Sarathi-Serve's stall-free batching), then hands prompt chunks
(running prompts' next chunks and waiting prompts, admitted while max_num_seqs and free blocks
allow, reusing cached prefix blocks) up to the token budget and, under a latency target, up to
the time the step's predicted cost leaves (step_cost.py). Prompts go shortest-remaining first, so
a short prompt is not stuck behind a long one; a prompt passed over by later arrivals
max_prefill_bypass times is "aged" and goes before every later one (bypass 0: arrival order).
When a running sequence needs a block and none is free, the running sequence that comes last in
scheduling order (lowest priority, latest arrival) is preempted: its blocks are freed and it is
recomputed later from the start.
"""
import bisect
import time
from dataclasses import dataclass, field

from backend.block_manager import BlockManager
from backend.sequence import Sequence, SequenceStatus
from backend.step_cost import StepCostModel, chunk_attention


@dataclass
class SchedulerOutput:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)   # tokens computed for each seq this step
    preempted: list[Sequence] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)   # copy-on-write (src, dst)
    attention: int = 0            # (query, key) pairs the step's attention reads (cost model feature)
    num_prefill_tokens: int = 0   # tokens of prompt chunks (the rest are decodes)

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
    PREFILL_WINDOW = 128    # waiting prompts considered per step (from the queue's head), besides passed-over ones

    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 policy: str = "fcfs", max_prefill_bypass: int = 0, target_step_s: float = 0.0,
                 cost_model: StepCostModel | None = None):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.policy = policy
        self.max_prefill_bypass = max_prefill_bypass
        self.target_step_s = target_step_s            # 0: no latency target, the token budget alone
        self.cost_model = cost_model or StepCostModel()
        # Under a target, a step holding only decodes still takes this many prompt tokens, so that
        # prompts progress even when the decodes alone fill the target.
        self.min_prefill_tokens = max(block_manager.block_size, max_num_batched_tokens // 32)
        self.waiting: list[Sequence] = []      # kept in scheduling order
        self.running: list[Sequence] = []      # kept in scheduling order; the last is the first victim
        self.passed_over: set[Sequence] = set()   # waiting prompts with a bypass count (candidates wherever queued)
        self.num_preemptions = 0
        self.admit_only: set[str] | None = None   # if set, only these request ids are admitted (fault isolation)

    @classmethod
    def for_config(cls, config, num_blocks: int) -> "Scheduler":
        """The scheduler an EngineConfig describes, over a pool of num_blocks."""
        return cls(BlockManager(num_blocks, config.block_size, config.enable_prefix_caching), config.max_num_seqs,
                   config.max_num_batched_tokens, config.scheduling_policy, config.max_prefill_bypass,
                   config.target_itl_ms / 1e3)

    def _key(self, seq: Sequence):
        return seq.sort_key() if self.policy == "priority" else (0, seq.arrival)

    def _rank(self, seq: Sequence) -> int:
        """Passing a prompt counts only for sequences of the same or a lower priority."""
        return seq.priority if self.policy == "priority" else 0

    def _aged(self, seq: Sequence) -> bool:
        return seq.prefill_bypassed >= self.max_prefill_bypass

    def _prefill_key(self, seq: Sequence):
        """Prompt order: priority (if that policy), aged prompts by arrival, then the rest by the
        tokens they still need (shortest first)."""
        order = (0, seq.arrival) if self._aged(seq) else (1, seq.num_tokens - seq.num_computed_tokens, seq.arrival)
        return (self._rank(seq), *order)

    def add(self, seq: Sequence):
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=self._key)
        if seq.prefill_bypassed:
            self.passed_over.add(seq)

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
        budget = self._schedule_decodes(out)
        self._schedule_prompts(budget, out)
        bm = self.block_manager
        out.block_copies, bm.pending_copies = bm.pending_copies, []
        return out

    def _schedule_decodes(self, out: SchedulerOutput) -> int:
        """Every running sequence with one token to compute gets it (the budget holds max_num_seqs)."""
        budget = self.max_num_batched_tokens
        bm = self.block_manager
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.num_tokens - seq.num_computed_tokens > 1:   # a prompt (or a recompute): later
                i += 1
                continue
            while not bm.allocate(seq, seq.num_computed_tokens + 1):
                victim = self.running.pop()   # never one scheduled already: those come before seq
                self._preempt(victim, out)
                if victim is seq:
                    break
            else:
                self._schedule(seq, 1, out)
                budget -= 1
                i += 1
        return budget

    def _schedule_prompts(self, budget: int, out: SchedulerOutput):
        if not self.waiting and len(out.seqs) == len(self.running):   # all decoding, nothing queued
            return
        scheduled = {id(s) for s in out.seqs}
        running = [s for s in self.running if id(s) not in scheduled]
        window = self.waiting[:self.PREFILL_WINDOW]
        in_window = set(window)
        waiting = window + [s for s in self.passed_over if s not in in_window]
        if self.admit_only is not None:
            waiting = [s for s in waiting if s.request_id in self.admit_only]
        candidates = sorted(running + waiting, key=self._prefill_key)
        seats = sum(s.seats() for s in self.running)   # a request about to fork holds its samples' seats
        blocked: list[Sequence] = []    # aged prompts that could not run: nothing later of their rank passes them
        served: list[Sequence] = []
        for seq in candidates:
            if budget <= 0:
                break
            if any(self._rank(seq) >= self._rank(b) and seq.arrival > b.arrival for b in blocked):
                continue
            if seq.status == SequenceStatus.RUNNING:
                n = self._continue_prompt(seq, budget, out, scheduled)
            elif seq.status == SequenceStatus.WAITING and not out.preempted:   # a short pool: no admissions
                n = self._admit(seq, budget, seats, out)
                if n == 0 and self._aged(seq) and self._make_room(seq, scheduled, out):
                    seats = sum(s.seats() for s in self.running)
                    n = self._admit(seq, budget, seats, out)
                seats += seq.seats() if n else 0
            else:
                n = 0
            if n is None:   # out of time: nothing after it fits either
                break
            if n:
                budget -= n
                served.append(seq)
            elif self._aged(seq):
                blocked.append(seq)
        self._count_bypasses(candidates, served)

    def _chunk(self, seq: Sequence, num_cached: int, budget: int, out: SchedulerOutput) -> int | None:
        """Tokens of seq's prompt this step may take: what it lacks, within the budget and, under a
        latency target, within the predicted time left (None: no time left at all)."""
        n = min(seq.num_tokens - num_cached, budget)
        if not self.target_step_s or not self.cost_model.fitted:
            return n
        fit = self.cost_model.max_chunk(out.total_tokens, out.attention, num_cached, n, self.target_step_s)
        if not out.num_prefill_tokens:   # prompts always progress a little
            fit = max(fit, min(n, self.min_prefill_tokens))
        return fit or None

    def _continue_prompt(self, seq: Sequence, budget: int, out: SchedulerOutput, scheduled: set[int]) -> int | None:
        n = self._chunk(seq, seq.num_computed_tokens, budget, out)
        if not n:
            return n
        while not self.block_manager.allocate(seq, seq.num_computed_tokens + n):
            victim = self.running[-1]
            if id(victim) in scheduled:    # only sequences not yet in this step can make room
                return 0
            self.running.pop()
            self._preempt(victim, out)
            if victim is seq:
                return 0
        self._schedule(seq, n, out, prompt=True)
        scheduled.add(id(seq))
        return n

    def _admit(self, seq: Sequence, budget: int, seats: int, out: SchedulerOutput) -> int | None:
        """Start a waiting prompt if a seat and its blocks are free (0 if not)."""
        bm = self.block_manager
        if seats + seq.seats() > self.max_num_seqs:
            return 0
        # prompt_logprobs need every prompt position computed: no cached prefix for those (as vLLM)
        hits = bm.match_prefix(seq) if seq.params.prompt_logprobs is None else []
        cached = min(len(hits) * bm.block_size, seq.num_tokens - 1)
        n = self._chunk(seq, cached, budget, out)
        if not n:
            return n
        free_hits = sum(1 for b in hits if bm.ref_counts[b] == 0)
        total_blocks = -(-(cached + n) // bm.block_size)
        if total_blocks - len(hits) + free_hits > bm.num_free_blocks:
            return 0
        self._remove(self.waiting, seq)
        self.passed_over.discard(seq)
        seq.num_computed_tokens = bm.take_prefix(seq, hits)
        if not bm.allocate(seq, seq.num_computed_tokens + n):
            raise RuntimeError("block accounting error: admission check passed but allocation failed")
        seq.status = SequenceStatus.RUNNING
        if seq.first_scheduled_time is None:
            seq.first_scheduled_time = time.monotonic()
        bisect.insort(self.running, seq, key=self._key)
        self._schedule(seq, n, out, prompt=True)
        return n

    def _make_room(self, seq: Sequence, scheduled: set[int], out: SchedulerOutput) -> bool:
        """An aged prompt lacks a seat or blocks: preempt the prompts that arrived after it and
        hold theirs without being in this step (they may not pass it anyway, and with no decode
        left to free anything they would wait for each other forever)."""
        later = [r for r in self.running if id(r) not in scheduled and r.arrival > seq.arrival
                 and self._rank(r) >= self._rank(seq)]
        for victim in later:
            self._remove(self.running, victim)
            self._preempt(victim, out)
        return bool(later)

    def _count_bypasses(self, candidates: list[Sequence], served: list[Sequence]):
        """A prompt left out of this step while a later arrival of its rank (or lower) got prompt
        tokens was passed over once more."""
        if not served:
            return
        served_ids = {id(s) for s in served}
        for seq in candidates:
            if id(seq) in served_ids or seq.status == SequenceStatus.FINISHED:
                continue
            if any(s.arrival > seq.arrival and self._rank(s) >= self._rank(seq) for s in served):
                seq.prefill_bypassed += 1
                if seq.status == SequenceStatus.WAITING:
                    self.passed_over.add(seq)

    def _schedule(self, seq: Sequence, n: int, out: SchedulerOutput, prompt: bool = False):
        out.seqs.append(seq)
        out.num_new_tokens.append(n)
        out.attention += chunk_attention(seq.num_computed_tokens, n)
        if prompt:
            out.num_prefill_tokens += n

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
        self.passed_over.discard(seq)
        queue = self.running if was == SequenceStatus.RUNNING else self.waiting if was == SequenceStatus.WAITING else []
        self._remove(queue, seq)
