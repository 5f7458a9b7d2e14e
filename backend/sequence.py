"""Sequence: one sample's tokens, progress and KV blocks; SequenceGroup: one request's samples/beams."""
import copy
import enum
import itertools
import time

from backend.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


_arrival_counter = itertools.count()
PLACEHOLDER = -1   # a token sampled on the GPU whose value the host does not know yet (async scheduling)


class Sequence:
    def __init__(self, request_id: str, prompt: str, prompt_token_ids: list[int], params: SamplingParams):
        self.request_id = request_id
        self.prompt = prompt
        self.params = params
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0      # tokens whose KV is in the cache (or being computed this step)
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # chained hashes of the full blocks, in order
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.arrival = next(_arrival_counter)   # FCFS order; preemption picks the latest
        self.arrival_time = time.monotonic()
        self.priority = params.priority
        self.group: "SequenceGroup | None" = None
        self.index = 0                           # sample index within its request
        self.cum_logprob = 0.0                   # beam search score
        self.generator = None                    # per-sample torch.Generator when params.seed is set
        self.detok = None                        # backend.detokenizer.DetokenizerState
        self.num_sent_chars = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

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
        """A copy that shares this sequence's progress; the caller shares the blocks (BlockManager.fork)."""
        child = copy.copy(self)
        child.token_ids = list(self.token_ids)
        child.block_table, child.block_hashes = [], []
        child.detok = copy.copy(self.detok)
        child.index = index
        return child

    def __repr__(self):
        return (f"Sequence({self.request_id!r}#{self.index}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={self.block_table}, {self.status.name})")


class SequenceGroup:
    """The samples (n > 1) or beams of one request. Starts as one sequence that runs the prompt;
    it forks into n samples (or the beams) when the prompt's first token is drawn."""

    def __init__(self, seq: Sequence, callback=None):
        self.request_id = seq.request_id
        self.params = seq.params
        self.seqs = [seq]
        self.callback = callback
        self.forked = False
        self.beam_hyps: list[tuple[float, Sequence]] = []   # finished beams (score, seq)
        self.error: str | None = None
        seq.group = self

    @property
    def forks(self) -> int:
        """1 if this request forks into several sequences (n > 1 or beams), else 0."""
        return int(self.params.n > 1 or self.params.use_beam_search)

    @property
    def is_beam(self) -> bool:
        return self.params.use_beam_search

    def live(self) -> list[Sequence]:
        return [s for s in self.seqs if not s.is_finished]

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)
