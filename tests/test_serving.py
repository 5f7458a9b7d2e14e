"""backend/serving.py without tritonserver: request parsing, responses, merging, error kinds, metrics."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from backend import errors
from backend.errors import EngineUnavailable
from backend import serving
from backend.outputs import RequestOutput, SampleOutput
from backend.sampling_params import DELTA, FINAL_ONLY
from backend.serving import BadRequest, ErrorKind, InFlight, MergedOutput, RequestState

PROMPT = "ROMEO:"


def text(value):
    """A STRING input as pb_utils' as_numpy() gives it: an object array of bytes."""
    return np.array([value if isinstance(value, bytes) else value.encode()], dtype=np.object_)


def flag(value):
    return np.array([value])


class FakeSender:
    """Stands for Triton's response sender: only is_cancelled() is asked by serving."""

    def __init__(self, cancelled=False):
        self.cancelled, self.polls = cancelled, 0

    def is_cancelled(self):
        self.polls += 1
        return self.cancelled


def request_state(parameters="", sender=None, t_start=0.0, **inputs):
    inputs = {"text_input": text(PROMPT), **inputs}
    return RequestState("0", sender or FakeSender(), serving.parse_request(inputs, parameters), t_start=t_start)


def output(*samples, finished=False, error=None, num_prompt_tokens=3, error_kind=errors.INTERNAL):
    return RequestOutput("0", PROMPT, num_prompt_tokens, list(samples), finished, error, error_kind)


def sample(new_text, text, num_tokens, index=0, finish_reason=None, cumulative_logprob=None):
    """num_tokens: the sample's output tokens so far (SampleOutput.num_tokens, whatever the output kind)."""
    return SampleOutput(index, new_text, text, list(range(num_tokens)), finish_reason, cumulative_logprob,
                        num_tokens=num_tokens)


def strings(array):
    return [x.decode("utf-8") for x in array]


def replies(state, outputs, now=0.0, interval=1.0):
    """respond() to each output in turn, as rounds with one output each."""
    return [serving.respond(state, MergedOutput(o), now, interval) for o in outputs]


# ------------------------------------------------------------------------------------ parsing

def test_defaults():
    r = serving.parse_request({"text_input": text(PROMPT)})
    assert (r.prompt, r.stream, r.prepend_input, r.n, r.want) == (PROMPT, False, True, 1, frozenset())
    assert (r.params.max_tokens, r.params.temperature) == (16, 1.0)


def test_prompt_alias_and_text_input_first():
    assert serving.parse_request({"prompt": text("alias")}).prompt == "alias"
    # text_input wins; the alias is then never read (not even checked)
    both = {"text_input": text("main"), "prompt": np.array([b"a", b"b"], dtype=np.object_)}
    assert serving.parse_request(both).prompt == "main"
    assert serving.parse_request({"text_input": np.array([["2d"]], dtype=np.object_)}).prompt == "2d"


@pytest.mark.parametrize("inputs, message", [
    ({}, "give the prompt as 'text_input'"),
    ({"sampling_parameters": text("{}")}, "give the prompt as 'text_input'"),
    ({"text_input": np.array([b"a", b"b"], dtype=np.object_)},
     "input 'text_input' must hold exactly one element, got 2"),
    ({"text_input": text(b"\xff\xfe")}, "input 'text_input' is not valid UTF-8"),
    ({"text_input": text(PROMPT), "sampling_parameters": text(b"{\xff}")}, "'sampling_parameters' is not valid UTF-8"),
    ({"text_input": text(PROMPT), "stream": flag(True), "exclude_input_in_output": flag(False)},
     "Error generating stream: When streaming, `exclude_input_in_output` = False is not allowed."),
    ({"text_input": text(PROMPT), "sampling_parameters": text("{not json")}, "'sampling_parameters' is not valid JSON"),
    ({"text_input": text(PROMPT), "sampling_parameters": text("[1]")}, "'sampling_parameters' must be a JSON object"),
    ({"text_input": text(PROMPT), "sampling_parameters": text('{"temperature": "abc"}')},
     "'temperature' must be a finite number, got 'abc'"),
    ({"text_input": text(PROMPT), "sampling_parameters": text('{"presence_penalty": 2.5}')},
     "'presence_penalty' must be in [-2, 2], got 2.5"),
    ({"text_input": text(PROMPT), "sampling_parameters": text('{"logit_bias": {"x": 1}}')},
     "'logit_bias' keys must be token ids, got 'x'"),
    ({"text_input": text(PROMPT), "return_finish_reason": np.array([True, True])},
     "input 'return_finish_reason' must hold exactly one element, got 2"),
])
def test_bad_requests_name_the_field(inputs, message):
    with pytest.raises(BadRequest) as e:
        serving.parse_request(inputs)
    assert message in str(e.value)
    assert isinstance(e.value, ValueError)


def test_bad_request_parameters():
    with pytest.raises(BadRequest, match="request parameters are not valid JSON"):
        serving.parse_request({"text_input": text(PROMPT)}, "{oops")
    with pytest.raises(BadRequest, match="'max_tokens' must be >= 1, got 0"):
        serving.parse_request({"text_input": text(PROMPT)}, '{"max_tokens": 0}')
    # JSON that is not an object carries no sampling parameters: ignored, as before
    assert serving.parse_request({"text_input": text(PROMPT)}, "[1, 2]").params.max_tokens == 16


def test_sampling_parameters_override_request_parameters():
    parameters = json.dumps({"temperature": 0.5, "max_tokens": 7, "seed": 3})
    r = serving.parse_request({"text_input": text(PROMPT), "sampling_parameters": text('{"max_tokens": 3}')},
                              parameters)
    assert (r.params.temperature, r.params.max_tokens, r.params.seed) == (0.5, 3, 3)
    # an empty sampling_parameters input leaves the request parameters alone
    r = serving.parse_request({"text_input": text(PROMPT), "sampling_parameters": text("  ")}, parameters)
    assert r.params.max_tokens == 7


def test_numbers_and_booleans_as_strings():
    r = serving.parse_request({"text_input": text(PROMPT)},
                              '{"max_tokens": "10", "temperature": "0", "ignore_eos": "true", "n": "2", "stop": "\\n"}')
    assert (r.params.max_tokens, r.params.temperature, r.params.ignore_eos, r.n, r.params.stop) == (10, 0.0, True, 2,
                                                                                                     ["\n"])


@pytest.mark.parametrize("stream, exclude, prepend", [
    (None, None, True), (False, False, True), (False, True, False), (True, None, False), (True, True, False)])
def test_stream_and_exclude_input(stream, exclude, prepend):
    inputs = {"text_input": text(PROMPT)}
    if stream is not None:
        inputs["stream"] = flag(stream)
    if exclude is not None:
        inputs["exclude_input_in_output"] = flag(exclude)
    r = serving.parse_request(inputs)
    assert (r.stream, r.prepend_input) == (bool(stream), prepend)


def test_optional_outputs_asked_for():
    r = serving.parse_request({"text_input": text(PROMPT), "return_finish_reason": flag(True),
                               "return_num_output_tokens": flag(True), "return_cumulative_logprob": flag(False)})
    assert r.want == {"return_finish_reason", "return_num_output_tokens"}


def test_engine_request_id_and_submit_errors():
    assert serving.engine_request_id(3, "abc") == "3-abc"
    assert serving.engine_request_id(3, "") == "3"
    cases = [(BadRequest("'n' bad"), ErrorKind.INVALID_ARG, "'n' bad"),
             (ValueError("'text_input' has 9 tokens"), ErrorKind.INVALID_ARG, "'text_input' has 9 tokens"),
             (EngineUnavailable("the engine is shutting down"), ErrorKind.UNAVAILABLE, "the engine is shutting down"),
             (EngineUnavailable("overloaded"), ErrorKind.UNAVAILABLE, "overloaded"),
             (RuntimeError("a bug"), ErrorKind.INTERNAL, "RuntimeError: a bug"),
             (KeyError("x"), ErrorKind.INTERNAL, "KeyError: 'x'")]
    for error, kind, message in cases:
        reply = serving.submit_error(error)
        assert (reply.error, reply.message, reply.final, reply.abort) == (kind, message, True, False)


def test_error_kinds_are_named_as_triton_error_codes():
    # the glue sends getattr(pb_utils.TritonError, kind.name)
    assert {k.name for k in ErrorKind} <= {"INVALID_ARG", "UNAVAILABLE", "INTERNAL", "CANCELLED", "NOT_FOUND",
                                           "UNSUPPORTED", "UNKNOWN", "ALREADY_EXISTS"}


def test_serving_needs_neither_triton_nor_torch():
    code = ("import sys, backend.serving; bad = {'torch', 'triton_python_backend_utils'} & set(sys.modules); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=serving.__file__.rsplit("/backend/", 1)[0])


# ------------------------------------------------------------------------------------ responses

def test_non_streaming_sends_once_at_the_end():
    state = request_state()
    got = replies(state, [output(sample(" a", " a", 1)),
                          output(sample(" b", " a b", 2, finish_reason="length"), finished=True)])
    assert got[0] is None
    final = got[1]
    assert final.final and final.error is None
    assert list(final.outputs) == ["text_output"]
    assert strings(final.outputs["text_output"]) == [PROMPT + " a b"]   # prompt prepended by default
    assert state.done
    assert serving.respond(state, MergedOutput(output(finished=True)), 0.0, 1.0) is None   # done: nothing more


def test_non_streaming_without_the_prompt_and_n_samples():
    state = request_state('{"n": 2}', exclude_input_in_output=flag(True))
    final = serving.respond(state, MergedOutput(output(sample("", "x", 1, 0, "stop"), sample("", "yz", 2, 1, "length"),
                                                       finished=True)), 0.0, 1.0)
    assert strings(final.outputs["text_output"]) == ["x", "yz"]


def test_streaming_sends_deltas_and_a_final_flag():
    state = request_state(stream=flag(True))
    got = replies(state, [output(sample(" a", " a", 1)), output(sample("", " a", 2)),
                          output(sample(" b", " a b", 3, finish_reason="stop"), finished=True)])
    assert strings(got[0].outputs["text_output"]) == [" a"] and not got[0].final
    assert got[1] is None   # no new text (held back by the detokenizer): nothing to send
    assert strings(got[2].outputs["text_output"]) == [" b"] and got[2].final


def test_streaming_final_without_new_text():
    state = request_state(stream=flag(True))
    final = replies(state, [output(sample("", "x", 1, finish_reason="stop"), finished=True)])[0]
    assert final == serving.Reply(final=True)   # an empty final response
    state = request_state(stream=flag(True), return_finish_reason=flag(True))
    final = replies(state, [output(sample("", "x", 1, finish_reason="stop"), finished=True)])[0]
    assert final.final and strings(final.outputs["text_output"]) == [""]
    assert strings(final.outputs["finish_reason"]) == ["stop"]


def test_merged_outputs_make_one_response():
    state = request_state('{"n": 2}', stream=flag(True), return_num_output_tokens=flag(True))
    first = serving.respond(state, MergedOutput(output(sample("a", "a", 1, 0), sample("b", "b", 1, 1))), 0.0, 1.0)
    assert strings(first.outputs["text_output"]) == ["a", "b"]
    assert first.outputs["num_output_tokens"].tolist() == [1, 1]
    merged = MergedOutput(output(sample("c", "ac", 2, 0), sample("", "b", 2, 1)))
    merged.add(output(sample("d", "acd", 3, 0), sample("e", "be", 3, 1)))
    merged.add(output(sample("", "acd", 4, 0), sample("f", "bef", 5, 1)))
    second = serving.respond(state, merged, 0.0, 1.0)
    assert strings(second.outputs["text_output"]) == ["cd", "ef"]
    assert second.outputs["num_output_tokens"].tolist() == [3, 4]   # counted against the latest output
    assert not second.final


def test_optional_outputs_streaming():
    state = request_state('{"n": 2}', stream=flag(True), return_finish_reason=flag(True),
                          return_num_input_tokens=flag(True), return_num_output_tokens=flag(True),
                          return_cumulative_logprob=flag(True))
    got = replies(state, [
        output(sample("a", "a", 1, 0, cumulative_logprob=-0.5), sample("b", "b", 1, 1, cumulative_logprob=-1.0),
               num_prompt_tokens=4),
        output(sample("c", "ac", 3, 0, "length", -2.0), sample("", "b", 2, 1, "stop", -1.5), finished=True,
               num_prompt_tokens=4)])
    first, last = (r.outputs for r in got)
    assert list(first) == ["text_output", "finish_reason", "num_input_tokens", "num_output_tokens",
                           "cumulative_logprob"]
    assert strings(first["finish_reason"]) == ["None", "None"]   # the vLLM backend's string until the end
    assert strings(last["finish_reason"]) == ["length", "stop"]
    assert first["num_input_tokens"].dtype == np.uint32 and first["num_input_tokens"].tolist() == [4]
    assert last["num_output_tokens"].dtype == np.uint32
    assert [first["num_output_tokens"].tolist(), last["num_output_tokens"].tolist()] == [[1, 1], [2, 1]]
    assert last["cumulative_logprob"].dtype == np.float32 and last["cumulative_logprob"].tolist() == [-2.0, -1.5]
    assert strings(last["text_output"]) == ["c", ""]


def test_optional_outputs_non_streaming_and_missing_values():
    state = request_state(return_num_output_tokens=flag(True), return_cumulative_logprob=flag(True),
                          return_finish_reason=flag(True))
    final = replies(state, [output(sample(" a", " a", 1)), output(sample(" b", " a b", 2), finished=True)])[1]
    assert final.outputs["num_output_tokens"].tolist() == [2]
    assert math.isnan(final.outputs["cumulative_logprob"][0])   # missing from the output: NaN
    assert strings(final.outputs["finish_reason"]) == ["None"]   # a finished request without a reason


def logprob_maps(tokens):
    return [{t: {"logprob": -0.5 * t, "rank": 1, "decoded_token": f"<{t}>"}} for t in tokens]


def test_logprobs_output_streaming_one_map_per_token_of_the_response():
    state = request_state('{"logprobs": 1}', stream=flag(True), return_logprobs=flag(True))
    assert state.request.params.logprobs == 1
    assert state.request.params.output_kind == DELTA   # each output brings only its new maps
    first, last = replies(state, [output(SampleOutput(0, "a", "a", [1], logprobs=logprob_maps([1]), num_tokens=1)),
                                  output(SampleOutput(0, "bc", "bc", [2, 3], "length", logprobs=logprob_maps([2, 3]),
                                                      num_tokens=3), finished=True)])
    assert json.loads(strings(first.outputs["logprobs"])[0]) == [{"1": {"logprob": -0.5, "rank": 1, "decoded_token": "<1>"}}]
    assert [list(m) for m in json.loads(strings(last.outputs["logprobs"])[0])] == [["2"], ["3"]]


def test_logprobs_of_a_round_without_text_go_out_with_the_next_response():
    """A token that adds no text yet (half a character) sends no response; its map must not be lost."""
    state = request_state('{"logprobs": 0}', stream=flag(True), return_logprobs=flag(True),
                          return_num_output_tokens=flag(True))
    silent, first, last = replies(state, [
        output(SampleOutput(0, "", "", [1], logprobs=logprob_maps([1]), num_tokens=1)),
        output(SampleOutput(0, "é", "é", [2], logprobs=logprob_maps([2]), num_tokens=2)),
        output(SampleOutput(0, "", "", [3], "length", logprobs=logprob_maps([3]), num_tokens=3), finished=True)])
    assert silent is None
    assert [list(m) for m in json.loads(strings(first.outputs["logprobs"])[0])] == [["1"], ["2"]]
    assert first.outputs["num_output_tokens"].tolist() == [2]
    assert [list(m) for m in json.loads(strings(last.outputs["logprobs"])[0])] == [["3"]] and last.final


def test_logprobs_output_non_streaming_all_tokens_and_null_when_not_asked():
    state = request_state('{"logprobs": 0}', return_logprobs=flag(True))
    assert state.request.params.output_kind == FINAL_ONLY   # one output, with every map
    final = replies(state, [output(SampleOutput(0, "ab", "ab", [4, 5], "stop", logprobs=logprob_maps([4, 5]),
                                                num_tokens=2), finished=True)])[0]
    assert [list(m) for m in json.loads(strings(final.outputs["logprobs"])[0])] == [["4"], ["5"]]
    plain = request_state(return_logprobs=flag(True))
    final = replies(plain, [output(sample("a", "a", 1, finish_reason="stop"), finished=True)])[0]
    assert strings(final.outputs["logprobs"]) == ["null"]


def test_return_cumulative_logprob_asks_the_engine_for_it():
    assert request_state(return_cumulative_logprob=flag(True)).request.params.wants_logprob
    assert not request_state().request.params.wants_logprob


def test_beam_search_running_outputs_have_no_samples():
    state = request_state('{"use_beam_search": true, "n": 2, "temperature": 0}', stream=flag(True),
                          return_num_output_tokens=flag(True))
    assert replies(state, [output()])[0] is None   # beams are reordered every step: nothing until the end
    final = replies(state, [output(sample("xy", "xy", 2, 0, "length"), sample("zw", "zw", 2, 1, "length"),
                                   finished=True)])[0]
    assert strings(final.outputs["text_output"]) == ["xy", "zw"]
    assert final.outputs["num_output_tokens"].tolist() == [2, 2]


# ------------------------------------------------------------------------------------ errors and cancellation

def test_engine_error_is_internal():
    state = request_state()
    reply = replies(state, [output(finished=True, error="tensor-parallel worker 1 exited")])[0]
    assert (reply.error, reply.message, reply.final, reply.abort) == (
        ErrorKind.INTERNAL, "tensor-parallel worker 1 exited", True, False)


def test_timeouts_and_overload_after_submission_are_unavailable():
    state = request_state()
    reply = replies(state, [output(finished=True, error="the request's timeout expired", error_kind=errors.UNAVAILABLE)])[0]
    assert (reply.error, reply.message, reply.final) == (ErrorKind.UNAVAILABLE, "the request's timeout expired", True)


def test_aborted_by_shutdown_is_unavailable():
    for aborted in (output(sample("", "x", 1, finish_reason="abort"), finished=True), output(finished=True)):
        reply = replies(request_state(stream=flag(True)), [aborted])[0]
        assert (reply.error, reply.message, reply.abort) == (ErrorKind.UNAVAILABLE, serving.SHUTDOWN_MESSAGE, False)


def test_aborted_after_the_client_left_is_cancelled():
    state = request_state(sender=FakeSender(cancelled=True))
    reply = replies(state, [output(sample("", "x", 1, finish_reason="abort"), finished=True)])[0]
    assert (reply.error, reply.message, reply.abort) == (ErrorKind.CANCELLED, serving.CANCELLED_MESSAGE, False)


def test_cancelled_mid_flight_aborts_when_a_check_is_due():
    sender = FakeSender()
    state = request_state(sender=sender, stream=flag(True))
    assert replies(state, [output(sample("a", "a", 1))], now=1.0, interval=0.1)[0].outputs is not None
    assert sender.polls == 1 and state.next_cancel_check == pytest.approx(1.1)
    sender.cancelled = True
    not_due = replies(state, [output(sample("b", "ab", 2))], now=1.05, interval=0.1)[0]
    assert strings(not_due.outputs["text_output"]) == ["b"] and sender.polls == 1   # not asked before it is due
    reply = replies(state, [output(sample("c", "abc", 3))], now=1.2, interval=0.1)[0]
    assert reply is serving.CANCEL_REPLY and reply.abort and reply.error is ErrorKind.CANCELLED
    assert state.done
    assert replies(state, [output(sample("d", "abcd", 4), finished=True)])[0] is None


def test_finished_output_is_sent_even_when_cancelled():
    state = request_state(sender=FakeSender(cancelled=True))
    reply = replies(state, [output(sample("", "x", 1, finish_reason="stop"), finished=True)])[0]
    assert reply.error is None and reply.final


# ------------------------------------------------------------------------------------ in flight

def test_in_flight_merges_a_round():
    a, b, c = request_state(), request_state(stream=flag(True)), request_state()
    c.done = True
    in_flight = InFlight()
    merged, stopping = in_flight.take([
        (a, None), (b, output(sample("x", "x", 1))), (b, output(sample("", "x", 2))), (c, None),
        (b, output(sample("y", "xy", 3))), (b, None)])
    assert not stopping
    assert list(merged) == [b]
    assert merged[b].pieces == {0: ["x", "y"]} and merged[b].output.samples[0].text == "xy"
    assert in_flight.live == {a, b}   # registered, or with outputs; a request already done is not watched
    _, stopping = in_flight.take([None])
    assert stopping
    assert in_flight.cancel_check_interval() == pytest.approx(serving.CANCEL_CHECK_BASE_S +
                                                             2 * serving.CANCEL_CHECK_PER_LIVE_S)


def test_in_flight_cancels_silent_requests_and_forgets_done_ones():
    waiting, talking, gone = (request_state(sender=FakeSender(cancelled=True)) for _ in range(3))
    in_flight = InFlight()
    merged, _ = in_flight.take([(waiting, None), (gone, None), (talking, output(sample("a", "a", 1)))])
    gone.next_cancel_check = 10.0
    assert in_flight.cancelled_silent(merged, now=1.0, interval=0.1) == [waiting]
    assert waiting.done and in_flight.live == {talking, gone}
    assert talking.sender.polls == 0   # it had output: respond() asks instead
    talking.done = True
    in_flight.forget_done(merged)
    assert in_flight.live == {gone}


def test_sender_rest():
    assert serving.sender_rest(0.001, stopping=False) == 0.0
    assert serving.sender_rest(0.01, stopping=False) == 0.01
    assert serving.sender_rest(1.0, stopping=False) == serving.SENDER_MAX_REST_S
    assert serving.sender_rest(0.01, stopping=True) == 0.0


# ------------------------------------------------------------------------------------ metrics

def test_metrics_observations():
    state = request_state('{"n": 2, "max_tokens": 7}', t_start=10.0)
    book = serving.MetricsBook()
    assert book.observations(state, output(), now=10.5) == []   # no token yet
    assert book.observations(state, output(sample("a", "a", 1, 0), sample("", "", 0, 1)), now=11.0) == [
        ("time_to_first_token_seconds", 1.0)]
    assert book.observations(state, output(sample("b", "ab", 2, 0), sample("", "", 0, 1)), now=11.5) == [
        ("time_per_output_token_seconds", 0.5)]
    done = output(sample("c", "abc", 3, 0, "stop"), sample("d", "d", 1, 1, "length"), finished=True,
                  num_prompt_tokens=5)
    done.first_scheduled_time = 10.25
    assert book.observations(state, done, now=13.0) == [
        ("time_per_output_token_seconds", 0.75),   # 2 more tokens in 1.5 s
        ("e2e_request_latency_seconds", 3.0), ("request_prompt_tokens", 5), ("request_generation_tokens", 4),
        ("request_params_n", 2), ("request_params_max_tokens", 7),
        ("request_queue_time_seconds", 0.25), ("request_prefill_time_seconds", 0.75),
        ("request_decode_time_seconds", 2.0), ("request_inference_time_seconds", 2.75)]
    assert book.successes(done) == [("request_success_total", "stop"), ("request_success_total", "length")]
    failed = request_state(t_start=0.0)
    failed_output = output(sample("a", "a", 1), finished=True, error="boom")
    assert book.observations(failed, failed_output, now=1.0) == [
        ("time_to_first_token_seconds", 1.0)]   # a failed request has no latency or token counts
    assert book.successes(failed_output) == []
    assert set(book.HISTOGRAMS) | set(book.LABELED_COUNTERS) >= {
        "time_per_output_token_seconds", "request_params_n", "request_params_max_tokens", "request_success_total",
        "request_queue_time_seconds", "request_prefill_time_seconds", "request_decode_time_seconds",
        "request_inference_time_seconds"}


def test_metrics_counter_deltas_and_refresh():
    book = serving.MetricsBook()
    stats = {"prompt_tokens_total": 10, "generation_tokens_total": 4, "num_preemptions_total": 0,
             "prefix_cache_queries": 2, "prefix_cache_hits": 0, "num_requests_running": 1,
             "num_requests_waiting": 0, "kv_cache_usage_perc": 0.1, "request_rejected_total": 0,
             "engine_loop_seconds_total": 0.5, "engine_loop_cpu_seconds_total": 0.25, "engine_gpu_wait_seconds_total": 0,
             "response_sender_cpu_seconds_total": 0}
    assert book.refresh_due(0.0) and not book.refresh_due(0.4) and book.refresh_due(0.5)
    assert book.refresh_due(0.6, force=True)   # a final response is about to go out
    assert book.counter_increments(stats) == {"prompt_tokens_total": 10, "generation_tokens_total": 4,
                                              "prefix_cache_queries": 2, "engine_loop_seconds_total": 0.5,
                                              "engine_loop_cpu_seconds_total": 0.25}
    assert book.counter_increments(stats) == {}
    assert book.counter_increments(dict(stats, generation_tokens_total=9)) == {"generation_tokens_total": 5}
    assert set(book.GAUGES) <= set(stats)


def test_metrics_step_observations():
    book = serving.MetricsBook()
    assert book.step_observations([(300, 0.012), (1, 0.002)]) == [
        ("iteration_tokens_total", 300), ("step_duration_seconds", 0.012),
        ("iteration_tokens_total", 1), ("step_duration_seconds", 0.002)]
    assert set(book.STEP_HISTOGRAMS).isdisjoint(book.HISTOGRAMS)


def test_timeout_parameter_in_microseconds():
    assert serving.timeout_parameter_s("") is None
    assert serving.timeout_parameter_s('{"max_tokens": 3}') is None
    assert serving.timeout_parameter_s('{"timeout": 250000, "max_tokens": 3}') == 0.25
    for bad in ('{"timeout": -1}', '{"timeout": "soon"}', '{"timeout": 1.5}', '{"timeout": true}'):
        with pytest.raises(BadRequest, match="'timeout'"):
            serving.timeout_parameter_s(bad)


def test_request_timeout_from_triton_or_the_parameters():
    class Request:
        def __init__(self, micros):
            self.micros = micros

        def timeout(self):
            return self.micros
    assert serving.request_timeout_s(Request(2_000_000), '{"timeout": 5}') == 2.0
    assert serving.request_timeout_s(Request(0), '{"timeout": 500000}') == 0.5
    assert serving.request_timeout_s(object(), "") is None   # an older python_backend: no timeout()
