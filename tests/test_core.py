"""EngineCore on its own: token ids in, compact per-step CoreOutputs out (what a process boundary
would carry), and the front's stop strings freeing the core's sequences."""
import pickle

from backend.core import EngineCore, EngineCoreRequest
from backend.sampling_params import SamplingParams
from tests.helpers import greedy, make_engine, prompt_set


def run_core(core, requests):
    """Submit every request, step to the end; the token ids each request's deltas add up to."""
    for r in requests:
        core.add_request(r)
    tokens, finished = {r.request_id: [] for r in requests}, {}
    while core.has_unfinished():
        for out in core.step():
            out = pickle.loads(pickle.dumps(out))   # it must survive a trip to another process
            assert out.request_id not in finished, "nothing after the final output"
            for s in out.samples:
                tokens[out.request_id] += s.new_token_ids
            if out.finished:
                finished[out.request_id] = out.samples[0].finish_reason
    return tokens, finished


def test_core_deltas_add_up_to_the_engines_outputs(tiny_checkpoints):
    path = tiny_checkpoints["llama"]
    engine = make_engine(path)
    prompts = prompt_set(6, seed=41)
    params = [greedy(12), greedy(5), SamplingParams(temperature=0.8, seed=3, max_tokens=9, ignore_eos=True),
              greedy(20), greedy(1), greedy(7)]
    ref = engine.generate(prompts, params)
    core = EngineCore(engine.config, engine.eos_token_ids)
    tokens, finished = run_core(core, [EngineCoreRequest(f"r{i}", p, sp)
                                       for i, (p, sp) in enumerate(zip(prompts, params))])
    assert [tokens[f"r{i}"] for i in range(6)] == [o.token_ids for o in ref]
    assert set(finished.values()) == {"length"}
    assert not core.requests and core.block_manager.num_free_blocks == core.block_manager.num_blocks


def test_stop_string_frees_the_sequence_in_the_core_at_once(tiny_checkpoints):
    engine = make_engine(tiny_checkpoints["llama"])
    free_run = engine.generate(["To be"], greedy(30))[0]
    stop = free_run.text[6:9]
    assert stop and free_run.text.find(stop) == 6
    engine.add_request("s", "To be", greedy(30, stop=[stop]))
    engine.add_request("long", "To be", greedy(30))
    bm = engine.core.block_manager
    final = None
    while final is None:
        for o in engine.step():
            if o.request_id == "s" and o.finished:
                final = o
    assert final.text == free_run.text[:6] and final.finish_reason == "stop"
    assert "s" not in engine.core.requests, "the core dropped the request in the same step"
    held = sum(len(s.block_table) for s in engine.core.scheduler.running)
    assert bm.num_blocks - bm.num_free_blocks == held, "only the other request still holds blocks"
    while engine.has_unfinished():
        engine.step()
    assert bm.num_free_blocks == bm.num_blocks
