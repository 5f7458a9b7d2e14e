"""End-to-end tests against a real tritonserver (HTTP generate / generate_stream, gRPC streaming)."""
import functools
import json
import os
import queue
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from .conftest import serve_tiny_model
from .harness import MODEL_NAME, REPO, Server, grpc_input, make_model_repository

PROMPT = "The capital of France is"
HTTP_TIMEOUT = 60


@pytest.fixture(scope="module", params=["core-in-stub", "core-process"])
def server(request, tmp_path_factory, tiny_model):
    """Every test here runs against both layouts: the engine core in the stub's process, and in a
    process of its own (engine_core_process)."""
    extra = {"engine_core_process": "true"} if request.param == "core-process" else {}
    yield from serve_tiny_model(tmp_path_factory.mktemp(request.param), tiny_model, **extra)


class Reply:
    """status_code, text and json() of a finished HTTP response. (A requests.Response that stays
    referenced keeps its connection open, and open connections hold up the server's shutdown.)"""

    def __init__(self, response):
        self.status_code, self.text = response.status_code, response.text

    def json(self):
        return json.loads(self.text)


def generate(server, body, stream=False):
    """POST to generate (a Reply) or generate_stream (a streaming requests.Response for sse_events)."""
    url = f"{server.http_url}/v2/models/{MODEL_NAME}/{'generate_stream' if stream else 'generate'}"
    response = requests.post(url, json=body, timeout=HTTP_TIMEOUT, stream=stream)
    if stream:
        return response
    with response:
        return Reply(response)


def sse_events(response):
    """The JSON objects of a generate_stream response (one per `data:` line)."""
    events = []
    with response:  # closed at the end: an open connection holds up the server's shutdown
        for line in response.iter_lines(decode_unicode=False):
            if line.startswith(b"data:"):
                events.append(json.loads(line[len(b"data:"):].decode("utf-8")))
    return events


def greedy(prompt, max_tokens=16, **extra):
    return {"text_input": prompt, "exclude_input_in_output": True,
            "parameters": {"temperature": 0, "max_tokens": max_tokens, **extra}}


def grpc_stream(server, prompt, sampling, cancel_after=None, request_id="1", on_response=None):
    """Stream one request over gRPC; returns (list of text deltas, error or None, final seen).
    on_response(time.monotonic()) is called as each response arrives."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc_url)
    results = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))

    tensor = grpc_input
    inputs = [tensor("text_input", np.array([prompt.encode()], dtype=np.object_), "BYTES"),
              tensor("stream", np.array([True]), "BOOL"),
              tensor("exclude_input_in_output", np.array([True]), "BOOL"),
              tensor("sampling_parameters", np.array([json.dumps(sampling).encode()], dtype=np.object_), "BYTES")]
    deltas, error, final = [], None, False
    try:
        client.async_stream_infer(MODEL_NAME, inputs, request_id=request_id, enable_empty_final_response=True)
        while True:
            result, err = results.get(timeout=HTTP_TIMEOUT)
            if on_response is not None:
                on_response(time.monotonic())
            if err is not None:
                error = err
                break
            response = result.get_response()
            out = result.as_numpy("text_output")
            if out is not None:
                deltas.extend(x.decode("utf-8") for x in out.reshape(-1))
            if response.parameters["triton_final_response"].bool_param:
                final = True
                break
            if cancel_after is not None and len(deltas) >= cancel_after:
                client.stop_stream(cancel_requests=True)
                try:  # the cancelled request's last word, if it comes
                    result, err = results.get(timeout=2)
                    error = err
                except queue.Empty:
                    pass
                break
    finally:
        client.stop_stream()
        client.close()
    return deltas, error, final


# ------------------------------------------------------------------------------ HTTP generate

def test_generate_greedy(server):
    r = generate(server, {"text_input": PROMPT, "parameters": {"temperature": 0, "max_tokens": 16}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_name"] == MODEL_NAME
    text = body["text_output"]
    assert text.startswith(PROMPT) and len(text) > len(PROMPT)  # prompt prepended by default
    again = generate(server, {"text_input": PROMPT, "parameters": {"temperature": 0, "max_tokens": 16}})
    assert again.json()["text_output"] == text  # greedy is deterministic

    r = generate(server, greedy(PROMPT))
    assert r.status_code == 200, r.text
    assert PROMPT + r.json()["text_output"] == text


def test_generate_extra_outputs(server):
    body = greedy(PROMPT, max_tokens=12, ignore_eos=True)
    body.update(return_finish_reason=True, return_num_input_tokens=True, return_num_output_tokens=True)
    r = generate(server, body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["finish_reason"] == "length"
    assert out["num_output_tokens"] == 12
    assert out["num_input_tokens"] > 0


def test_generate_stream_matches_generate(server):
    whole = generate(server, greedy(PROMPT, max_tokens=24)).json()["text_output"]
    body = greedy(PROMPT, max_tokens=24)
    body.update(stream=True, return_finish_reason=True, return_num_output_tokens=True)
    r = generate(server, body, stream=True)
    assert r.status_code == 200
    events = sse_events(r)
    assert events and not any("error" in e for e in events), events
    assert "".join(e["text_output"] for e in events) == whole
    assert events[-1]["finish_reason"] in ("stop", "length")
    assert all(e["finish_reason"] == "None" for e in events[:-1])   # as Triton's vLLM backend
    assert sum(e["num_output_tokens"] for e in events) >= 1


def test_generate_logprobs_and_cumulative_logprob(server):
    body = greedy(PROMPT, max_tokens=5, ignore_eos=True, logprobs=2)
    body.update(return_logprobs=True, return_cumulative_logprob=True, return_num_output_tokens=True)
    out = generate(server, body).json()
    logprobs = json.loads(out["logprobs"])
    assert len(logprobs) == out["num_output_tokens"] == 5
    for entry in logprobs:   # the greedy token (rank 1) and the two most likely: two or three entries
        assert 2 <= len(entry) <= 3 and min(v["rank"] for v in entry.values()) == 1
        assert all(v["logprob"] <= 0 and isinstance(v["decoded_token"], str) for v in entry.values())
    chosen = [max(entry.values(), key=lambda v: v["logprob"])["logprob"] for entry in logprobs]
    assert out["cumulative_logprob"] == pytest.approx(sum(chosen), abs=1e-3)
    events = sse_events(generate(server, dict(body, stream=True), stream=True))
    streamed = [m for e in events for m in json.loads(e["logprobs"])]
    assert streamed == logprobs
    plain = generate(server, dict(greedy(PROMPT, max_tokens=2), return_logprobs=True)).json()
    assert plain["logprobs"] == "null"


def test_generate_stream_without_stream_flag_gives_one_response(server):
    r = generate(server, greedy(PROMPT, max_tokens=8), stream=True)
    events = sse_events(r)
    assert len(events) == 1 and "text_output" in events[0], events


def test_sampling_parameters_tensor(server):
    """The vLLM backend's way: sampling parameters as one JSON string input."""
    sampling = json.dumps({"temperature": 0, "max_tokens": 10, "ignore_eos": True})
    r = generate(server, {"text_input": PROMPT, "sampling_parameters": sampling,
                          "exclude_input_in_output": True, "return_num_output_tokens": True})
    assert r.status_code == 200, r.text
    assert r.json()["num_output_tokens"] == 10
    assert r.json()["text_output"] == generate(server, greedy(PROMPT, max_tokens=10, ignore_eos=True)).json()[
        "text_output"]


def test_stop_strings(server):
    whole = generate(server, greedy(PROMPT, max_tokens=30, ignore_eos=True)).json()["text_output"]
    stop = whole[5:8]
    cut = whole[:whole.find(stop)]
    r = generate(server, {"text_input": PROMPT, "exclude_input_in_output": True,
                          "sampling_parameters": json.dumps({"temperature": 0, "max_tokens": 30, "stop": [stop]}),
                          "return_finish_reason": True})
    assert r.status_code == 200, r.text
    assert r.json()["text_output"] == cut
    assert r.json()["finish_reason"] == "stop"


# ------------------------------------------------------------------------------ the seed's requests

def test_seed_request(server):
    """The seed's request, byte for byte as its curl command sends it."""
    with requests.post(f"{server.http_url}/v2/models/{MODEL_NAME}/generate", timeout=HTTP_TIMEOUT,
                       data='{"prompt": "The capital of France is", "n": 1, "use_beam_search": false, '
                            '"temperature": 0.7, "max_tokens": 10}') as response:
        r = Reply(response)
    assert r.status_code == 200, r.text
    assert r.json()["text_output"].startswith(PROMPT)


@pytest.mark.parametrize("field,value", [("n", 2), ("use_beam_search", True)])
def test_seed_request_n_and_beam_search(server, field, value):
    """The seed's requests with "n": 2 / "use_beam_search": true: one text per sample (n) or per
    returned beam."""
    body = {"prompt": PROMPT, "n": 1, "use_beam_search": False, "temperature": 0.7, "max_tokens": 10}
    body[field] = value
    r = generate(server, body)
    assert r.status_code == 200, r.text
    texts = r.json()["text_output"]
    n = body["n"]
    texts = [texts] if n == 1 else texts
    assert isinstance(texts, list) and len(texts) == n, texts
    assert all(isinstance(t, str) and t.startswith(PROMPT) for t in texts)


def test_n_samples_stream(server):
    options = {"n": 3, "temperature": 1.0, "seed": 7, "max_tokens": 12}
    body = {"text_input": PROMPT, "exclude_input_in_output": True, "parameters": options,
            "return_num_output_tokens": True, "return_finish_reason": True}
    r = generate(server, body)
    assert r.status_code == 200, r.text
    whole = r.json()["text_output"]
    assert isinstance(whole, list) and len(whole) == 3
    events = sse_events(generate(server, dict(body, stream=True), stream=True))
    assert events and not any("error" in e for e in events), events
    assert all(isinstance(e["text_output"], list) and len(e["text_output"]) == 3 for e in events)
    streamed = ["".join(e["text_output"][i] for e in events) for i in range(3)]
    assert streamed == whole  # same seed: same samples
    assert all(reason in ("stop", "length") for reason in events[-1]["finish_reason"])


def test_beam_search(server):
    options = {"use_beam_search": True, "n": 2, "best_of": 3, "temperature": 0, "max_tokens": 8}
    body = {"text_input": PROMPT, "exclude_input_in_output": True, "parameters": options,
            "return_cumulative_logprob": True}
    r = generate(server, body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert len(out["text_output"]) == 2
    assert out["cumulative_logprob"][0] <= 0
    events = sse_events(generate(server, dict(body, stream=True), stream=True))
    assert ["".join(e["text_output"][i] for e in events) for i in range(2)] == out["text_output"]


def test_penalties_and_logit_bias(server):
    """The logits processors through the server: penalties change greedy text, a bias of +100 forces
    a token, allowed_token_ids and bad_words travel inside sampling_parameters."""
    plain = generate(server, greedy(PROMPT, max_tokens=24, ignore_eos=True)).json()["text_output"]
    r = generate(server, greedy(PROMPT, max_tokens=24, ignore_eos=True, presence_penalty=1.5,
                                frequency_penalty="1.0", repetition_penalty=1.5))
    assert r.status_code == 200 and r.json()["text_output"] != plain, r.text
    body = {"text_input": PROMPT, "exclude_input_in_output": True, "return_num_output_tokens": True,
            "sampling_parameters": json.dumps({"temperature": 0, "max_tokens": 5, "ignore_eos": True,
                                               "logit_bias": {"50": 100}, "bad_words": ["the"],
                                               "allowed_token_ids": [50, 51]})}
    r = generate(server, body)
    assert r.status_code == 200 and r.json()["num_output_tokens"] == 5, r.text
    r = generate(server, {"prompt": PROMPT, "presence_penalty": 3})
    assert r.status_code == 400 and "presence_penalty" in r.json()["error"], r.text


def test_numbers_as_strings(server):
    r = generate(server, {"prompt": PROMPT, "max_tokens": "10", "temperature": "0", "ignore_eos": "true",
                          "exclude_input_in_output": True, "return_num_output_tokens": True})
    assert r.status_code == 200, r.text
    assert r.json()["num_output_tokens"] == 10
    assert r.json()["text_output"] == generate(server, greedy(PROMPT, max_tokens=10, ignore_eos=True)).json()[
        "text_output"]


def test_tiny_temperature_is_greedy(server):
    body = greedy(PROMPT, max_tokens=12)
    tiny = dict(body, parameters=dict(body["parameters"], temperature=1e-40))
    assert generate(server, tiny).json()["text_output"] == generate(server, body).json()["text_output"]


@pytest.mark.parametrize("body,field", [
    ({"prompt": PROMPT, "temperature": "abc"}, "temperature"),
    ({"prompt": PROMPT, "max_tokens": "ten"}, "max_tokens"),
    ({"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
    ({"prompt": PROMPT, "top_p": 2}, "top_p"),
    ({"prompt": PROMPT, "sampling_parameters": "{not json"}, "sampling_parameters"),
    ({"prompt": PROMPT, "sampling_parameters": "[1]"}, "sampling_parameters"),
    ({"temperature": 0}, "text_input"),
    ({"prompt": ""}, "text_input"),
    ({"prompt": PROMPT, "stream": True, "exclude_input_in_output": False}, "exclude_input_in_output"),
    ({"prompt": "x" * 20000}, "max_model_len"),
    # numbers read exactly (issue 10): each answered 400 naming its field, never 500
    ({"prompt": PROMPT, "max_tokens": "inf"}, "max_tokens"),
    ({"prompt": PROMPT, "temperature": "nan"}, "temperature"),
    ({"prompt": PROMPT, "sampling_parameters": '{"seed": 18446744073709551616}'}, "seed"),
    ({"prompt": PROMPT, "sampling_parameters": '{"max_tokens": 1e400}'}, "max_tokens"),
    ({"prompt": PROMPT, "sampling_parameters": json.dumps({"stop": [f"s{i}" for i in range(100_000)]})}, "stop"),
    ({"prompt": PROMPT, "sampling_parameters": '{"stop_token_ids": [999999]}'}, "stop_token_ids"),
    ({"prompt": PROMPT, "sampling_parameters": '{"use_beam_search": true, "n": 2, "top_p": 0.5}'}, "top_p"),
])
def test_bad_request(server, body, field):
    r = generate(server, body)
    assert r.status_code == 400, r.text
    assert field in r.json()["error"], r.json()
    # ... and on the stream endpoint the error arrives as an event
    events = sse_events(generate(server, body, stream=True))
    assert len(events) == 1 and field in events[0].get("error", ""), events


# ------------------------------------------------------------------------------ gRPC

def test_grpc_streaming(server):
    whole = generate(server, greedy(PROMPT, max_tokens=24)).json()["text_output"]
    deltas, error, final = grpc_stream(server, PROMPT, {"temperature": 0, "max_tokens": 24})
    assert error is None and final
    assert "".join(deltas) == whole


def test_grpc_cancel(server):
    deltas, error, final = grpc_stream(server, PROMPT, {"temperature": 0, "max_tokens": 4000, "ignore_eos": True},
                                       cancel_after=3, request_id="to-cancel")
    assert not final and len(deltas) >= 3
    deadline = time.monotonic() + 10
    while "to-cancel cancelled" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "to-cancel cancelled" in server.log()
    # the server goes on serving
    r = generate(server, greedy(PROMPT, max_tokens=4))
    assert r.status_code == 200, r.text


def test_http_disconnect_cancels(server):
    """A client that drops its generate_stream connection cancels the request: the engine aborts it."""
    before = server.log().count("cancelled by the client")
    body = json.dumps({"text_input": PROMPT, "stream": True, "max_tokens": 4000, "ignore_eos": True,
                       "temperature": 0}).encode()
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=HTTP_TIMEOUT) as sock:
        sock.sendall(b"POST /v2/models/%s/generate_stream HTTP/1.1\r\nHost: localhost\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                     % (MODEL_NAME.encode(), len(body)) + body)
        assert sock.recv(200).startswith(b"HTTP/1.1 200")
        time.sleep(0.2)
    deadline = time.monotonic() + 10
    while server.log().count("cancelled by the client") == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.log().count("cancelled by the client") == before + 1


# ------------------------------------------------------------------------------ concurrency

def test_concurrent_requests_match_sequential(server):
    prompts = [f"{PROMPT} {i}: " + "to be or not " * (i % 5) for i in range(20)]
    bodies = [greedy(p, max_tokens=8 + 3 * (i % 7)) for i, p in enumerate(prompts)]
    alone = [generate(server, b).json()["text_output"] for b in bodies]

    def run(i):
        if i % 2:  # half of them streamed
            events = sse_events(generate(server, dict(bodies[i], stream=True), stream=True))
            assert not any("error" in e for e in events), events
            return "".join(e["text_output"] for e in events)
        r = generate(server, bodies[i])
        assert r.status_code == 200, r.text
        return r.json()["text_output"]

    barrier = threading.Barrier(len(bodies))

    def run_together(i):
        barrier.wait(timeout=30)
        return run(i)

    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(run_together, range(len(bodies))))
    assert together == alone


# ------------------------------------------------------------------------------ other servers

def test_bad_config_parameter_fails_load(tmp_path, tiny_model):
    repo = make_model_repository(str(tmp_path / "model_repository"), tiny_model, block_size="abc")
    srv = Server(repo, str(tmp_path / "tritonserver.log")).start()
    try:
        rc = srv.wait_exit(timeout=120)  # the only model fails to load: the server exits
        assert rc is not None and rc != 0, "tritonserver should exit when the model fails to load"
        log = srv.log()
        assert "block_size" in log and "failed to load" in log, log[-5000:]
    finally:
        srv.stop()


def test_shutdown_with_requests_in_flight(tmp_path, tiny_model):
    """SIGTERM while gRPC streams run: Triton lets them finish, then unloads the model (finalize()
    stops the engine and the sender thread) and exits cleanly."""
    repo = make_model_repository(str(tmp_path / "model_repository"), tiny_model, num_gpu_blocks_override="2048")
    srv = Server(repo, str(tmp_path / "tritonserver.log")).start()
    try:
        srv.wait_ready()
        results = {}
        sampling = {"temperature": 0, "max_tokens": 600, "ignore_eos": True}

        def client(i):
            results[i] = grpc_stream(srv, PROMPT, sampling, request_id=f"long-{i}")

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        t0 = time.monotonic()
        rc = srv.stop(timeout=60)
        assert time.monotonic() - t0 < 30
        for t in threads:
            t.join(timeout=30)
        log = srv.log()
        assert rc == 0, log[-5000:]
        assert "llm: shutting down" in log
        assert len(results) == 4
        for deltas, error, final in results.values():  # the in-flight requests completed
            assert error is None and final and deltas
    finally:
        srv.stop()


DEFAULT_MODEL = os.path.join(REPO, "model_repository", MODEL_NAME, "tiny-shakespeare")


@pytest.mark.skipif(not os.path.isfile(os.path.join(DEFAULT_MODEL, "config.json")),
                    reason="the default model (model_repository/llm/tiny-shakespeare) is not trained yet")
def test_default_model_repository(tmp_path):
    """The repository exactly as `make serve` serves it."""
    srv = Server(os.path.join(REPO, "model_repository"), str(tmp_path / "tritonserver.log")).start()
    try:
        srv.wait_ready()
        r = generate(srv, {"prompt": "ROMEO:", "temperature": 0, "max_tokens": 32})
        assert r.status_code == 200, r.text
        assert r.json()["text_output"].startswith("ROMEO:")
        events = sse_events(generate(srv, {"prompt": "ROMEO:", "temperature": 0, "max_tokens": 32,
                                           "exclude_input_in_output": True, "stream": True}, stream=True))
        assert "ROMEO:" + "".join(e["text_output"] for e in events) == r.json()["text_output"]
    finally:
        assert srv.stop() == 0


def test_cancel_while_waiting(tmp_path, tiny_model):
    """A request still waiting for a seat (max_num_seqs 1, another request running) is aborted as
    soon as its client goes, not when it would have been scheduled."""
    repo = make_model_repository(str(tmp_path / "model_repository"), tiny_model, max_num_seqs="1",
                                 num_gpu_blocks_override="2048")
    srv = Server(repo, str(tmp_path / "tritonserver.log")).start()
    try:
        srv.wait_ready()
        long_body = json.dumps({"text_input": PROMPT, "max_tokens": 3000, "ignore_eos": True, "temperature": 0})
        holder = threading.Thread(target=lambda: requests.post(
            f"{srv.http_url}/v2/models/{MODEL_NAME}/generate", data=long_body, timeout=HTTP_TIMEOUT))
        holder.start()
        time.sleep(0.5)
        import tritonclient.grpc as grpcclient
        client = grpcclient.InferenceServerClient(srv.grpc_url)
        client.start_stream(callback=lambda result, error: None)
        text = grpcclient.InferInput("text_input", [1], "BYTES")
        text.set_data_from_numpy(np.array([PROMPT.encode()], dtype=np.object_))
        client.async_stream_infer(MODEL_NAME, [text], request_id="waiting")
        time.sleep(0.3)
        client.stop_stream(cancel_requests=True)
        client.close()
        deadline = time.monotonic() + 10
        while "waiting cancelled by the client" not in srv.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "waiting cancelled by the client" in srv.log()
        assert holder.is_alive(), "the cancel came while the first request was still running"
        holder.join(timeout=HTTP_TIMEOUT)
    finally:
        srv.stop()


def test_vllm_metrics(server):
    """vLLM's metric names on Triton's metrics endpoint, exact as soon as the last response is in."""
    def scrape():
        return requests.get(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=HTTP_TIMEOUT).text

    def value(name, text, label='model="llm"'):
        lines = [l for l in text.splitlines() if l.startswith(name + "{") and 'model="llm"' in l and label in l]
        assert lines, f"{name} {label} missing from /metrics"
        return float(lines[0].rsplit(" ", 1)[1])

    before = scrape()
    tokens_before = value("vllm:generation_tokens_total", before) if "vllm:generation_tokens_total{" in before else 0
    length_before = (value("vllm:request_success_total", before, 'finished_reason="length"')
                     if "vllm:request_success_total{" in before else 0)
    for _ in range(2):
        assert generate(server, greedy(PROMPT, max_tokens=6, ignore_eos=True)).status_code == 200
    assert generate(server, greedy(PROMPT, max_tokens=2, ignore_eos=True)).status_code == 200
    text = scrape()   # no wait: counted before the final responses went out
    assert value("vllm:generation_tokens_total", text) - tokens_before == 14
    assert value("vllm:request_success_total", text, 'finished_reason="length"') - length_before == 3
    assert value("vllm:num_requests_running", text) == 0
    for name in ("time_per_output_token_seconds", "request_params_n", "request_params_max_tokens",
                 "request_queue_time_seconds", "request_prefill_time_seconds", "request_decode_time_seconds",
                 "request_inference_time_seconds"):
        assert value(f"vllm:{name}_count", text) >= (1 if name == "time_per_output_token_seconds" else 3), name
    value = functools.partial(value, text=text)
    # where the host's time goes: the loop's wall time holds its CPU time (a step of this tiny model on
    # the CPU is mostly the thread's own work) and the wait for tokens; the sender has sent responses
    loop, loop_cpu = value("vllm:engine_loop_seconds_total"), value("vllm:engine_loop_cpu_seconds_total")
    assert 0 < loop_cpu <= loop * 1.05 and 0 <= value("vllm:engine_gpu_wait_seconds_total") <= loop
    assert value("vllm:response_sender_cpu_seconds_total") > 0
    assert value("vllm:prompt_tokens_total") > 0
    assert value("vllm:generation_tokens_total") >= 12
    assert value("vllm:time_to_first_token_seconds_count") >= 3
    assert value("vllm:e2e_request_latency_seconds_count") >= 3
    assert value("vllm:request_generation_tokens_sum") >= 14
    assert 0 <= value("vllm:kv_cache_usage_perc") <= 1
    assert value("vllm:num_requests_waiting") == 0
    steps = value("vllm:iteration_tokens_total_count")   # per engine step: its tokens and its time
    assert steps >= 6 and value("vllm:iteration_tokens_total_sum") >= 2 * 5 + 1
    assert value("vllm:step_duration_seconds_count") == steps and value("vllm:step_duration_seconds_sum") > 0


def test_list_options_as_strings_among_request_parameters(server):
    """Triton's parameters cannot hold lists: a stop list travels as one string or a JSON list in a string."""
    whole = generate(server, greedy(PROMPT, max_tokens=30, ignore_eos=True)).json()["text_output"]
    at = next(i for i in range(1, len(whole) - 1)
              if whole[i:i + 2].isascii() and whole[i:i + 2].isprintable() and whole.find(whole[i:i + 2]) == i)
    for stop in (whole[at:at + 2], json.dumps([whole[at:at + 2], "never-appears"])):
        r = generate(server, greedy(PROMPT, max_tokens=30, ignore_eos=True, stop=stop))
        assert r.status_code == 200 and r.json()["text_output"] == whole[:at], (stop, r.text)
