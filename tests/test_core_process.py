"""engine_core_process: the engine core in a spawned process gives what the in-process core gives,
and requests never hang when the core fails or the engine shuts down."""
import os
import signal
import time

import pytest

from backend.sampling_params import SamplingParams
from tests.helpers import greedy, make_engine, prompt_set


@pytest.fixture(scope="module")
def engines(tiny_checkpoints):
    path = tiny_checkpoints["llama"]
    local, remote = make_engine(path), make_engine(path, engine_core_process="true")
    yield local, remote
    remote.shutdown()


def run(engine, requests):
    """requests: (id, prompt ids, params); every output of each, in order."""
    seen = {}
    for rid, prompt, params in requests:
        engine.add_request(rid, "", params, prompt_token_ids=prompt)
    deadline = time.monotonic() + 60
    while engine.has_unfinished():
        assert time.monotonic() < deadline
        for o in engine.step():
            seen.setdefault(o.request_id, []).append(o)
    return seen


def test_same_outputs_as_the_core_in_process(engines):
    local, remote = engines
    prompts = prompt_set(6, seed=2)
    requests = [(f"g{i}", p, greedy(10)) for i, p in enumerate(prompts)]
    requests += [("seeded", prompts[0], SamplingParams(temperature=0.9, seed=4, n=2, max_tokens=8, logprobs=1)),
                 ("beams", prompts[1], SamplingParams(use_beam_search=True, n=2, temperature=0.0, max_tokens=6))]
    a, b = run(local, requests), run(remote, requests)
    for rid in a:
        assert [s.token_ids for s in a[rid][-1].samples] == [s.token_ids for s in b[rid][-1].samples], rid
        assert [s.logprobs for s in a[rid][-1].samples] == [s.logprobs for s in b[rid][-1].samples], rid
    stats = remote.stats()
    assert stats["generation_tokens_total"] >= 6 * 10 and stats["num_requests_running"] == 0


def test_stop_strings_abort_and_timeout_reach_the_core(engines):
    local, remote = engines
    prompt = prompt_set(1, seed=3)[0]
    free = run(local, [("free", prompt, greedy(24))])["free"][-1]
    stop = free.text[4:7]
    remote.add_request("stopped", "", greedy(24, stop=[stop]), prompt_token_ids=prompt)
    remote.add_request("aborted", "", greedy(4000), prompt_token_ids=prompt)
    remote.add_request("late", "", greedy(4000), prompt_token_ids=prompt, timeout_s=0.3)
    final, steps = {}, 0
    while remote.has_unfinished():
        steps += 1
        if steps == 3:
            remote.abort("aborted")
        for o in remote.step():
            if o.finished:
                final[o.request_id] = o
    assert final["stopped"].finish_reason == "stop" and final["stopped"].text == free.text[:free.text.index(stop)]
    assert final["aborted"].finish_reason == "abort"
    assert final["late"].error == "the request's timeout expired"
    assert remote.stats()["num_requests_running"] == 0   # the core freed them all


def test_start_up_error_is_raised_in_the_front(tiny_checkpoints):
    with pytest.raises(ValueError, match="tensor_parallel_size"):   # found by the core, in its process
        make_engine(tiny_checkpoints["llama"], engine_core_process="true", tensor_parallel_size="3")


def test_dead_core_fails_requests_in_flight(tiny_checkpoints):
    engine = make_engine(tiny_checkpoints["llama"], engine_core_process="true")
    got = {}
    engine.start()
    for i in range(3):
        engine.add_request(f"r{i}", "", greedy(100000 // 100), prompt_token_ids=[5, 6, 7],
                           on_output=lambda o: got.__setitem__(o.request_id, o) if o.finished else None)
    time.sleep(0.5)
    os.kill(engine.core._proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while len(got) < 3:
        assert time.monotonic() < deadline, "requests in flight hung after the core died"
        time.sleep(0.05)
    assert all(o.finished and o.error for o in got.values()) and not engine.healthy
    engine.shutdown()
