"""Engine core: prefix caching, preemption, chunking, n > 1 and beam search give the outputs they
should (against the engine without the feature, or HF transformers)."""
import pytest
import torch

from backend.sampling_params import SamplingParams
from tests.helpers import greedy, hf_model, make_engine, prompt_set, run_staggered


def seeded(seed, max_tokens=16, **kw):
    return SamplingParams(temperature=0.8, top_p=0.95, seed=seed, max_tokens=max_tokens, ignore_eos=True, **kw)


def shared_prefix_prompts(n=8, prefix_len=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(2, 300, (prefix_len,), generator=g).tolist()
    return [prefix + torch.randint(2, 300, (3 + 5 * i,), generator=g).tolist() for i in range(n)] + [prefix]


def token_ids(outputs):
    return [[s.token_ids for s in o.samples] for o in outputs]


def mixed_params(n):
    return [greedy(12) if i % 2 else seeded(100 + i) for i in range(n)]


@pytest.fixture(scope="module")
def path(tiny_checkpoints):
    return tiny_checkpoints["llama"]


def test_prefix_caching_on_equals_off(path):
    prompts = shared_prefix_prompts()
    params = mixed_params(len(prompts))
    off = make_engine(path, enable_prefix_caching="false")
    on = make_engine(path, block_size=8)
    ref = token_ids(run_staggered(off, prompts, params, every=4))
    assert token_ids(run_staggered(on, prompts, params, every=4)) == ref
    bm = on.core.block_manager
    assert bm.num_prefix_hits >= 8 * 32, "later requests reuse the shared 40-token prefix (5 blocks of 8)"
    # The same prompts again: nearly everything hits, and the outputs are still the same.
    hits = bm.num_prefix_hits
    assert token_ids(on.generate(prompts, params)) == ref
    assert bm.num_prefix_hits - hits >= sum(len(p) // 8 * 8 for p in prompts) - 8
    assert bm.num_free_blocks == bm.num_blocks


def test_full_prompt_hit_recomputes_last_token(path):
    engine = make_engine(path, block_size=8)
    prompt = prompt_set(1, seed=11)[0][:1] + list(range(3, 34))   # 32 tokens: 4 full blocks
    first = engine.generate([prompt], greedy(10))[0].token_ids
    hits = engine.core.block_manager.num_prefix_hits
    assert engine.generate([prompt], greedy(10))[0].token_ids == first
    assert engine.core.block_manager.num_prefix_hits - hits == 32


def test_preemption_gives_the_same_outputs(path):
    prompts = prompt_set(10, seed=12)
    params = mixed_params(len(prompts))
    ref = token_ids(make_engine(path).generate(prompts, params))
    for caching in ("true", "false"):
        small = make_engine(path, num_gpu_blocks_override=12, block_size=8, enable_prefix_caching=caching)
        assert token_ids(small.generate(prompts, params)) == ref
        assert small.core.scheduler.num_preemptions > 0


def test_chunked_prefill_equals_unchunked_with_sampling(path):
    prompts = prompt_set(8, seed=13)
    params = mixed_params(len(prompts))
    ref = token_ids(make_engine(path).generate(prompts, params))
    assert token_ids(make_engine(path, max_num_batched_tokens=8, max_num_seqs=8).generate(prompts, params)) == ref


def test_priority_policy_runs_urgent_requests_first(path):
    engine = make_engine(path, scheduling_policy="priority", max_num_seqs=1)
    prompts = prompt_set(4, seed=14)
    order = []
    for i, (p, prio) in enumerate(zip(prompts, [5, 1, 3, 0])):
        engine.add_request(f"r{i}", "", greedy(3, priority=prio), prompt_token_ids=p)
    while engine.has_unfinished():
        order += [o.request_id for o in engine.step() if o.finished]
    assert order == ["r3", "r1", "r2", "r0"]


def test_n_greedy_samples_equal_n1(path):
    engine = make_engine(path)
    prompts = prompt_set(3, seed=15)
    single = engine.generate(prompts, greedy(12))
    many = engine.generate(prompts, greedy(12, n=4))
    for s, m in zip(single, many):
        assert [x.token_ids for x in m.samples] == [s.token_ids] * 4
        assert [x.index for x in m.samples] == [0, 1, 2, 3]


def test_n_seeded_sample_i_uses_seed_plus_i(path):
    engine = make_engine(path, block_size=8)
    prompt = prompt_set(4, seed=16)[3]   # 17 tokens: the last block is shared, then copied on write
    many = engine.generate([prompt], seeded(7, n=4))[0]
    assert len({tuple(x.token_ids) for x in many.samples}) == 4, "different seeds give different samples"
    for i, sample in enumerate(many.samples):
        assert sample.token_ids == engine.generate([prompt], seeded(7 + i))[0].token_ids
    assert engine.generate([prompt], seeded(7, n=4))[0].samples == many.samples   # reproducible


def test_n_samples_share_prompt_blocks(path):
    engine = make_engine(path, block_size=8)
    prompt = list(range(2, 2 + 43))   # 5 full blocks + 3 tokens
    engine.add_request("x", "", seeded(1, n=4, max_tokens=4), prompt_token_ids=prompt)
    engine.step()   # prefill, sample, fork
    engine.step()   # first decode: copy-on-write of the partial block
    seqs = engine.core.requests["x"].seqs
    assert len(seqs) == 4 and all(s.block_table[:5] == seqs[0].block_table[:5] for s in seqs)
    assert len({s.block_table[5] for s in seqs}) == 4
    stats = engine.core.block_manager.memory_stats(seqs)
    assert stats["blocks_saved_by_sharing"] == 15 and stats["blocks"] == 9
    while engine.has_unfinished():
        engine.step()
    assert engine.core.block_manager.num_free_blocks == engine.core.block_manager.num_blocks


def hf_beams(path, prompt, width, max_new, length_penalty=1.0):
    ids = torch.tensor([prompt])
    out = hf_model(path).generate(ids, attention_mask=torch.ones_like(ids), num_beams=width,
                                  num_return_sequences=width, max_new_tokens=max_new, do_sample=False,
                                  eos_token_id=None, pad_token_id=0, length_penalty=length_penalty,
                                  early_stopping=False)
    return [row[len(prompt):].tolist() for row in out]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_beam_search_equals_hf(tiny_checkpoints, arch):
    path = tiny_checkpoints[arch]
    engine = make_engine(path, block_size=8)
    prompts = prompt_set(4, seed=17)
    params = SamplingParams(use_beam_search=True, n=4, max_tokens=10, ignore_eos=True, temperature=0.7)
    outputs = engine.generate(prompts, params)
    for p, o in zip(prompts, outputs):
        assert [s.token_ids for s in o.samples] == hf_beams(path, p, 4, 10)
    assert engine.core.block_manager.num_free_blocks == engine.core.block_manager.num_blocks


def test_beam_search_survives_preemption(path):
    prompts = prompt_set(5, seed=18)
    params = SamplingParams(use_beam_search=True, n=3, max_tokens=8, ignore_eos=True)
    ref = token_ids(make_engine(path).generate(prompts, params))
    small = make_engine(path, num_gpu_blocks_override=15, block_size=8, max_num_batched_tokens=16, max_num_seqs=16)
    assert token_ids(small.generate(prompts, params)) == ref
    assert small.core.scheduler.num_preemptions > 0


def test_beam_search_stops_at_max_model_len(path):
    engine = make_engine(path, max_model_len=40)
    prompts = [p for p in prompt_set(8, seed=23) if len(p) < 39]
    for width in (2, 3, 4):
        params = SamplingParams(use_beam_search=True, n=width, max_tokens=200, ignore_eos=True)
        for o in engine.generate(prompts, params):
            assert all(o.num_prompt_tokens + len(s.token_ids) == 40 for s in o.samples)
