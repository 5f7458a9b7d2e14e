"""Scheduler and block manager invariants under random workloads (hypothesis), checked every step
against a brute-force recount of the block tables."""
from collections import Counter

from hypothesis import given, settings, strategies as st

from backend.block_manager import BlockManager, cdiv
from backend.sampling_params import SamplingParams
from backend.scheduler import Scheduler
from backend.sequence import Sequence, SequenceStatus


def check_invariants(sched: Scheduler, bm: BlockManager, max_seqs: int):
    owners = Counter(b for s in sched.running for b in s.block_table)
    for s in sched.waiting:
        assert s.block_table == [], "a waiting sequence holds no blocks"
    assert all(bm.ref_counts[b] == n for b, n in owners.items())
    assert sum(bm.ref_counts) == sum(owners.values())
    free = set(bm.free_block_ids)
    assert len(free) == len(bm.free_block_ids), "a block is free twice"
    assert not free & set(owners), "a block is both free and referenced"
    assert len(free) + len(owners) == bm.num_blocks, "no block is lost"
    assert len(sched.running) <= max_seqs


def check_step(out, bm: BlockManager, budget: int):
    assert out.total_tokens <= budget
    for s, n in zip(out.seqs, out.num_new_tokens):
        assert n >= 1 and s.status == SequenceStatus.RUNNING
        assert len(s.block_table) == cdiv(s.num_computed_tokens + n, bm.block_size)


workload = st.lists(st.tuples(st.integers(1, 60), st.integers(1, 20), st.integers(0, 4)), min_size=1, max_size=24)


@settings(max_examples=120, deadline=None)
@given(workload, st.integers(4, 40), st.sampled_from([4, 8, 16]), st.integers(1, 8), st.integers(1, 64),
       st.randoms(use_true_random=False))
def test_random_workload(reqs, num_blocks, block_size, max_seqs, budget, rnd):
    bm = BlockManager(num_blocks, block_size)
    sched = Scheduler(bm, max_seqs, budget)
    # Requests that can never fit are refused at admission by the engine; keep only those that fit.
    reqs = [r for r in reqs if cdiv(r[0] + r[1], block_size) <= num_blocks]
    arrivals = sorted((delay, i) for i, (_, _, delay) in enumerate(reqs))
    seqs = [Sequence(str(i), list(range(p)), p, SamplingParams(max_tokens=m)) for i, (p, m, _) in enumerate(reqs)]
    step, done = 0, 0
    while done < len(seqs):
        while arrivals and arrivals[0][0] <= step:
            sched.add(seqs[arrivals.pop(0)[1]])
        out = sched.schedule()
        check_invariants(sched, bm, max_seqs)
        check_step(out, bm, budget)
        assert out or not sched.has_work() or arrivals, "a step with work in the queue must schedule something"
        sched.advance(out)
        for s, n in zip(out.seqs, out.num_new_tokens):
            if s.num_computed_tokens == s.num_tokens:
                s.token_ids.append(rnd.randrange(1000))
                if s.num_output_tokens >= s.params.max_tokens or rnd.random() < 0.05:
                    sched.finish(s, "length")
                    done += 1
        check_invariants(sched, bm, max_seqs)
        step += 1
        assert step < 10_000, "no progress"
    assert bm.num_free_blocks == bm.num_blocks and not any(bm.ref_counts)
