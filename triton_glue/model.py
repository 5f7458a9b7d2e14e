"""Triton Python-backend glue for the LLM engine (decoupled: one request, many responses).

Two model.py files load this class: model_repository/llm/1/model.py (backend "python", engine
settings as config.pbtxt parameters) and the Python-based backend `vllm` that tools/serve.py
installs (the same model.py copied: repositories written for Triton's vLLM backend, engine
arguments in <model>/<version>/model.json). Inputs and outputs follow Triton's vLLM backend
(backend/io_spec.py); auto_complete_config declares them where config.pbtxt does not.

The logic lives in the package `backend` (serving.py: parsing, responses, merging, metrics); this file moves data to and from pb_utils:
execute() reads each request's tensors and hands it to a submit thread (parse, tokenize, add to the
engine); the engine thread puts outputs on a queue; the sender thread sends what serving.respond()
decides (a request's queued outputs merged into one response) and polls cancellation; finalize()
stops the engine (requests in flight get a final output) and drains the sender.
"""
import itertools
import json
import os
import queue
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import triton_python_backend_utils as pb_utils

from backend import io_spec, serving   # the same checkout as triton_glue (model.py's loader saw to it)
from backend.config import engine_config_for_model
from backend.engine import LLMEngine

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
SUBMIT_THREADS = 4   # parsing and tokenizing (the tokenizer lets go of the GIL meanwhile)
# A broken engine (a tensor-parallel worker or the GPU gone) fails what is in flight; this long
# after, the stub exits so that the launcher restarts the server (Triton 2.51 has no readiness hook).
EXIT_AFTER_BROKEN_S = 1.0


class _Metrics:
    """vLLM's metric names on Triton's metrics endpoint (:8002/metrics); serving.MetricsBook
    decides what to record."""

    def __init__(self, labels):
        self.book = book = serving.MetricsBook()
        kinds = {**dict.fromkeys(book.COUNTERS, pb_utils.MetricFamily.COUNTER),
                 **dict.fromkeys(book.GAUGES, pb_utils.MetricFamily.GAUGE),
                 **dict.fromkeys({**book.HISTOGRAMS, **book.STEP_HISTOGRAMS}, pb_utils.MetricFamily.HISTOGRAM)}
        self.metrics, self.families = {}, []   # a Metric works only while its MetricFamily lives
        for name, kind in kinds.items():
            family = self._family(name, kind)
            buckets = book.HISTOGRAMS.get(name) or book.STEP_HISTOGRAMS.get(name)
            self.metrics[name] = family.Metric(labels=labels, **({"buckets": buckets} if buckets else {}))
        for name, (label, values) in book.LABELED_COUNTERS.items():
            family = self._family(name, pb_utils.MetricFamily.COUNTER)
            for value in values:
                self.metrics[name, value] = family.Metric(labels={**labels, label: value})

    def _family(self, name, kind):
        family = pb_utils.MetricFamily(name=f"vllm:{name}", description=name.replace("_", " "), kind=kind)
        self.families.append(family)
        return family

    def record(self, merged, now, engine, sender_cpu_s):
        """Before the round's responses go out: a scrape after a final response sees all of it."""
        finished = False
        for state, entry in merged.items():
            for name, value in self.book.observations(state, entry.output, now):
                self.metrics[name].observe(value)
            for key in self.book.successes(entry.output):
                self.metrics[key].increment(1)
            finished = finished or entry.output.finished
        if self.book.refresh_due(now, force=finished):
            stats = {**engine.stats(), "response_sender_cpu_seconds_total": sender_cpu_s}
            for name, delta in self.book.counter_increments(stats).items():
                self.metrics[name].increment(delta)
            for name in self.book.GAUGES:
                self.metrics[name].set(stats[name])
            for name, value in self.book.step_observations(engine.take_step_samples()):
                self.metrics[name].observe(value)

    def close(self):
        self.metrics.clear()    # Metric objects first, then their families (Triton requires this order)
        self.families.clear()


class TritonPythonModel:
    @staticmethod
    def auto_complete_config(auto_complete_model_config):
        """Declare what the model's config.pbtxt leaves out: the tensors of backend/io_spec.py (those
        it declares stay as they are), no Triton batching (the engine batches) and the decoupled
        policy (one request, many responses). A bare `backend: "vllm"` config.pbtxt then loads."""
        config = auto_complete_model_config.as_dict()
        inputs = {t["name"] for t in config.get("input", [])}
        outputs = {t["name"] for t in config.get("output", [])}
        for tensor in io_spec.input_configs():
            if tensor["name"] not in inputs:
                auto_complete_model_config.add_input(tensor)
        for tensor in io_spec.output_configs():
            if tensor["name"] not in outputs:
                auto_complete_model_config.add_output(tensor)
        auto_complete_model_config.set_max_batch_size(0)
        auto_complete_model_config.set_model_transaction_policy({"decoupled": True})
        return auto_complete_model_config

    def initialize(self, args):
        self.logger = pb_utils.Logger
        model_config = json.loads(args["model_config"])
        # Raises ValueError naming the bad parameter or engine argument: the model then fails to load
        # with that message (and tritonserver exits).
        config = engine_config_for_model(model_config, args["model_repository"], args["model_version"],
                                         warn=lambda message: self.logger.log_warn(f"llm: {message}"))
        if args.get("model_instance_kind") == "GPU" and config.device == "auto":
            # instance_group KIND_GPU: one engine per instance, on the GPU Triton gave it (data parallel).
            config.device = f"cuda:{args['model_instance_device_id']}"
        self.engine = LLMEngine(config)
        sys.setswitchinterval(serving.GIL_SWITCH_INTERVAL_S)
        self._ids = itertools.count()
        self._queue = queue.SimpleQueue()
        self._submitter = ThreadPoolExecutor(SUBMIT_THREADS, thread_name_prefix="llm-submit")
        try:
            self._metrics = _Metrics({"model": args["model_name"], "version": args["model_version"]})
        except Exception as e:  # noqa: BLE001 - metrics off (--allow-metrics=false) or unsupported
            self.logger.log_info(f"llm: no vLLM-style metrics ({e})")
            self._metrics = None
        self._sender_thread = threading.Thread(target=self._sender_loop, name="llm-response-sender", daemon=True)
        self._sender_thread.start()
        try:
            self.engine.start()
        except Exception:
            self._queue.put(None)
            self._sender_thread.join(timeout=10)
            raise
        engine_code = os.path.dirname(serving.__file__)
        self.logger.log_info(f"llm: engine started (model {config.model}, engine code {engine_code})")

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:   # read the tensors here, while the request is certainly alive; the rest off this thread
                inputs = {name: tensor.as_numpy() for name in serving.INPUT_NAMES
                          if (tensor := pb_utils.get_input_tensor_by_name(request, name)) is not None}
                parameters = serving.request_parameters(request)
                work = (sender, inputs, parameters, request.request_id(), serving.request_timeout_s(request, parameters))
            except Exception as e:  # noqa: BLE001 - a bad request (or a bug) fails the request, not the model
                self._send(sender, serving.submit_error(e))
                continue
            self._submitter.submit(self._submit, *work)
        return None

    def _submit(self, sender, inputs, parameters, triton_id, timeout_s):
        try:
            parsed = serving.parse_request(inputs, parameters)
            request_id = serving.engine_request_id(next(self._ids), triton_id)
            state = serving.RequestState(request_id, sender, parsed)
            put = self._queue.put
            self.engine.add_request(request_id, parsed.prompt, parsed.params, lambda output: put((state, output)),
                                    timeout_s=timeout_s)
            put((state, None))   # the sender watches it for cancellation even before its first output
        except Exception as e:  # noqa: BLE001 - a bad request (or a bug) fails the request, not the model
            self._send(sender, serving.submit_error(e))

    def _send(self, sender, reply):
        if reply.error is not None:
            error = pb_utils.TritonError(reply.message, getattr(pb_utils.TritonError, reply.error.name))
            try:
                sender.send(pb_utils.InferenceResponse(error=error), flags=FINAL)
            except Exception as e:  # noqa: BLE001
                self.logger.log_error(f"llm: failed to send an error response: {e}")
        elif reply.outputs is None:
            sender.send(flags=FINAL)
        else:
            tensors = [pb_utils.Tensor(name, array) for name, array in reply.outputs.items()]
            sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=FINAL if reply.final else 0)

    def _reply(self, state, reply):
        if reply.abort:
            self.engine.abort(state.request_id)
            self.logger.log_info(f"llm: request {state.request_id} cancelled by the client: aborted")
        self._send(state.sender, reply)

    def _take_queued(self):
        """What waits on the queue (after up to one cancel-check period for the first item)."""
        try:
            items = [self._queue.get(timeout=serving.CANCEL_CHECK_BASE_S)]
        except queue.Empty:
            return []
        while True:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                return items

    def _sender_loop(self):
        in_flight, stopping, broken_since = serving.InFlight(), False, None
        cpu_s, cpu_start = 0.0, time.thread_time()
        while not stopping:
            if not self.engine.healthy:
                broken_since = broken_since or time.monotonic()
                if time.monotonic() - broken_since > EXIT_AFTER_BROKEN_S:
                    self.logger.log_error("llm: the engine is broken; exiting so that the server is restarted")
                    os._exit(1)
            merged, stopping = in_flight.take(self._take_queued())   # one response per request per round
            now = time.monotonic()
            cpu_s, cpu_start = cpu_s + time.thread_time() - cpu_start, time.thread_time()
            interval = in_flight.cancel_check_interval()
            if self._metrics is not None:
                try:
                    self._metrics.record(merged, now, self.engine, cpu_s)
                except Exception as e:  # noqa: BLE001 - metrics must never stop the responses
                    self.logger.log_error(f"llm: metrics disabled after an error: {e}")
                    self._metrics = None
            for state, entry in merged.items():
                try:
                    reply = serving.respond(state, entry, now, interval)
                    if reply is not None:
                        self._reply(state, reply)
                except Exception as e:  # noqa: BLE001 - keep serving the others
                    self.logger.log_error(f"llm: request {state.request_id}: {type(e).__name__}: {e}")
                    if not state.done:
                        state.done = True
                        self._send(state.sender, serving.Reply.failure(serving.ErrorKind.INTERNAL,
                                                                       f"internal error: {e}"))
            in_flight.forget_done(merged)
            for state in in_flight.cancelled_silent(merged, now, interval):
                self._reply(state, serving.CANCEL_REPLY)
            rest = serving.sender_rest(time.monotonic() - now, stopping)
            if rest:
                time.sleep(rest)

    def finalize(self):
        self.logger.log_info("llm: shutting down")
        try:
            self.engine.shutdown()  # every request still in flight gets a final "abort" output
            self._submitter.shutdown(wait=True)   # submissions still queued are refused (shutting down)
        finally:
            self._queue.put(None)
            self._sender_thread.join(timeout=30)
            if self._metrics is not None:
                self._metrics.close()
