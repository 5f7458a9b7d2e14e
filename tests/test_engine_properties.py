"""Property tests: the real engine (scheduler, block manager, forks, beams, aborts) driven by random
workloads, with a stand-in for the model that returns random logits. After every step the block
bookkeeping is recounted by brute force."""
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from backend.block_manager import BlockManager
from backend.sampling_params import SamplingParams
from backend.scheduler import Scheduler
from tests.helpers import engine_without_forward

STEPS = {"total": 0}


class RecordingScheduler(Scheduler):
    """Keeps each step's SchedulerOutput for the budget check."""

    def schedule(self):
        self.last = super().schedule()
        return self.last


def build(path, num_blocks, block_size, max_seqs, budget, policy, seed, async_scheduling):
    scheduler = RecordingScheduler(BlockManager(num_blocks, block_size), max_seqs, budget, policy)
    # The config's limits only decide which requests are refused up front; the scheduler has the real ones.
    return engine_without_forward(path, num_blocks, 384, seed, scheduler=scheduler, block_size=block_size,
                                  max_num_seqs=min(max_seqs, budget), max_num_batched_tokens=budget,
                                  async_scheduling="true" if async_scheduling else "false")


def check_invariants(engine, out_tokens, budget, max_seqs):
    core = engine.core
    bm, sched = core.block_manager, core.scheduler
    # Sequences whose last token is still in flight (async scheduling) keep their blocks until it lands.
    in_flight = [s for s in (core.in_flight.seqs if core.in_flight else []) if not s.is_finished]
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
def test_random_workloads_keep_block_invariants(tiny_checkpoints, reqs, num_blocks, block_size, max_seqs, budget,
                                                policy, seed, async_scheduling):
    engine = build(tiny_checkpoints["llama"], num_blocks, block_size, max_seqs, budget, policy, seed, async_scheduling)
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
        check_invariants(engine, engine.core.scheduler.last.total_tokens, budget, max_seqs)
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
    assert engine.core.block_manager.num_free_blocks == num_blocks
    assert not any(engine.core.block_manager.ref_counts)


def test_property_tests_ran_enough_steps():
    if STEPS["total"] == 0:
        pytest.skip("the property test did not run in this session")
    print("property-test steps:", STEPS["total"])
    assert STEPS["total"] >= 10_000, STEPS["total"]
