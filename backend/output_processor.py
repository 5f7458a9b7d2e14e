"""OutputProcessor: the front's side of every step. From the core's token ids it keeps each
sample's text (incremental detokenizing), applies stop strings, and assembles RequestOutputs.

A stop string is found here, after the core has already moved on: the sample ends at once for
the caller, and the core is told to free it (it may have computed a token more; that is dropped).
"""
import logging
import time

from backend.detokenizer import CONTEXT_TOKENS, DetokenizerState, decode_delta, fast_decoder, stream_decoder
from backend.logprobs import as_vllm_dict
from backend.outputs import CoreOutput, RequestOutput, SampleOutput, SampleUpdate
from backend.sampling_params import DELTA, FINAL_ONLY, SamplingParams

log = logging.getLogger(__name__)


class SampleState:
    """One sample's text and tokens, kept so that each step costs what its new tokens cost: text
    is a list of pieces (joined only for an output that wants it all) plus a short `pending` tail
    that a stop string could still cut."""
    __slots__ = ("ids", "num_context", "detok", "step_text", "pieces", "pending", "num_pieces_sent",
                 "num_tokens_sent", "finish_reason", "cumulative_logprob", "logprobs")

    def __init__(self, prompt_token_ids: list[int], logprobs: bool = False, step_text=None):
        """step_text: detokenizer.stream_decoder's step for this sample, or None (decode_delta)."""
        context = prompt_token_ids[-CONTEXT_TOKENS:]   # so that a leading space of the output survives
        self.ids = list(context)                       # prompt context + output token ids
        self.num_context = len(context)
        self.detok = DetokenizerState(0, len(context))
        self.step_text = step_text
        self.pieces: list[str] = []   # text no stop string can change any more
        self.pending = ""             # the text after it: the last `hold` characters while unfinished
        self.num_pieces_sent = 0      # pieces already in an output (DELTA)
        self.num_tokens_sent = 0      # output tokens already in an output (DELTA)
        self.finish_reason: str | None = None
        self.cumulative_logprob: float | None = None
        self.logprobs: list[dict] | None = [] if logprobs else None   # one vLLM-style map per output token

    @property
    def num_tokens(self) -> int:
        return len(self.ids) - self.num_context

    @property
    def output_token_ids(self) -> list[int]:
        return self.ids[self.num_context:]

    @property
    def text(self) -> str:
        return "".join(self.pieces) + self.pending

    def settle(self, hold: int):
        """Move what no stop string can reach any more (all of it once finished) out of `pending`."""
        keep = 0 if self.finish_reason is not None else hold
        if len(self.pending) > keep:
            cut = len(self.pending) - keep
            self.pieces.append(self.pending[:cut])
            self.pending = self.pending[cut:]

    def take_new(self) -> tuple[str, list[int], list[dict] | None]:
        """The text, token ids and log-prob maps not yet in an output (DELTA), marked as sent."""
        text = "".join(self.pieces[self.num_pieces_sent:])
        ids = self.ids[self.num_context + self.num_tokens_sent:]
        logprobs = None if self.logprobs is None else self.logprobs[self.num_tokens_sent:]
        self.num_pieces_sent, self.num_tokens_sent = len(self.pieces), self.num_tokens
        return text, ids, logprobs


class RequestState:
    __slots__ = ("prompt", "prompt_token_ids", "params", "samples", "finished", "hold", "first_scheduled_time",
                 "first_token_time", "prompt_logprobs")

    def __init__(self, prompt: str, prompt_token_ids: list[int], params: SamplingParams):
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.samples: dict[int, SampleState] = {}
        self.finished = False
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.prompt_logprobs: list[dict | None] | None = None
        # While a stop string could still be forming at the end of the text, hold those characters back.
        self.hold = max(map(len, params.stop)) - 1 if params.stop else 0

    def sample(self, index: int, tokenizer) -> SampleState:
        state = self.samples.get(index)
        if state is None:
            p = self.params
            step_text = (stream_decoder(tokenizer, self.prompt_token_ids[-CONTEXT_TOKENS:], p.skip_special_tokens)
                         if p.detokenize and not p.use_beam_search else None)
            state = self.samples[index] = SampleState(self.prompt_token_ids, p.logprobs is not None, step_text)
        return state


class OutputProcessor:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.decode = fast_decoder(tokenizer)
        self.requests: dict[str, RequestState] = {}

    def add_request(self, request_id: str, prompt: str, prompt_token_ids: list[int], params: SamplingParams):
        self.requests[request_id] = RequestState(prompt, prompt_token_ids, params)

    def process(self, outputs: list[CoreOutput], only_finished: bool = False,
                wanted=None) -> tuple[list[RequestOutput], list[tuple[str, int]], list[str]]:
        """Returns the RequestOutputs of the requests that progressed (with only_finished, only the
        finished ones and those `wanted(request_id)` says are watched), the (request id, sample
        index) pairs that a stop string ended, for the core to free, and the requests whose outputs
        could not be processed (they end here with an error), for the core to abort."""
        results, stopped, failed = [], [], []
        for out in outputs:
            state = self.requests.get(out.request_id)
            if state is None:   # finished here already (a stop string); the core caught up
                continue
            try:
                result = self._process_one(out, state, stopped, only_finished, wanted)
            except Exception as e:   # noqa: BLE001 - one request's text must not fail the others
                log.exception("output of request %s", out.request_id)
                self.requests.pop(out.request_id, None)
                failed.append(out.request_id)
                result = RequestOutput(out.request_id, state.prompt, len(state.prompt_token_ids), [], True,
                                       f"processing the output failed: {e!r}")
            if result is not None:
                results.append(result)
        return results, stopped, failed

    def _process_one(self, out: CoreOutput, state: RequestState, stopped: list, only_finished: bool,
                     wanted) -> RequestOutput | None:
        state.first_scheduled_time = state.first_scheduled_time or out.first_scheduled_time
        if out.prompt_logprobs is not None:
            state.prompt_logprobs = [None if e is None else as_vllm_dict(e, self._token_text)
                                     for e in out.prompt_logprobs]
        if state.first_token_time is None and any(u.new_token_ids for u in out.samples):
            state.first_token_time = time.monotonic()
        stop_hit = False   # a stop string ended one of its samples here: perhaps the request too
        for update in out.samples:
            sample = state.sample(update.index, self.tokenizer)
            if sample.finish_reason is None and self._apply(state, sample, update):
                stop_hit = True
                if update.finish_reason is None:
                    stopped.append((out.request_id, update.index))   # the core still runs it
        state.finished = out.finished or (
            stop_hit and not state.params.use_beam_search and len(state.samples) == state.params.n
            and all(s.finish_reason is not None for s in state.samples.values()))
        if state.finished:
            del self.requests[out.request_id]
        if state.finished or (state.params.output_kind != FINAL_ONLY and (
                not only_finished or (wanted is not None and wanted(out.request_id)))):
            return self._request_output(out.request_id, state, out.error, out.error_kind)
        return None

    def _token_text(self, token_id: int) -> str:
        return self.decode([token_id], skip_special_tokens=False)

    def _apply(self, state: RequestState, sample: SampleState, update: SampleUpdate) -> bool:
        """Take in a sample's new tokens; True when a stop string ended it here."""
        p = state.params
        if update.replace:   # final beams: the whole output at once, sent again from the start
            del sample.ids[sample.num_context:]
            sample.pieces, sample.pending, sample.num_pieces_sent, sample.num_tokens_sent = [], "", 0, 0
            sample.ids += update.new_token_ids
            if p.detokenize:
                sample.pending = self.decode(update.new_token_ids, skip_special_tokens=p.skip_special_tokens,
                                             spaces_between_special_tokens=p.spaces_between_special_tokens)
        else:
            for i, token in enumerate(update.new_token_ids):
                sample.ids.append(token)
                if update.logprobs is not None and sample.logprobs is not None:
                    sample.logprobs.append(as_vllm_dict(update.logprobs[i], self._token_text))
                if not p.detokenize:
                    continue
                old_len = len(sample.pending)
                if sample.step_text is not None:
                    sample.pending += sample.step_text(token)
                else:
                    sample.pending += decode_delta(self.decode, sample.ids, sample.detok, p.skip_special_tokens,
                                                   spaces_between_special_tokens=p.spaces_between_special_tokens)
                if p.stop and self._stop_string(sample, p, old_len):
                    sample.finish_reason = "stop"
                    sample.settle(0)
                    return True
                sample.settle(state.hold)
        sample.cumulative_logprob = update.cumulative_logprob
        sample.finish_reason = update.finish_reason
        sample.settle(state.hold)
        return False

    @staticmethod
    def _stop_string(sample: SampleState, p: SamplingParams, old_len: int) -> bool:
        """Search the new text for a stop string. `pending` holds the last max(len(stop)) - 1
        characters before it (SampleState.settle), so a stop string that began earlier is found too."""
        if sample.num_tokens < p.min_tokens:
            return False
        text = sample.pending
        start = max(0, old_len - max(map(len, p.stop)) + 1)
        hits = [(i, s) for i, s in ((text.find(s, start), s) for s in p.stop) if i >= 0]
        if not hits:
            return False
        i, s = min(hits)
        sample.pending = text[:i + len(s)] if p.include_stop_str_in_output else text[:i]
        return True

    def _request_output(self, request_id: str, state: RequestState, error: str | None,
                        error_kind: str) -> RequestOutput:
        delta = state.params.output_kind == DELTA
        samples = [self._sample_output(i, s, delta) for i, s in sorted(state.samples.items())]
        return RequestOutput(request_id, state.prompt, len(state.prompt_token_ids), samples, state.finished, error,
                             error_kind, state.first_scheduled_time, state.first_token_time, state.prompt_logprobs)

    @staticmethod
    def _sample_output(index: int, sample: SampleState, delta: bool) -> SampleOutput:
        new_text, new_ids, new_logprobs = sample.take_new()
        if delta:
            return SampleOutput(index, new_text, new_text, new_ids, sample.finish_reason, sample.cumulative_logprob,
                                new_logprobs, sample.num_tokens)
        # CUMULATIVE (and FINAL_ONLY's one output): everything so far, held-back text excepted. The
        # joined text replaces its pieces, so the next output joins two.
        text = "".join(sample.pieces)
        sample.pieces, sample.num_pieces_sent = [text], 1
        return SampleOutput(index, new_text, text, sample.output_token_ids, sample.finish_reason,
                            sample.cumulative_logprob, None if sample.logprobs is None else list(sample.logprobs),
                            sample.num_tokens)
