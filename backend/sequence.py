"""Sequence: one sample's tokens, progress and KV blocks; SequenceGroup: one request's samples/beams.

This is the scheduling record: what the scheduler, the block manager and the model runner need.
Output state (text, what was sent) lives in the output processor, not here.
"""
import enum
import itertools
import time

from backend.errors import INTERNAL
from backend.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


_arrival_counter = itertools.count()


class Sequence:
    def __init__(self, request_id: str, token_ids: list[int], num_prompt_tokens: int, params: SamplingParams):
        self.request_id = request_id
        self.params = params
        self.token_ids = list(token_ids)           # prompt + output tokens known on the host
        self.num_prompt_tokens = num_prompt_tokens
        # Tokens sampled on the GPU whose values the host does not know yet (async scheduling):
        # they follow token_ids and count in num_tokens.
        self.num_placeholders = 0
        self.num_computed_tokens = 0      # tokens whose KV is in the cache (or being computed this step)
        self.num_reported_tokens = num_prompt_tokens   # tokens already handed to the output processor
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # chained hashes of the full blocks, in order
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.arrival = next(_arrival_counter)   # FCFS order; preemption picks the latest
        self.arrival_time = time.monotonic()
        self.first_scheduled_time: float | None = None   # set when it is first admitted (metrics)
        self.priority = params.priority
        self.prefill_bypassed = 0                # times later prompts went first (scheduler's aging)
        self.group: "SequenceGroup | None" = None
        self.index = 0                           # sample index within its request
        self.cum_logprob = 0.0                   # sum of the output tokens' log-probs (beam score, or when asked)
        self.unreported_logprobs: list = []      # TokenLogprobs of tokens not yet handed to the front (when asked)
        self.generator = None                    # per-sample torch.Generator when params.seed is set

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) + self.num_placeholders

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def sort_key(self):
        """Scheduling order: lower priority value first, then earlier arrival."""
        return self.priority, self.arrival

    def seats(self) -> int:
        """Running slots to reserve on admission: a request that will fork into n samples or
        beams reserves them all, so max_num_seqs holds after the fork."""
        group = self.group
        if group is None or group.forked:
            return 1
        return max(self.params.n, self.params.beam_width)

    def fork(self, index: int) -> "Sequence":
        """A sequence with this one's tokens and progress, field by field (a new field must be
        decided here, never shared by accident). No blocks: the caller shares them
        (BlockManager.fork), and no generator."""
        child = Sequence(self.request_id, self.token_ids, self.num_prompt_tokens, self.params)
        child.num_placeholders = self.num_placeholders
        child.num_computed_tokens = self.num_computed_tokens
        child.num_reported_tokens = self.num_reported_tokens
        child.status = self.status
        child.arrival, child.arrival_time, child.priority = self.arrival, self.arrival_time, self.priority
        child.first_scheduled_time = self.first_scheduled_time
        child.group = self.group
        child.index = index
        child.cum_logprob = self.cum_logprob
        child.unreported_logprobs = list(self.unreported_logprobs)
        child.prefill_bypassed = 0     # a fork starts as a decode: no prompt left to wait for
        return child

    def __repr__(self):
        return (f"Sequence({self.request_id!r}#{self.index}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={self.block_table}, {self.status.name})")


class SequenceGroup:
    """The samples (n > 1) or beams of one request. Starts as one sequence that runs the prompt;
    it forks into n samples (or the beams) when the prompt's first token is drawn."""

    def __init__(self, seq: Sequence):
        self.request_id = seq.request_id
        self.params = seq.params
        self.seqs = [seq]
        self.forked = False
        self.beam_hyps: list[tuple[float, Sequence]] = []   # finished beams (score, seq)
        self.error: str | None = None
        self.error_kind = INTERNAL     # backend.errors: why `error` ended it
        # prompt_logprobs: one entry per prompt token (None for the first: nothing precedes it),
        # filled chunk by chunk, handed to the front once complete
        self.prompt_logprobs: list | None = [None] if seq.params.prompt_logprobs is not None else None
        self.prompt_logprobs_sent = False
        seq.group = self

    @property
    def forks(self) -> bool:
        """True if this request forks into several sequences (n > 1 or beams)."""
        return self.params.n > 1 or self.params.use_beam_search

    @property
    def steps_synchronously(self) -> bool:
        """Forks, or reads its own output history when sampling (penalties, bad_words): while it
        runs, no step may start before the last one's tokens are on the host."""
        return self.forks or self.params.needs_output_history

    @property
    def is_beam(self) -> bool:
        return self.params.use_beam_search

    def live(self) -> list[Sequence]:
        return [s for s in self.seqs if not s.is_finished]

    @property
    def finished(self) -> bool:
        if len(self.seqs) == 1:   # asked per request per step: skip the generator in the common case
            return self.seqs[0].is_finished
        return all(s.is_finished for s in self.seqs)
