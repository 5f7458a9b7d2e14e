"""One client never hurts another, against a real tritonserver: a poisonous request, a 10 MB
prompt, overload beyond max_queue_size, and Triton's request timeout."""
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from .harness import MODEL_NAME, Server, make_model_repository
from .test_server import generate, grpc_stream


def timed_stream(server, prompt, max_tokens, out, key):
    """A gRPC stream whose response times are kept: out[key] = (deltas, error, final, largest gap s)."""
    times = []
    deltas, error, final = grpc_stream(server, prompt, {"temperature": 0, "max_tokens": max_tokens,
                                                        "ignore_eos": True}, request_id=key, on_response=times.append)
    gaps = [b - a for a, b in zip(times, times[1:])]
    out[key] = (deltas, error, final, max(gaps, default=0.0))


def run_streams(server, n, max_tokens, during=None, delay=0.3):
    """n streams at once; `during()` runs `delay` s after they start. Returns their results."""
    out = {}
    threads = [threading.Thread(target=timed_stream, args=(server, f"ROMEO {i}:", max_tokens, out, f"s{i}"))
               for i in range(n)]
    for t in threads:
        t.start()
    side = None
    if during is not None:
        time.sleep(delay)
        side = during()
    for t in threads:
        t.join(120)
    return out, side


def test_poison_request_among_streams(server):
    """A request whose stop token ids are outside the vocabulary is refused (400, naming the field)
    and the 8 streams beside it all complete."""
    def poison():
        return generate(server, {"text_input": "To be", "parameters": {
            "stop_token_ids": [999999], "min_tokens": 2, "max_tokens": 8}})
    out, reply = run_streams(server, 8, 48, poison, delay=0.2)
    assert reply.status_code == 400 and "stop_token_ids" in reply.text, reply.text
    assert [(v[1], v[2], len(v[0]) > 0) for v in out.values()] == [(None, True, True)] * 8


def test_ten_megabyte_prompt_costs_others_little(server):
    huge = "To be or not to be, " * 500_000   # 10 MB

    def send_huge():
        t0 = time.monotonic()
        r = generate(server, {"text_input": huge, "parameters": {"max_tokens": 4}})
        return r, time.monotonic() - t0
    out, (reply, seconds) = run_streams(server, 4, 160, send_huge)
    assert reply.status_code == 400 and "'text_input'" in reply.text, reply.text[:300]
    assert all(v[1] is None and v[2] for v in out.values())
    gaps = [v[3] for v in out.values()]
    print(f"10 MB prompt refused in {seconds:.2f} s; the streams' largest gaps: {[round(g, 3) for g in gaps]}")
    assert max(gaps) < 0.5, gaps


def test_request_timeout_parameter_frees_the_request(server):
    """Triton's `timeout` parameter (microseconds) bounds a request: a non-streaming generate
    whose client would wait for 3000 tokens is ended with an error."""
    t0 = time.monotonic()
    r = generate(server, {"text_input": "To be", "parameters": {"max_tokens": 3000, "ignore_eos": True,
                                                                "timeout": 300_000}})
    assert r.status_code != 200 and "timeout expired" in r.text, r.text
    assert time.monotonic() - t0 < 10


@pytest.fixture(scope="module")
def small_server(tmp_path_factory, tiny_model):
    base = tmp_path_factory.mktemp("overload")
    repo = make_model_repository(str(base / "model_repository"), tiny_model, num_gpu_blocks_override="2048",
                                 max_num_seqs="2", max_queue_size="3")
    srv = Server(repo, str(base / "tritonserver.log")).start()
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


def test_overload_beyond_max_queue_size_is_refused_at_once(small_server):
    """2 running + 3 waiting are accepted; the rest are refused at once; the accepted ones complete.
    (The model answers UNAVAILABLE, tests/test_serving.py; Triton 2.51 carries no code on a gRPC
    stream's error and its HTTP generate answers 400.)"""
    def one(i):
        t0, first = time.monotonic(), []
        deltas, error, final = grpc_stream(small_server, "To be", {"max_tokens": 300, "ignore_eos": True},
                                           request_id=f"o{i}", on_response=first.append)
        return error, final, (first[0] if first else time.monotonic()) - t0
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    refused = [r for r in results if r[0] is not None]
    accepted = [r for r in results if r[0] is None and r[1]]
    assert len(refused) + len(accepted) == 16, results
    assert len(refused) >= 8 and len(accepted) >= 5, results
    assert all("max_queue_size" in r[0].message() for r in refused), [r[0].message() for r in refused][:2]
    print("refused after (s):", sorted(round(r[2], 3) for r in refused))
    assert max(r[2] for r in refused) < 1.0, "refused at once, not after waiting"
    deadline, counted = time.monotonic() + 5, None
    while time.monotonic() < deadline:   # counters are refreshed twice a second
        metrics = requests.get(f"http://127.0.0.1:{small_server.metrics_port}/metrics", timeout=10).text
        counted = [float(line.split()[-1]) for line in metrics.splitlines()
                   if line.startswith("vllm:request_rejected_total{")]
        if counted == [len(refused)]:
            break
        time.sleep(0.2)
    assert counted == [len(refused)], counted


SOAK = bool(os.environ.get("LLM_SOAK"))


def test_many_concurrent_requests_none_lost_or_wrong(server):
    """CI: 200 requests at 50 concurrent; LLM_SOAK=1: 2,000 at 200. Greedy outputs are compared with
    the same prompts answered one at a time."""
    total, concurrency = (2000, 200) if SOAK else (200, 50)
    prompts = [f"{name}:" for name in ("ROMEO", "JULIET", "KING", "First Citizen", "HAMLET", "O")]
    expected = {p: generate(server, {"text_input": p, "exclude_input_in_output": True, "parameters": {
        "temperature": 0, "max_tokens": 12, "ignore_eos": True}}).json()["text_output"] for p in prompts}

    def one(i):
        p = prompts[i % len(prompts)]
        r = generate(server, {"text_input": p, "exclude_input_in_output": True,
                              "parameters": {"temperature": 0, "max_tokens": 12, "ignore_eos": True}})
        return r.status_code, (r.json().get("text_output") if r.status_code == 200 else r.text), expected[p]
    t0 = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(total)))
    failed = [r for r in results if r[0] != 200]
    wrong = [r for r in results if r[0] == 200 and r[1] != r[2]]
    print(f"{total} requests at {concurrency} concurrent in {time.monotonic() - t0:.1f} s: "
          f"{len(failed)} failed, {len(wrong)} wrong")
    assert not failed and not wrong, (failed[:2], wrong[:2])
