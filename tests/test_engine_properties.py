"""Property tests: the real engine (scheduler, block manager, forks, beams, aborts) driven by random
workloads, with a stand-in for the model that returns random logits. After every step the block
bookkeeping is recounted by brute force."""
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from backend.block_manager import BlockManager
from backend.sampling_params import SamplingParams
from backend.scheduler import Scheduler
from tests.helpers import make_engine

STEPS = {"total": 0}


class RandomLogitsRunner:
    """Stands in for ModelRunner: same contract, random logits, no forward pass."""

    def __init__(self, sampler, vocab, seed):
        self.sampler, self.vocab = sampler, vocab
        self.gen = torch.Generator().manual_seed(seed)

    def run(self, out, pending=None):
        seqs = [s for s, n in zip(out.seqs, out.num_new_tokens) if s.num_computed_tokens + n == s.num_tokens]
        return seqs, torch.randn(len(seqs), self.vocab, generator=self.gen)


@pytest.fixture(scope="module")
def engine(tiny_checkpoints):
    return make_engine(tiny_checkpoints["llama"])


def reset(engine, num_blocks, block_size, max_seqs, budget, policy, seed):
    engine.config.max_num_seqs, engine.config.max_num_batched_tokens, engine.config.block_size = max_seqs, budget, block_size
    engine.block_manager = BlockManager(num_blocks, block_size)
    engine.scheduler = sched = Scheduler(engine.block_manager, max_seqs, budget, policy)
    schedule = sched.schedule

    def recording_schedule():   # keep each step's SchedulerOutput for the budget check
        sched.last = schedule()
        return sched.last
    sched.schedule = recording_schedule
    engine.runner = RandomLogitsRunner(engine.runner.sampler, 384, seed)
    engine._groups.clear()
    engine._ids_in_flight.clear()
    engine._pending, engine._num_forking = None, 0


def check_invariants(engine, out_tokens, budget, max_seqs):
    bm, sched = engine.block_manager, engine.scheduler
    # Sequences whose last token is still in flight (async scheduling) keep their blocks until it lands.
    in_flight = [s for s in (engine._pending.seqs if engine._pending else []) if not s.is_finished]
    holders = {id(s): s for s in [*sched.running, *in_flight]}.values()
    owners = Counter(b for s in holders for b in s.block_table)
    assert all(not s.block_table for s in sched.waiting), "a waiting sequence holds no blocks"
    assert all(bm.ref_counts[b] == n for b, n in owners.items()), "ref count == block-table entries"
    assert sum(bm.ref_counts) == sum(owners.values())
    free = list(bm.free_blocks)
    assert not set(free) & set(owners), "a block is both free and referenced"
    assert len(free) + len(owners) == bm.num_blocks, "no block is lost"
    assert out_tokens <= budget and len(sched.running) <= max_seqs
    for key, block_id in bm.cached.items():
        assert bm.block_key[block_id] == key


request = st.fixed_dictionaries({
    "prefix": st.integers(0, 2), "prefix_len": st.integers(0, 40), "suffix_len": st.integers(1, 20),
    "max_tokens": st.integers(1, 30), "kind": st.sampled_from(["greedy", "sample", "n", "beam"]),
    "n": st.integers(2, 3), "priority": st.integers(0, 3), "arrive": st.integers(0, 8),
    "abort_at": st.one_of(st.none(), st.integers(0, 20)), "seed": st.integers(0, 5)})


def params_for(r):
    common = dict(max_tokens=r["max_tokens"], priority=r["priority"], ignore_eos=r["seed"] % 2 == 0)
    if r["kind"] == "greedy":
        return SamplingParams(temperature=0, **common)
    if r["kind"] == "sample":
        return SamplingParams(temperature=1.0, seed=r["seed"], **common)
    if r["kind"] == "n":
        return SamplingParams(temperature=1.0, n=r["n"], **common)
    return SamplingParams(use_beam_search=True, n=r["n"], **common)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(request, min_size=1, max_size=16), st.integers(12, 48), st.sampled_from([4, 8, 16]),
       st.integers(3, 8), st.integers(3, 48), st.sampled_from(["fcfs", "priority"]), st.integers(0, 1000),
       st.booleans())
def test_random_workloads_keep_block_invariants(engine, reqs, num_blocks, block_size, max_seqs, budget, policy, seed,
                                                async_scheduling):
    reset(engine, num_blocks, block_size, max_seqs, budget, policy, seed)
    engine._async = async_scheduling
    prefixes = [list(range(10 + 50 * i, 10 + 50 * i + 40)) for i in range(3)]
    pending = sorted(range(len(reqs)), key=lambda i: reqs[i]["arrive"])
    finished, admitted, step = set(), set(), 0
    while pending or engine.has_unfinished():
        while pending and reqs[pending[0]]["arrive"] <= step:
            i = pending.pop(0)
            r = reqs[i]
            ids = prefixes[r["prefix"]][:r["prefix_len"]] + [300 + i] * r["suffix_len"]
            try:
                engine.add_request(f"r{i}", "", params_for(r), prompt_token_ids=ids)
                admitted.add(f"r{i}")
            except ValueError:
                pass   # cannot fit this pool at all: refused up front, as it must be
        for i, r in enumerate(reqs):
            if r["abort_at"] == step and f"r{i}" in admitted:
                engine.abort(f"r{i}")
        outputs = engine.step()
        check_invariants(engine, engine.scheduler.last.total_tokens, budget, max_seqs)
        for o in outputs:
            if o.finished:
                assert o.request_id not in finished
                finished.add(o.request_id)
                want = 1 if params_for(reqs[int(o.request_id[1:])]).n == 1 else None
                assert want is None or len(o.samples) == 1
        step += 1
        assert step < 3000, "no progress"
    STEPS["total"] += step
    assert finished == admitted, "every admitted request finishes exactly once"
    assert engine.block_manager.num_free_blocks == num_blocks
    assert not any(engine.block_manager.ref_counts)


def test_property_tests_ran_enough_steps():
    if STEPS["total"] == 0:
        pytest.skip("the property test did not run in this session")
    print("property-test steps:", STEPS["total"])
    assert STEPS["total"] >= 10_000, STEPS["total"]
