"""The messages between the layers.

core -> front, once per step per request that progressed: CoreOutput (token ids only: small, and
it could cross a process boundary). front -> caller: RequestOutput (text, ids, finish reasons).
"""
from dataclasses import dataclass, field


@dataclass
class SampleUpdate:
    index: int                         # which of the request's samples (or final beams, best first)
    new_token_ids: list[int]
    finish_reason: str | None = None   # "stop", "length", "abort"
    cumulative_logprob: float | None = None
    replace: bool = False              # beam search: new_token_ids is the whole output (beams reorder)
    logprobs: list | None = None       # a logprobs.TokenLogprobs per new token, when the request asked


@dataclass
class CoreOutput:
    request_id: str
    samples: list[SampleUpdate]
    finished: bool = False
    error: str | None = None
    error_kind: str = "internal"   # backend.errors: INTERNAL or UNAVAILABLE, when error is set
    first_scheduled_time: float | None = None   # time.monotonic() when it was first scheduled (metrics)
    prompt_logprobs: list | None = None   # once, complete: None, then a logprobs.TokenLogprobs per prompt token


@dataclass
class SampleOutput:
    """text, token_ids and logprobs hold everything so far, or only what is new since the sample's
    previous output when the request's output_kind is DELTA (then text == new_text)."""
    index: int                    # which of the request's n samples (or beams, best first)
    new_text: str                 # text added since this sample's previous output
    text: str                     # all output text so far (prompt excluded); DELTA: new_text
    token_ids: list[int]          # output token ids; DELTA: the new ones
    finish_reason: str | None = None   # "stop", "length", "abort"
    cumulative_logprob: float | None = None
    # per output token, vLLM's {token_id: {"logprob", "rank", "decoded_token"}}; None if not asked
    logprobs: list[dict] | None = None
    num_tokens: int = 0           # output tokens so far (whatever the output kind)


@dataclass
class RequestOutput:
    request_id: str
    prompt: str
    num_prompt_tokens: int
    samples: list[SampleOutput] = field(default_factory=list)
    finished: bool = False
    error: str | None = None
    error_kind: str = "internal"   # backend.errors: INTERNAL or UNAVAILABLE, when error is set
    first_scheduled_time: float | None = None   # time.monotonic() when it was first scheduled (metrics)
    first_token_time: float | None = None       # time.monotonic() when its first output token was processed
    # vLLM's: None for the first prompt token, then {token_id: {"logprob", "rank", "decoded_token"}}
    prompt_logprobs: list[dict | None] | None = None

    # n = 1 shorthands
    @property
    def new_text(self) -> str:
        return self.samples[0].new_text if self.samples else ""

    @property
    def text(self) -> str:
        return self.samples[0].text if self.samples else ""

    @property
    def token_ids(self) -> list[int]:
        return self.samples[0].token_ids if self.samples else []

    @property
    def finish_reason(self) -> str | None:
        return self.samples[0].finish_reason if self.samples else ("abort" if self.finished else None)
