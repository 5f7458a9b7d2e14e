"""Async scheduling (the next step is launched before the last step's tokens reach the host) gives
exactly the outputs of synchronous stepping. On CPU nothing overlaps, but the same placeholder and
late-stop logic runs."""
import pytest

from backend.sampling_params import SamplingParams
from tests.helpers import greedy, make_engine, prompt_set, run_staggered


def outputs(engine, prompts, params, every=2):
    return [(o.token_ids, o.text, o.finish_reason) for o in run_staggered(engine, prompts, params, every)]


def mixed_params(engine, prompts):
    free = engine.generate(prompts[:2], greedy(12))
    return [greedy(12), greedy(10, stop_token_ids=[free[0].token_ids[4]]),
            SamplingParams(temperature=0.9, seed=5, max_tokens=14, ignore_eos=True),
            greedy(9, stop=[free[1].text[4:6]] if len(free[1].text) > 6 else []),
            SamplingParams(temperature=1.0, top_k=20, seed=7, max_tokens=11, min_tokens=5),
            greedy(30), greedy(1), SamplingParams(temperature=0.7, top_p=0.8, seed=9, max_tokens=12, ignore_eos=True)]


@pytest.mark.parametrize("pool", [{}, {"num_gpu_blocks_override": 12, "block_size": 8},
                                  {"max_num_batched_tokens": 8, "max_num_seqs": 8}])
def test_async_equals_sync(tiny_checkpoints, pool):
    path = tiny_checkpoints["llama"]
    sync = make_engine(path, async_scheduling="false", **pool)
    prompts = prompt_set(8, seed=21)
    params = mixed_params(sync, prompts)
    ref = outputs(sync, prompts, params)
    eng = make_engine(path, async_scheduling="true", **pool)
    assert eng.core.async_scheduling
    assert outputs(eng, prompts, params) == ref
    bm = eng.core.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not any(bm.ref_counts)


def test_async_with_max_model_len_and_forks(tiny_checkpoints):
    path = tiny_checkpoints["qwen3"]
    prompts = prompt_set(4, seed=22)
    params = [greedy(100), SamplingParams(n=2, temperature=0.8, seed=1, max_tokens=6, ignore_eos=True),
              greedy(7), SamplingParams(use_beam_search=True, n=2, max_tokens=5, ignore_eos=True)]
    ref = outputs(make_engine(path, async_scheduling="false", max_model_len=48), prompts, params)
    assert outputs(make_engine(path, async_scheduling="true", max_model_len=48), prompts, params) == ref


def test_streamed_outputs_never_show_a_pending_token(tiny_checkpoints):
    engine = make_engine(tiny_checkpoints["llama"], async_scheduling="true")
    engine.add_request("a", "To be", greedy(12))
    seen = []
    while engine.has_unfinished():
        seen += [o.token_ids for o in engine.step()]
    assert all(-1 not in ids for ids in seen) and len(seen[-1]) == 12
    assert [ids for ids in seen if ids] == [seen[-1][:n] for n in range(1, 13)]


def test_async_abort_mid_flight(tiny_checkpoints):
    engine = make_engine(tiny_checkpoints["llama"], async_scheduling="true")
    engine.add_request("a", "To be", greedy(50))
    engine.add_request("b", "To be", greedy(5))
    finals = {}
    for i in range(40):
        if i == 3:
            engine.abort("a")
        for o in engine.step():
            if o.finished:
                finals[o.request_id] = o
        if not engine.has_unfinished():
            break
    assert finals["a"].finish_reason == "abort" and finals["b"].finish_reason == "length"
    assert len(finals["b"].token_ids) == 5
    assert engine.core.block_manager.num_free_blocks == engine.core.block_manager.num_blocks
