"""Triton Python-backend glue for the LLM engine in backend/ (decoupled: one request, many responses).

Inputs and outputs follow Triton's vLLM backend (see ../config.pbtxt). The work is done by
backend.engine.LLMEngine, which runs its own loop thread; this file only turns requests into
engine.add_request(...) calls and engine outputs into responses:

    execute()        parse each request, add it to the engine, return None (responses come later)
    engine thread    calls on_output(RequestOutput): only puts it on a queue
    sender thread    drains the queue, builds responses and sends them; checks cancellation

When the sender falls behind, the outputs of one request waiting in the queue are merged into
one response (several tokens per response), so the engine never waits for the response path.

Each output tensor holds one element per sample of the request (n > 1, or the n best beams of
beam search), like the vLLM backend: `text_output` is [n] strings, `finish_reason` [n], ...
"""
import itertools
import json
import math
import os
import queue
import sys
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils


def _find_repo_root():
    """The folder holding backend/: $LLM_BACKEND_ROOT, else three folders above this file."""
    here = os.path.dirname(os.path.realpath(__file__))
    candidates = [os.environ.get("LLM_BACKEND_ROOT", ""),
                  os.path.dirname(os.path.dirname(os.path.dirname(here)))]
    for root in candidates:
        if root and os.path.isfile(os.path.join(root, "backend", "__init__.py")):
            return os.path.abspath(root)
    raise RuntimeError(f"cannot find the engine package backend/ (looked in {[c for c in candidates if c]}); "
                       "set LLM_BACKEND_ROOT to the repository root")


_ROOT = _find_repo_root()
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from backend.config import EngineConfig  # noqa: E402
from backend.engine import LLMEngine  # noqa: E402
from backend.sampling_params import SamplingParams  # noqa: E402

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
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

_OPTIONAL_OUTPUTS = ("return_finish_reason", "return_num_input_tokens", "return_num_output_tokens",
                     "return_cumulative_logprob")


class _Metrics:
    """vLLM's metric names on Triton's metrics endpoint (:8002/metrics), labels {model, version}.
    Counters and gauges follow the engine's totals; histograms are observed per request."""

    COUNTERS = ("prompt_tokens_total", "generation_tokens_total", "num_preemptions_total",
                "prefix_cache_queries", "prefix_cache_hits")
    GAUGES = ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")
    HISTOGRAMS = {
        "time_to_first_token_seconds": [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                                        2.5, 5.0, 7.5, 10.0],
        "e2e_request_latency_seconds": [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0],
        "request_prompt_tokens": [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000],
        "request_generation_tokens": [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000],
    }
    REFRESH_S = 0.5

    def __init__(self, labels):
        kinds = [(n, pb_utils.MetricFamily.COUNTER) for n in self.COUNTERS] + \
                [(n, pb_utils.MetricFamily.GAUGE) for n in self.GAUGES]
        self.metrics, self.seen, self.next_refresh = {}, {n: 0 for n in self.COUNTERS}, 0.0
        self.families = []   # a Metric works only while its MetricFamily lives
        for name, kind in kinds + [(n, pb_utils.MetricFamily.HISTOGRAM) for n in self.HISTOGRAMS]:
            family = pb_utils.MetricFamily(name=f"vllm:{name}", description=name.replace("_", " "), kind=kind)
            self.families.append(family)
            buckets = self.HISTOGRAMS.get(name)
            self.metrics[name] = family.Metric(labels=labels, **({"buckets": buckets} if buckets else {}))

    def refresh(self, stats, now):
        if now < self.next_refresh:
            return
        self.next_refresh = now + self.REFRESH_S
        for name in self.COUNTERS:
            delta = stats[name] - self.seen[name]
            if delta > 0:
                self.metrics[name].increment(delta)
                self.seen[name] = stats[name]
        for name in self.GAUGES:
            self.metrics[name].set(stats[name])

    def observe(self, name, value):
        self.metrics[name].observe(value)

    def close(self):
        self.metrics.clear()    # Metric objects first, then their families (Triton requires this order)
        self.families.clear()


class _Request:
    """Per-request state, touched only by the sender thread after add_request."""
    __slots__ = ("request_id", "sender", "prompt", "stream", "prepend_input", "n", "want", "tokens_sent",
                 "done", "next_cancel_check", "t_start", "first_token_seen")

    def __init__(self, request_id, sender, prompt, stream, prepend_input, n, want):
        self.request_id = request_id
        self.sender = sender
        self.prompt = prompt
        self.stream = stream
        self.prepend_input = prepend_input
        self.n = n                      # samples (or returned beams) per request
        self.want = want                # the optional outputs asked for (names of return_* inputs)
        self.tokens_sent = [0] * n      # per sample: output tokens covered by responses sent
        self.done = False
        self.next_cancel_check = 0.0
        self.t_start = time.monotonic()
        self.first_token_seen = False


class _BadRequest(ValueError):
    pass


def _tensor(request, name):
    t = pb_utils.get_input_tensor_by_name(request, name)
    if t is None:
        return None
    arr = t.as_numpy().reshape(-1)
    if arr.size != 1:
        raise _BadRequest(f"input '{name}' must hold exactly one element, got {arr.size}")
    return arr[0]


def _string(request, name):
    v = _tensor(request, name)
    if v is None:
        return None
    if isinstance(v, (bytes, np.bytes_)):
        try:
            return bytes(v).decode("utf-8")
        except UnicodeDecodeError:
            raise _BadRequest(f"input '{name}' is not valid UTF-8") from None
    return str(v)


def _bool(request, name):
    v = _tensor(request, name)
    return None if v is None else bool(v)


def _strings_tensor(name, texts):
    return pb_utils.Tensor(name, np.array([t.encode("utf-8") for t in texts], dtype=np.object_))


class TritonPythonModel:
    def initialize(self, args):
        self.logger = pb_utils.Logger
        model_config = json.loads(args["model_config"])
        params = {key: value.get("string_value", "") if isinstance(value, dict) else str(value)
                  for key, value in model_config.get("parameters", {}).items()}
        # Raises ValueError naming the bad parameter: the model then fails to load with that message.
        config = EngineConfig.from_parameters(params, model_dir_base=args["model_repository"])
        if args.get("model_instance_kind") == "GPU" and config.device == "auto":
            # instance_group KIND_GPU: one engine per instance, on the GPU Triton gave it (data parallel).
            config.device = f"cuda:{args['model_instance_device_id']}"
        self.engine = LLMEngine(config)
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        self._ids = itertools.count()
        self._queue = queue.SimpleQueue()
        self._live = set()  # requests with outputs seen and no final response yet (sender thread only)
        try:
            self._metrics = _Metrics({"model": args["model_name"], "version": args["model_version"]})
        except Exception as e:  # noqa: BLE001 - metrics off (--allow-metrics=false) or unsupported
            self.logger.log_info(f"llm: no vLLM-style metrics ({e})")
            self._metrics = None
        self._sender_thread = threading.Thread(target=self._sender_loop, name="llm-response-sender",
                                               daemon=True)
        self._sender_thread.start()
        try:
            self.engine.start()
        except Exception:
            self._queue.put(None)
            self._sender_thread.join(timeout=10)
            raise
        self.logger.log_info(f"llm: engine started (model {config.model}, engine code {_ROOT}/backend)")

    # ---------------------------------------------------------------- requests

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                self._submit(request, sender)
            except (_BadRequest, ValueError) as e:
                self._send_error(sender, str(e), pb_utils.TritonError.INVALID_ARG)
            except RuntimeError as e:  # the engine is shutting down
                self._send_error(sender, str(e), pb_utils.TritonError.UNAVAILABLE)
            except Exception as e:  # noqa: BLE001 - a bug must fail the request, not the model
                self._send_error(sender, f"{type(e).__name__}: {e}", pb_utils.TritonError.INTERNAL)
        return None

    def _submit(self, request, sender):
        prompt = _string(request, "text_input")
        if prompt is None:
            prompt = _string(request, "prompt")
        if prompt is None:
            raise _BadRequest("missing input: give the prompt as 'text_input' (or 'prompt')")
        stream = bool(_bool(request, "stream"))
        exclude = _bool(request, "exclude_input_in_output")
        if stream and exclude is False:
            # As in Triton's vLLM backend: streamed responses are deltas and never hold the prompt.
            raise _BadRequest("when streaming, 'exclude_input_in_output' = false is not allowed")
        prepend_input = not stream and not exclude
        params = SamplingParams.from_dict(self._sampling_options(request))

        triton_id = request.request_id()
        request_id = f"{next(self._ids)}" + (f"-{triton_id}" if triton_id else "")
        want = frozenset(name for name in _OPTIONAL_OUTPUTS if _bool(request, name))
        state = _Request(request_id, sender, prompt, stream, prepend_input, max(1, params.n), want)
        put = self._queue.put
        self.engine.add_request(request_id, prompt, params, lambda output: put((state, output)))
        put((state, None))   # the sender watches it for cancellation even before its first output

    @staticmethod
    def _sampling_options(request):
        """The request's parameters (HTTP generate: top-level keys and "parameters": {...}),
        overridden by the `sampling_parameters` JSON input (the vLLM backend's way)."""
        options = {}
        try:
            raw = request.parameters()
        except Exception:  # noqa: BLE001 - an older python_backend without parameters()
            raw = ""
        if raw:
            try:
                parsed = json.loads(raw)
            except json.JSONDecodeError as e:
                raise _BadRequest(f"request parameters are not valid JSON: {e}") from None
            if isinstance(parsed, dict):
                options.update(parsed)
        sampling_json = _string(request, "sampling_parameters")
        if sampling_json is not None and sampling_json.strip():
            try:
                parsed = json.loads(sampling_json)
            except json.JSONDecodeError as e:
                raise _BadRequest(f"'sampling_parameters' is not valid JSON: {e}") from None
            if not isinstance(parsed, dict):
                raise _BadRequest("'sampling_parameters' must be a JSON object")
            options.update(parsed)
        return options

    # ---------------------------------------------------------------- responses

    def _send_error(self, sender, message, code):
        try:
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code)), flags=FINAL)
        except Exception as e:  # noqa: BLE001
            self.logger.log_error(f"llm: failed to send an error response: {e}")

    def _sender_loop(self):
        get, get_nowait = self._queue.get, self._queue.get_nowait
        stopping = False
        while not stopping:
            try:
                items = [get(timeout=CANCEL_CHECK_BASE_S)]
            except queue.Empty:
                items = []
            while True:  # take everything waiting: one response per request per round
                try:
                    items.append(get_nowait())
                except queue.Empty:
                    break
            merged = {}  # _Request -> [{sample index: [text pieces]}, last output]
            for item in items:
                if item is None:
                    stopping = True
                    continue
                state, output = item
                if output is None:   # registration (may come after the request's first outputs)
                    if not state.done:
                        self._live.add(state)
                    continue
                entry = merged.get(state)
                if entry is None:
                    entry = merged[state] = [{}, output]
                entry[1] = output
                for s in output.samples:
                    if s.new_text:
                        entry[0].setdefault(s.index, []).append(s.new_text)
            now = time.monotonic()
            live = self._live
            live.update(merged)
            interval = CANCEL_CHECK_BASE_S + CANCEL_CHECK_PER_LIVE_S * len(live)
            for state, (pieces, output) in merged.items():
                try:
                    self._respond(state, pieces, output, now, interval)
                except Exception as e:  # noqa: BLE001 - keep serving the others
                    self.logger.log_error(f"llm: request {state.request_id}: {type(e).__name__}: {e}")
                    if not state.done:
                        state.done = True
                        self._send_error(state.sender, f"internal error: {e}", pb_utils.TritonError.INTERNAL)
                if state.done:
                    live.discard(state)
            self._check_silent_requests(merged, now, interval)
            if self._metrics is not None:
                try:
                    self._record_metrics(merged, now)
                except Exception as e:  # noqa: BLE001 - metrics must never stop the responses
                    self.logger.log_error(f"llm: metrics disabled after an error: {e}")
                    self._metrics = None
            busy = time.monotonic() - now
            if busy > SENDER_BUSY_ROUND_S and not stopping:
                time.sleep(min(busy, SENDER_MAX_REST_S))

    def _record_metrics(self, merged, now):
        metrics = self._metrics
        for state, (_, output) in merged.items():
            if not state.first_token_seen and any(s.token_ids for s in output.samples):
                state.first_token_seen = True
                metrics.observe("time_to_first_token_seconds", now - state.t_start)
            if output.finished and output.error is None:
                metrics.observe("e2e_request_latency_seconds", now - state.t_start)
                metrics.observe("request_prompt_tokens", output.num_prompt_tokens)
                metrics.observe("request_generation_tokens", sum(len(s.token_ids) for s in output.samples))
        metrics.refresh(self.engine.stats(), now)

    def _check_silent_requests(self, merged, now, interval):
        """Requests with no output this round (still waiting for the engine, or between outputs)
        are asked about cancellation too, so a cancelled request does not wait to be scheduled."""
        for state in [s for s in self._live if s not in merged and not s.done]:
            if self._cancel_if_asked(state, now, interval):
                self._live.discard(state)

    def _cancel_if_asked(self, state, now, interval):
        """When a check is due, ask Triton whether the client cancelled; if so abort the request in
        the engine and send its final CANCELLED error. True when it was cancelled."""
        if now < state.next_cancel_check:
            return False
        state.next_cancel_check = now + interval
        if not state.sender.is_cancelled():
            return False
        state.done = True
        self.engine.abort(state.request_id)
        self.logger.log_info(f"llm: request {state.request_id} cancelled by the client: aborted")
        self._send_error(state.sender, "request was cancelled", pb_utils.TritonError.CANCELLED)
        return True

    def _respond(self, state, pieces, output, now, interval):
        if state.done:
            return
        if output.finished:
            state.done = True
        elif self._cancel_if_asked(state, now, interval):
            return
        if output.error:
            self._send_error(state.sender, output.error, pb_utils.TritonError.INTERNAL)
            return
        if output.finished and (not output.samples or any(s.finish_reason == "abort" for s in output.samples)):
            if state.sender.is_cancelled():
                self._send_error(state.sender, "request was cancelled", pb_utils.TritonError.CANCELLED)
            else:
                self._send_error(state.sender, "request was aborted (the server is shutting down)",
                                 pb_utils.TritonError.UNAVAILABLE)
            return
        if state.stream:
            if pieces:
                texts = ["".join(pieces.get(i, ())) for i in range(state.n)]
                state.sender.send(self._response(state, texts, output), flags=FINAL if output.finished else 0)
            elif output.finished:
                if state.want:  # the final counts and finish reasons, with no new text
                    state.sender.send(self._response(state, [""] * state.n, output), flags=FINAL)
                else:
                    state.sender.send(flags=FINAL)
            return
        if output.finished:
            prefix = state.prompt if state.prepend_input else ""
            texts = [prefix + s.text for s in output.samples]
            state.sender.send(self._response(state, texts, output), flags=FINAL)

    def _response(self, state, texts, output):
        tensors = [_strings_tensor("text_output", texts)]
        want = state.want
        if want:
            samples = {s.index: s for s in output.samples}
            indices = range(len(texts))
            if "return_finish_reason" in want:
                tensors.append(_strings_tensor("finish_reason", [
                    (samples[i].finish_reason or "") if i in samples else "" for i in indices]))
            if "return_num_input_tokens" in want:
                tensors.append(pb_utils.Tensor("num_input_tokens",
                                               np.array([output.num_prompt_tokens], dtype=np.uint32)))
            if "return_num_output_tokens" in want:
                counts = []
                for i in indices:
                    total = len(samples[i].token_ids) if i in samples else state.tokens_sent[i]
                    counts.append(total - state.tokens_sent[i])
                    state.tokens_sent[i] = total
                tensors.append(pb_utils.Tensor("num_output_tokens", np.array(counts, dtype=np.uint32)))
            if "return_cumulative_logprob" in want:
                values = [samples[i].cumulative_logprob if i in samples else None for i in indices]
                tensors.append(pb_utils.Tensor("cumulative_logprob", np.array(
                    [math.nan if v is None else v for v in values], dtype=np.float32)))
        return pb_utils.InferenceResponse(output_tensors=tensors)

    # ---------------------------------------------------------------- shutdown

    def finalize(self):
        self.logger.log_info("llm: shutting down")
        try:
            self.engine.shutdown()  # every request still in flight gets a final "abort" output
        finally:
            self._queue.put(None)
            self._sender_thread.join(timeout=30)
            if self._metrics is not None:
                self._metrics.close()
