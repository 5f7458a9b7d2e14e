"""Latency-targeted steps and prompt order (issue 11): the step cost model, the budget that follows
`target_itl_ms` on a runner with a known cost, decodes never stalled by a prompt, the bound on how
often a prompt is passed over (checked by brute-force recount), and outputs unchanged by the policy."""
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from backend.block_manager import BlockManager
from backend.calibration import calibrate
from backend.core import EngineCore, EngineCoreRequest
from backend.sampling_params import SamplingParams
from backend.scheduler import Scheduler
from backend.sequence import Sequence, SequenceStatus
from backend.step_cost import StepCostModel, StepTimer
from tests.helpers import RandomLogitsRunner, engine_config, greedy, make_engine, prompt_set, run_staggered

# A made-up GPU: 2 ms per step, 4 us per token, 2 ns per (query, key) pair.
COST = (2e-3, 4e-6, 2e-9)


def true_cost(out) -> float:
    """The step's cost recomputed from what it holds (not from the scheduler's own bookkeeping)."""
    pairs = sum(n * s.num_computed_tokens + n * (n + 1) // 2 for s, n in zip(out.seqs, out.num_new_tokens))
    return COST[0] + COST[1] * sum(out.num_new_tokens) + COST[2] * pairs


# ---- the cost model --------------------------------------------------------------------------------
def test_cost_model_recovers_a_known_cost_and_stays_non_negative():
    model, rng = StepCostModel(), random.Random(0)
    assert not model.fitted
    for _ in range(200):
        tokens, pairs = rng.randrange(1, 8192), rng.randrange(0, 50_000_000)
        noise = 1 + rng.uniform(-0.02, 0.02)
        model.observe(tokens, pairs, noise * (COST[0] + COST[1] * tokens + COST[2] * pairs))
    assert model.fitted
    for tokens, pairs in [(1, 0), (256, 300_000), (2048, 4_000_000), (8192, 40_000_000)]:
        want = COST[0] + COST[1] * tokens + COST[2] * pairs
        assert model.predict(tokens, pairs) == pytest.approx(want, rel=0.05)
    # steps whose time does not grow with the pairs: no negative weight for them
    flat = StepCostModel()
    for i in range(64):
        flat.observe(100 + i, 10_000 * (64 - i), 1e-3 + 1e-6 * (100 + i))
    assert (flat.coef >= 0).all() and flat.predict(100, 0) > 0


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 5000), st.integers(0, 20_000_000), st.integers(0, 4000), st.integers(1, 3000),
       st.floats(1e-3, 0.05))
def test_max_chunk_is_the_largest_that_fits(tokens, pairs, cached, limit, seconds):
    model = StepCostModel()
    model.coef = np.array(COST) * np.array([1, 1e3, 1e6])   # in the model's feature units

    def fits(n):
        return model.predict(tokens + n, pairs + n * cached + n * (n + 1) // 2) <= seconds
    n = model.max_chunk(tokens, pairs, cached, limit, seconds)
    want = max([k for k in range(0, limit + 1) if k == 0 or fits(k)])
    assert n == want


# ---- the budget follows the target on a runner of known cost ---------------------------------------
class ClockedRunner(RandomLogitsRunner):
    """Random logits; each step advances a simulated clock by its true cost."""

    def __init__(self, vocab, num_blocks):
        super().__init__(vocab, num_blocks)
        self.now, self.steps = 0.0, []

    def run(self, out, batch, in_flight=None):
        cost = true_cost(out)
        self.now += cost
        unfinished_chunk = any(s.num_computed_tokens + n < s.num_tokens for s, n in zip(out.seqs, out.num_new_tokens))
        left_behind = bool(self.scheduler.waiting) or unfinished_chunk   # prompt work this step could have taken
        self.steps.append((out, cost, left_behind, out.num_prefill_tokens))
        return super().run(out, batch, in_flight)


def clocked_core(path, num_blocks=16384, **params):
    config = engine_config(path, **params).resolve()
    runner = ClockedRunner(300, num_blocks)
    core = EngineCore(config, set(), runner=runner, scheduler=Scheduler.for_config(config, num_blocks),
                      step_timer=StepTimer(torch.device("cpu"), clock=lambda: runner.now))
    runner.scheduler = core.scheduler
    return core, runner


def request(rid, prompt_len, max_tokens, rng):
    ids = [rng.randrange(2, 300) for _ in range(prompt_len)]
    return EngineCoreRequest(rid, ids, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))


def test_budget_follows_the_target(tiny_checkpoints):
    """Long prompts queued beside decodes: once the model is fitted, every step is within the
    target, and steps that left prompt work behind used the time (a larger target, more tokens)."""
    prompt_tokens = {}
    for target_ms in (8, 16):
        core, runner = clocked_core(tiny_checkpoints["llama"], max_num_batched_tokens=8192, max_num_seqs=64,
                                    target_itl_ms=target_ms, max_model_len=8192)
        rng = random.Random(1)
        for i in range(48):
            core.add_request(request(f"r{i}", rng.randrange(1500, 4000), 32, rng))
        while core.has_unfinished():
            core.step()
        fitted = runner.steps[2 * StepCostModel.MIN_SAMPLES:]   # past the first fits
        target = target_ms / 1e3
        assert all(cost <= target * 1.05 for _, cost, _, _ in fitted)
        busy = [cost for _, cost, left_behind, _ in fitted if left_behind]
        assert busy and min(busy) >= 0.9 * target
        prompt_tokens[target_ms] = np.mean([p for *_, p in fitted if p])
    assert prompt_tokens[16] > 1.5 * prompt_tokens[8]


def test_a_long_prompt_never_delays_decodes_beyond_the_target(tiny_checkpoints):
    """Chats and long documents arriving at random steps: every running decode is in every step,
    and every step is within the target unless it holds only decodes and the minimum prompt chunk."""
    target = 10e-3
    core, runner = clocked_core(tiny_checkpoints["llama"], max_num_batched_tokens=8192, max_num_seqs=64,
                                target_itl_ms=target * 1e3, max_model_len=8192)
    sched, rng = core.scheduler, random.Random(2)
    schedule = sched.schedule

    def checked_schedule():
        decodes = [s for s in sched.running if s.num_tokens - s.num_computed_tokens == 1]
        out = schedule()
        assert not out.preempted
        assert {id(s) for s in decodes} <= {id(s) for s in out.seqs}, "a decode was left out of a step"
        return out
    sched.schedule = checked_schedule
    arrivals = sorted((rng.randrange(0, 300), i) for i in range(60))
    step = 0
    while arrivals or core.has_unfinished():
        while arrivals and arrivals[0][0] <= step:
            _, i = arrivals.pop(0)
            long_doc = rng.random() < 0.2
            core.add_request(request(f"r{i}", rng.randrange(2000, 6000) if long_doc else rng.randrange(20, 200),
                                     rng.randrange(2, 5) if long_doc else rng.randrange(10, 60), rng))
        core.step()
        step += 1
    for out, cost, _, prefill in runner.steps[2 * StepCostModel.MIN_SAMPLES:]:
        assert cost <= target * 1.05 or prefill <= sched.min_prefill_tokens
    assert max(cost for _, cost, _, _ in runner.steps) > 0   # the clock ran


# ---- the bound on passing a prompt over ------------------------------------------------------------
workload = st.lists(st.tuples(st.integers(1, 120), st.integers(1, 12), st.integers(0, 30), st.integers(0, 2)),
                    min_size=2, max_size=30)


@settings(max_examples=150, deadline=None)
@given(workload, st.integers(0, 4), st.sampled_from(["fcfs", "priority"]), st.integers(8, 60),
       st.integers(1, 8), st.integers(8, 96), st.randoms(use_true_random=False))
def test_no_prompt_is_passed_over_more_than_the_bound(reqs, bound, policy, num_blocks, max_seqs, budget, rnd):
    """Brute-force recount: a prompt (waiting, or running with more than one token to compute)
    left out of a step while a later arrival of its rank or lower got prompt tokens is passed over;
    no prompt is passed over more than max_prefill_bypass times, and every request finishes."""
    block_size = 4
    budget = max(budget, max_seqs)
    sched = Scheduler(BlockManager(num_blocks, block_size), max_seqs, budget, policy, max_prefill_bypass=bound)
    reqs = [r for r in reqs if -(-(r[0] + r[1]) // block_size) <= num_blocks]
    seqs = [Sequence(str(i), list(range(p)), p, SamplingParams(max_tokens=m, priority=pr))
            for i, (p, m, _, pr) in enumerate(reqs)]
    arrivals = sorted((delay, i) for i, (_, _, delay, _) in enumerate(reqs))
    passed = {id(s): 0 for s in seqs}
    rank = (lambda s: s.priority) if policy == "priority" else (lambda s: 0)
    step = done = 0
    while done < len(seqs):
        assert step < 5000, "no progress"
        while arrivals and arrivals[0][0] <= step:
            sched.add(seqs[arrivals.pop(0)[1]])
        prompts = [*sched.waiting, *(s for s in sched.running if s.num_tokens - s.num_computed_tokens > 1)]
        out = sched.schedule()
        served = [s for s in out.seqs if any(s is p for p in prompts)]
        for p in prompts:
            if not any(p is s for s in served) and any(s.arrival > p.arrival and rank(s) >= rank(p) for s in served):
                passed[id(p)] += 1
        assert out or not sched.has_work() or arrivals
        sched.advance(out)
        for s, n in zip(out.seqs, out.num_new_tokens):
            if s.num_computed_tokens == s.num_tokens:
                s.token_ids.append(rnd.randrange(1000))
                if s.num_output_tokens >= s.params.max_tokens:
                    sched.finish(s, "length")
                    done += 1
        step += 1
    assert max(passed.values(), default=0) <= bound
    assert all(s.status == SequenceStatus.FINISHED for s in seqs)


def test_short_prompts_go_first_and_a_long_one_is_not_starved():
    """Shortest first: short prompts queued behind a long one start before it; once passed over
    max_prefill_bypass times, the long one goes before later arrivals."""
    sched = Scheduler(BlockManager(4096, 16), 8, 30, max_prefill_bypass=3)   # a short prompt fills a step
    long = Sequence("long", list(range(1000)), 1000, SamplingParams(max_tokens=1))
    sched.add(long)
    shorts = []
    for i in range(6):   # one short prompt arrives every step
        short = Sequence(f"s{i}", list(range(2000 + 30 * i, 2030 + 30 * i)), 30, SamplingParams(max_tokens=1))
        sched.add(short)
        shorts.append(short)
        out = sched.schedule()
        sched.advance(out)
        for s in out.seqs:
            if s.num_computed_tokens == s.num_tokens:
                sched.finish(s, "length")
        if i < 3:
            assert out.seqs[0] is short and long.prefill_bypassed == i + 1
        else:
            assert out.seqs[0] is long, "aged: the long prompt goes before later arrivals"


# ---- outputs do not depend on the policy -----------------------------------------------------------
def test_greedy_outputs_unchanged_by_order_and_target(tiny_checkpoints):
    path = tiny_checkpoints["llama"]
    prompts = prompt_set(8)
    runs = [run_staggered(make_engine(path, max_num_batched_tokens=32, max_num_seqs=8, **params), prompts, greedy(10), every=1)
            for params in ({"max_prefill_bypass": 0}, {"max_prefill_bypass": 4}, {"target_itl_ms": 0.001})]
    texts = [[(o.token_ids, o.text) for o in run] for run in runs]
    assert texts[0] == texts[1] == texts[2]


def test_an_aged_prompt_without_a_seat_makes_room():
    """One seat: a shorter later prompt starts first; the long one, aged, would wait for a seat that
    the stalled shorter prompt never frees: the shorter one is preempted instead of a deadlock."""
    sched = Scheduler(BlockManager(64, 4), 1, 8, max_prefill_bypass=1)
    long = Sequence("long", list(range(100)), 100, SamplingParams(max_tokens=1))
    short = Sequence("short", list(range(200, 240)), 40, SamplingParams(max_tokens=1))
    sched.add(long)
    sched.add(short)
    out = sched.schedule()
    assert out.seqs == [short] and long.prefill_bypassed == 1
    sched.advance(out)
    out = sched.schedule()
    assert out.seqs == [long] and out.preempted == [short]


def test_step_samples_count_every_step_and_its_tokens(tiny_checkpoints):
    """What the step metrics observe: one (tokens, seconds) per step that ran, tokens as scheduled."""
    engine = make_engine(tiny_checkpoints["llama"], max_num_batched_tokens=16, max_num_seqs=4)
    scheduled = []
    schedule = engine.core.scheduler.schedule

    def recording_schedule():
        out = schedule()
        if out:
            scheduled.append(out.total_tokens)
        return out
    engine.core.scheduler.schedule = recording_schedule
    for i, prompt in enumerate(prompt_set(3)):
        engine.add_request(f"r{i}", None, greedy(5), prompt_token_ids=prompt)
    while engine.has_unfinished():
        engine.step()
    samples = engine.take_step_samples()
    assert [tokens for tokens, _ in samples] == scheduled and all(seconds > 0 for _, seconds in samples)
    assert engine.take_step_samples() == []


def test_calibration_fits_the_cost_model_before_any_request(tiny_checkpoints):
    """Synthetic steps through the runner seed the model: it predicts the runner's known cost, and
    each synthetic step's attention pairs are those recounted from its sequences."""
    config = engine_config(tiny_checkpoints["llama"], max_num_batched_tokens=2048, max_num_seqs=64,
                           max_model_len=4096).resolve()
    runner = ClockedRunner(300, 1000)
    runner.scheduler = Scheduler.for_config(config, 1000)
    model = StepCostModel()
    calibrate(runner, model, StepTimer(torch.device("cpu"), clock=lambda: runner.now), config)
    assert model.fitted
    for out, cost, _, _ in runner.steps:
        assert model.predict(out.total_tokens, out.attention) == pytest.approx(cost, rel=1e-3)
        assert out.total_tokens <= config.max_num_batched_tokens
    shapes = {(len(out.seqs) - bool(out.num_prefill_tokens), out.num_prefill_tokens) for out, *_ in runner.steps}
    assert {d for d, _ in shapes} == {1, 32, 64} and max(p for _, p in shapes) == 2048 - 1
