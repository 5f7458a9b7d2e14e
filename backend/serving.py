"""Serving logic between Triton's tensors and the engine, with no Triton in it (unit-tested on CPU).

model.py (the glue) hands over what pb_utils gives and sends what comes back:

    parse_request(inputs, parameters)   input arrays + request-parameters JSON -> ParsedRequest
    InFlight.take(items)                one round of queued (state, RequestOutput): one entry per request
    respond(state, merged, now, ...)    what to send for that entry: a Reply (tensors or an error kind)
    response_outputs(state, texts, out) a response's tensors, {output name: numpy array}
    MetricsBook                         what to observe per request, counter deltas from engine.stats()

Each output tensor holds one element per sample of the request (n > 1, or the n best beams of
beam search), like Triton's vLLM backend: `text_output` is [n] strings, `finish_reason` [n], ...
"""
import enum
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from backend import errors, io_spec
from backend.errors import EngineUnavailable
from backend.outputs import RequestOutput
from backend.sampling_params import DELTA, FINAL_ONLY, SamplingParams

# How often to ask Triton whether a request was cancelled (sender.is_cancelled() is a round trip
# to the server, ~40 us): every CANCEL_CHECK_BASE_S per request, stretched by
# CANCEL_CHECK_PER_LIVE_S per live request so that checks stay a few per cent of the sender's time.
CANCEL_CHECK_BASE_S = 0.05
CANCEL_CHECK_PER_LIVE_S = 0.002
# Sending holds the GIL (~160 us a response). Under load the sender rests as long as its last
# round took (at most SENDER_MAX_REST_S), so it never takes more than about half of the GIL
# from the engine thread; the outputs that queue up meanwhile merge into fewer responses.
SENDER_BUSY_ROUND_S = 0.002
SENDER_MAX_REST_S = 0.05
# The engine thread needs the GIL back quickly after each GPU wait; Python's default switch
# interval (5 ms) would make it wait behind the sender.
GIL_SWITCH_INTERVAL_S = 0.0005

INPUT_NAMES = tuple(name for name, _, _ in io_spec.INPUTS)
OPTIONAL_OUTPUTS = tuple(name for name in INPUT_NAMES if name.startswith("return_"))   # return_X adds output X

CANCELLED_MESSAGE = "request was cancelled"
SHUTDOWN_MESSAGE = "request was aborted (the server is shutting down)"


class BadRequest(ValueError):
    pass


class ErrorKind(enum.Enum):
    """What went wrong; each name is that of the TritonError code the glue sends."""
    INVALID_ARG = "invalid_arg"    # a bad request (HTTP 400), named field in the message
    UNAVAILABLE = "unavailable"    # shutting down, unhealthy, overloaded, or the request's timeout expired
    INTERNAL = "internal"          # an engine error, or a bug
    CANCELLED = "cancelled"        # the client went away


# ------------------------------------------------------------------------------------ requests

@dataclass(frozen=True)
class ParsedRequest:
    prompt: str
    params: SamplingParams
    stream: bool
    prepend_input: bool         # non-streaming responses start with the prompt
    want: frozenset[str]        # the optional outputs asked for (names of return_* inputs)

    @property
    def n(self) -> int:         # samples (or returned beams) per request
        return max(1, self.params.n)


def parse_request(inputs: Mapping[str, np.ndarray], parameters: str = "") -> ParsedRequest:
    """`inputs`: input name -> array (pb_utils' as_numpy()); `parameters`: the request parameters'
    JSON (HTTP generate: the keys that name no input). Raises BadRequest naming the field."""
    prompt = _string(inputs, "text_input")
    if prompt is None:
        prompt = _string(inputs, "prompt")
    if prompt is None:
        raise BadRequest("missing input: give the prompt as 'text_input' (or 'prompt')")
    stream = bool(_bool(inputs, "stream"))
    exclude = _bool(inputs, "exclude_input_in_output")
    if stream and exclude is False:
        # Triton's vLLM backend's words: streamed responses are deltas and never hold the prompt.
        raise BadRequest("Error generating stream: When streaming, `exclude_input_in_output` = False is not allowed.")
    options = sampling_options(inputs, parameters)
    try:
        params = SamplingParams.from_dict(options)
    except ValueError as e:
        raise BadRequest(str(e)) from None
    want = frozenset(name for name in OPTIONAL_OUTPUTS if _bool(inputs, name))
    params.cumulative_logprob = "return_cumulative_logprob" in want
    # Streams need only what is new per step, a single response only the end: neither pays per step
    # for the whole output so far.
    params.output_kind = DELTA if stream else FINAL_ONLY
    return ParsedRequest(prompt, params, stream, not stream and not exclude, want)


def sampling_options(inputs: Mapping[str, np.ndarray], parameters: str) -> dict:
    """The request's parameters, overridden by the `sampling_parameters` JSON input (the vLLM
    backend's way)."""
    options = {}
    if parameters:
        try:
            parsed = json.loads(parameters)
        except json.JSONDecodeError as e:
            raise BadRequest(f"request parameters are not valid JSON: {e}") from None
        if isinstance(parsed, dict):
            options.update(parsed)
    sampling_json = _string(inputs, "sampling_parameters")
    if sampling_json is not None and sampling_json.strip():
        try:
            parsed = json.loads(sampling_json)
        except json.JSONDecodeError as e:
            raise BadRequest(f"'sampling_parameters' is not valid JSON: {e}") from None
        if not isinstance(parsed, dict):
            raise BadRequest("'sampling_parameters' must be a JSON object")
        options.update(parsed)
    return options


def _element(inputs, name):
    array = inputs.get(name)
    if array is None:
        return None
    array = np.asarray(array).reshape(-1)
    if array.size != 1:
        raise BadRequest(f"input '{name}' must hold exactly one element, got {array.size}")
    return array[0]


def _string(inputs, name):
    value = _element(inputs, name)
    if value is None:
        return None
    if isinstance(value, (bytes, np.bytes_)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest(f"input '{name}' is not valid UTF-8") from None
    return str(value)


def _bool(inputs, name):
    value = _element(inputs, name)
    return None if value is None else bool(value)


def request_parameters(request) -> str:
    """The request parameters' JSON of a pb_utils.InferenceRequest ("" where there are none)."""
    try:
        return request.parameters()
    except Exception:  # noqa: BLE001 - an older python_backend without parameters()
        return ""


def request_timeout_s(request, parameters: str) -> float | None:
    """Triton's request timeout (its `timeout` parameter, microseconds) in seconds, or None."""
    try:
        micros = request.timeout()
    except Exception:  # noqa: BLE001 - an older python_backend without timeout()
        micros = 0
    return micros / 1e6 if micros else timeout_parameter_s(parameters)


def timeout_parameter_s(parameters: str) -> float | None:
    """The `timeout` request parameter (microseconds, Triton's meaning) where Triton passes it on
    as a plain parameter (HTTP generate) rather than as the request's timeout."""
    if not parameters or '"timeout"' not in parameters:
        return None
    try:
        micros = json.loads(parameters).get("timeout")
    except (json.JSONDecodeError, AttributeError):
        return None
    if isinstance(micros, bool) or not isinstance(micros, int) or micros <= 0:
        raise BadRequest(f"'timeout' must be a positive integer (microseconds), got {micros!r}")
    return micros / 1e6


def engine_request_id(number: int, triton_id: str) -> str:
    """Unique in the engine (a counter), and the client's id kept for the logs."""
    return f"{number}-{triton_id}" if triton_id else f"{number}"


def submit_error(e: Exception) -> "Reply":
    """The reply to a request that execute() could not submit."""
    if isinstance(e, ValueError):       # a bad request (BadRequest, or refused by add_request)
        return Reply.failure(ErrorKind.INVALID_ARG, str(e))
    if isinstance(e, EngineUnavailable):   # shutting down, unhealthy or overloaded: retry later
        return Reply.failure(ErrorKind.UNAVAILABLE, str(e))
    return Reply.failure(ErrorKind.INTERNAL, f"{type(e).__name__}: {e}")


class RequestState:
    """Per-request state, touched only by the sender thread after add_request. `sender` is the
    glue's response sender: here only its is_cancelled() is asked."""
    __slots__ = ("request_id", "sender", "request", "tokens_sent", "logprobs_unsent", "done", "next_cancel_check",
                 "t_start", "first_token_time", "last_token_time", "tokens_seen")

    def __init__(self, request_id: str, sender, request: ParsedRequest, t_start: float | None = None):
        self.request_id = request_id
        self.sender = sender
        self.request = request
        self.tokens_sent = [0] * request.n   # per sample: output tokens covered by responses sent
        self.logprobs_unsent: dict[int, list[dict]] = {}   # streaming: per sample, maps not yet in a response
        self.done = False                    # its final response is decided
        self.next_cancel_check = 0.0
        self.t_start = time.monotonic() if t_start is None else t_start
        self.first_token_time: float | None = None   # metrics: when its first token / latest token was seen
        self.last_token_time = self.t_start
        self.tokens_seen = 0


# ------------------------------------------------------------------------------------ responses

@dataclass(frozen=True)
class Reply:
    """One response to send. Neither outputs nor error: an empty final response."""
    outputs: dict[str, np.ndarray] | None = None
    final: bool = False
    error: ErrorKind | None = None
    message: str = ""
    abort: bool = False         # cancelled mid-flight: the engine must drop the request

    @classmethod
    def failure(cls, kind: ErrorKind, message: str, abort: bool = False) -> "Reply":
        return cls(final=True, error=kind, message=message, abort=abort)


CANCEL_REPLY = Reply.failure(ErrorKind.CANCELLED, CANCELLED_MESSAGE, abort=True)


class MergedOutput:
    """A request's outputs queued since its last response: each sample's new text pieces and new
    log-prob maps (streams get DELTA outputs), and the latest output (whose totals supersede the
    earlier ones)."""
    __slots__ = ("pieces", "logprobs", "output")

    def __init__(self, output: RequestOutput):
        self.pieces: dict[int, list[str]] = {}
        self.logprobs: dict[int, list[dict]] = {}
        self.add(output)

    def add(self, output: RequestOutput):
        self.output = output
        for s in output.samples:
            if s.new_text:
                self.pieces.setdefault(s.index, []).append(s.new_text)
            if s.logprobs:
                self.logprobs.setdefault(s.index, []).extend(s.logprobs)

    def new_texts(self, n: int) -> list[str]:
        return ["".join(self.pieces.get(i, ())) for i in range(n)]


class InFlight:
    """The sender thread's live requests: registered or with outputs seen, until their final
    response. Polled for cancellation even while the engine has nothing for them."""

    def __init__(self):
        self.live: set[RequestState] = set()

    def take(self, items) -> tuple[dict[RequestState, MergedOutput], bool]:
        """Merge one round of queued items: (state, output), (state, None) registering a request,
        None asking the sender to stop. Returns ({state: merged outputs}, stop)."""
        merged, stopping = {}, False
        for item in items:
            if item is None:
                stopping = True
                continue
            state, output = item
            if output is None:   # registration (may come after the request's first outputs)
                if not state.done:
                    self.live.add(state)
                continue
            entry = merged.get(state)
            if entry is None:
                merged[state] = MergedOutput(output)
            else:
                entry.add(output)
        self.live.update(merged)
        return merged, stopping

    def cancel_check_interval(self) -> float:
        return CANCEL_CHECK_BASE_S + CANCEL_CHECK_PER_LIVE_S * len(self.live)

    def cancelled_silent(self, merged, now: float, interval: float) -> list[RequestState]:
        """Requests with no output this round (waiting for the engine, or between outputs) that
        the client cancelled, so that one does not wait to be scheduled; they are done and forgotten."""
        cancelled = [s for s in self.live if s not in merged and not s.done and poll_cancelled(s, now, interval)]
        self.live.difference_update(cancelled)
        return cancelled

    def forget_done(self, states):
        for state in states:
            if state.done:
                self.live.discard(state)


def poll_cancelled(state: RequestState, now: float, interval: float) -> bool:
    """When a check is due, ask whether the client cancelled; if so the request is done."""
    if now < state.next_cancel_check:
        return False
    state.next_cancel_check = now + interval
    if not state.sender.is_cancelled():
        return False
    state.done = True
    return True


def respond(state: RequestState, merged: MergedOutput, now: float, interval: float) -> Reply | None:
    """What to send for a request's merged outputs of one round (None: nothing yet)."""
    if state.done:
        return None
    output, request = merged.output, state.request
    if output.finished:
        state.done = True
    elif poll_cancelled(state, now, interval):
        return CANCEL_REPLY
    if output.error:
        kind = ErrorKind.UNAVAILABLE if output.error_kind == errors.UNAVAILABLE else ErrorKind.INTERNAL
        return Reply.failure(kind, output.error)
    if output.finished and (not output.samples or any(s.finish_reason == "abort" for s in output.samples)):
        if state.sender.is_cancelled():   # the engine dropped it after the client left
            return Reply.failure(ErrorKind.CANCELLED, CANCELLED_MESSAGE)
        return Reply.failure(ErrorKind.UNAVAILABLE, SHUTDOWN_MESSAGE)
    if request.stream:
        for index, maps in merged.logprobs.items():   # a round without new text sends nothing: keep them
            state.logprobs_unsent.setdefault(index, []).extend(maps)
        if merged.pieces:
            return Reply(response_outputs(state, merged.new_texts(request.n), output, take_logprobs(state)),
                         final=output.finished)
        if output.finished:   # no new text: the final counts and finish reasons, if asked for
            return Reply(response_outputs(state, [""] * request.n, output, take_logprobs(state))
                         if request.want else None, final=True)
        return None
    if output.finished:
        prefix = request.prompt if request.prepend_input else ""
        return Reply(response_outputs(state, [prefix + s.text for s in output.samples], output), final=True)
    return None


def take_logprobs(state: RequestState) -> dict[int, list[dict]]:
    maps, state.logprobs_unsent = state.logprobs_unsent, {}
    return maps


def response_outputs(state: RequestState, texts: list[str], output: RequestOutput,
                     logprobs: dict[int, list[dict]] | None = None) -> dict[str, np.ndarray]:
    """The tensors of one response: `text_output` and the optional outputs asked for. Streaming
    `num_output_tokens` counts the tokens since the previous response (state.tokens_sent);
    `logprobs`: per sample, the log-prob maps this response carries (default: each sample's own)."""
    outputs = {"text_output": _strings(texts)}
    want = state.request.want
    if not want:
        return outputs
    samples = {s.index: s for s in output.samples}
    indices = range(len(texts))
    # per sample: the output tokens this response covers, [sent, total)
    sent = list(state.tokens_sent)
    totals = [samples[i].num_tokens if i in samples else sent[i] for i in indices]
    state.tokens_sent = totals
    if not state.request.stream:
        sent = [0] * len(texts)
    if "return_finish_reason" in want:   # the vLLM backend sends "None" until a sample ends
        outputs["finish_reason"] = _strings([str(samples[i].finish_reason if i in samples else None) for i in indices])
    if "return_num_input_tokens" in want:
        outputs["num_input_tokens"] = np.array([output.num_prompt_tokens], dtype=np.uint32)
    if "return_num_output_tokens" in want:
        outputs["num_output_tokens"] = np.array([t - s for t, s in zip(totals, sent)], dtype=np.uint32)
    if "return_cumulative_logprob" in want:
        values = [samples[i].cumulative_logprob if i in samples else None for i in indices]
        outputs["cumulative_logprob"] = np.array([math.nan if v is None else v for v in values], dtype=np.float32)
    if "return_logprobs" in want:
        outputs["logprobs"] = _strings([_logprobs_json(samples.get(i), logprobs) for i in indices])
    return outputs


def _logprobs_json(sample, logprobs: dict[int, list[dict]] | None) -> str:
    """The vLLM backend's logprobs output: a JSON list of one map per token of the response, or null."""
    if sample is None or sample.logprobs is None:
        return "null"
    return json.dumps(sample.logprobs if logprobs is None else logprobs.get(sample.index, []))


def _strings(texts):
    return np.array([t.encode("utf-8") for t in texts], dtype=np.object_)


def sender_rest(busy: float, stopping: bool) -> float:
    """Seconds for the sender to rest after a round that took `busy` (see SENDER_BUSY_ROUND_S)."""
    return min(busy, SENDER_MAX_REST_S) if busy > SENDER_BUSY_ROUND_S and not stopping else 0.0


# ------------------------------------------------------------------------------------ metrics

class MetricsBook:
    """vLLM's metrics (labels {model, version}): counters and gauges follow the engine's totals,
    refreshed every REFRESH_S; histograms are observed per request. The glue owns the metric objects."""

    COUNTERS = ("prompt_tokens_total", "generation_tokens_total", "num_preemptions_total",
                "prefix_cache_queries", "prefix_cache_hits",
                "request_rejected_total",   # ours: refused by max_queue_size
                # ours, where the host's time goes: the engine loop's steps (wall, CPU of its thread, waiting
                # for the GPU's tokens) and the response sender's CPU; wall - CPU - GPU wait = waiting for the GIL
                "engine_loop_seconds_total", "engine_loop_cpu_seconds_total", "engine_gpu_wait_seconds_total",
                "response_sender_cpu_seconds_total")
    GAUGES = ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")
    # Requests that ended well, by finish reason (vLLM's label finished_reason).
    LABELED_COUNTERS = {"request_success_total": ("finished_reason", ("stop", "length", "abort"))}
    _TOKENS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000]
    _PHASE_S = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                480.0, 960.0, 1920.0, 7680.0]
    HISTOGRAMS = {
        "time_to_first_token_seconds": [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                                        2.5, 5.0, 7.5, 10.0],
        "time_per_output_token_seconds": [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                                          5.0, 7.5, 10.0, 20.0, 40.0, 80.0],
        "e2e_request_latency_seconds": [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0],
        "request_prompt_tokens": _TOKENS,
        "request_generation_tokens": _TOKENS,
        "request_params_n": [1, 2, 5, 10, 20],
        "request_params_max_tokens": _TOKENS,
        # vLLM V1's phases: waiting to be scheduled, first scheduled to first token, first to last
        # token, first scheduled to last token
        "request_queue_time_seconds": _PHASE_S,
        "request_prefill_time_seconds": _PHASE_S,
        "request_decode_time_seconds": _PHASE_S,
        "request_inference_time_seconds": _PHASE_S,
    }
    # Per engine step (ours, for where a tail comes from): its device time and its tokens (vLLM's name).
    STEP_HISTOGRAMS = {
        "iteration_tokens_total": [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384],
        "step_duration_seconds": [0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
                                  0.1, 0.25, 0.5, 1.0, 2.5],
    }
    REFRESH_S = 0.5

    def __init__(self):
        self.seen = dict.fromkeys(self.COUNTERS, 0)
        self.next_refresh = 0.0

    @staticmethod
    def observations(state: RequestState, output: RequestOutput, now: float) -> list[tuple[str, float]]:
        """(histogram, value) pairs for a request's latest output of this round."""
        observed = []
        tokens = sum(s.num_tokens for s in output.samples)
        if state.first_token_time is None and tokens:
            # A single response comes at the end: its first tokens were made at the engine's time.
            first = now if state.request.stream or output.first_token_time is None else output.first_token_time
            state.first_token_time = state.last_token_time = first
            state.tokens_seen = tokens if first == now else min(tokens, len(output.samples))
            observed.append(("time_to_first_token_seconds", first - state.t_start))
        if tokens > state.tokens_seen:   # the mean gap per token that this response brings
            observed.append(("time_per_output_token_seconds", (now - state.last_token_time) / (tokens - state.tokens_seen)))
            state.tokens_seen, state.last_token_time = tokens, now
        if output.finished and output.error is None:
            params, first_token = state.request.params, state.first_token_time or now
            scheduled = output.first_scheduled_time or state.t_start
            observed += [("e2e_request_latency_seconds", now - state.t_start),
                         ("request_prompt_tokens", output.num_prompt_tokens),
                         ("request_generation_tokens", tokens),
                         ("request_params_n", params.n), ("request_params_max_tokens", params.max_tokens),
                         ("request_queue_time_seconds", max(0.0, scheduled - state.t_start)),
                         ("request_prefill_time_seconds", max(0.0, first_token - scheduled)),
                         ("request_decode_time_seconds", now - first_token),
                         ("request_inference_time_seconds", max(0.0, now - scheduled))]
        return observed

    @classmethod
    def successes(cls, output: RequestOutput) -> list[tuple[str, str]]:
        """(labeled counter, label value) to increment for a request that ended well: one per sample."""
        if not output.finished or output.error is not None:
            return []
        _, reasons = cls.LABELED_COUNTERS["request_success_total"]
        return [("request_success_total", s.finish_reason) for s in output.samples if s.finish_reason in reasons]

    @staticmethod
    def step_observations(samples) -> list[tuple[str, float]]:
        """(histogram, value) pairs for finished engine steps, given as (tokens, seconds)."""
        observed = []
        for tokens, seconds in samples:
            observed += [("iteration_tokens_total", tokens), ("step_duration_seconds", seconds)]
        return observed

    def refresh_due(self, now: float, force: bool = False) -> bool:
        """Every REFRESH_S, or now (force) when a request's final response is about to go out, so
        that a scrape after a final response counts all of that request."""
        if now < self.next_refresh and not force:
            return False
        self.next_refresh = now + self.REFRESH_S
        return True

    def counter_increments(self, stats: dict) -> dict[str, float]:
        """How much each counter grew since the last refresh (engine.stats() holds totals)."""
        increments = {}
        for name in self.COUNTERS:
            delta = stats[name] - self.seen[name]
            if delta > 0:
                increments[name] = delta
                self.seen[name] = stats[name]
        return increments
