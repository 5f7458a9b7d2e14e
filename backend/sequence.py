"""Sequence: one request's tokens, progress and KV blocks."""
import enum
import itertools
import time

from backend.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


_arrival_counter = itertools.count()


class Sequence:
    def __init__(self, request_id: str, prompt: str, prompt_token_ids: list[int], params: SamplingParams):
        self.request_id = request_id
        self.prompt = prompt
        self.params = params
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0      # tokens whose KV is in the cache (or scheduled this step)
        self.block_table: list[int] = []
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.arrival = next(_arrival_counter)   # FCFS order; preemption picks the latest
        self.arrival_time = time.monotonic()
        self.generator = None                    # per-request torch.Generator when params.seed is set
        self.detok = None                        # backend.detokenizer.DetokenizerState

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

    def __repr__(self):
        return (f"Sequence({self.request_id!r}, tokens={self.num_tokens}, computed={self.num_computed_tokens}, "
                f"blocks={self.block_table}, {self.status.name})")
