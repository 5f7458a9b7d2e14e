"""Engine-core benchmarks on the CPU (issue: engine core at vLLM class).

1. Scheduler + block bookkeeping time per step with 256 and 1024 running sequences (no forward).
2. KV waste on a mixed workload, and KV blocks saved by sharing for n=4 and beam width 4.
3. Time to first token of a repeated long prompt with and without prefix caching (default model).

usage: python bench/bench_engine_core.py [--model PATH]      prints markdown tables
"""
import argparse
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from backend.block_manager import BlockManager  # noqa: E402
from backend.config import EngineConfig  # noqa: E402
from backend.engine import LLMEngine  # noqa: E402
from backend.sampling_params import SamplingParams  # noqa: E402
from backend.scheduler import Scheduler  # noqa: E402
from backend.sequence import Sequence  # noqa: E402
import tests.helpers  # noqa: E402  (the engine with a stand-in for the forward pass)

DEFAULT_MODEL = os.path.join(os.path.dirname(__file__), "..", "model_repository", "llm", "tiny-shakespeare")


def scheduler_step_time(num_seqs: int, steps: int = 300) -> float:
    """Mean ms per step of schedule + advance + append + finish/replace, all sequences decoding."""
    rng = random.Random(0)
    bm = BlockManager(num_seqs * 80, 16)
    sched = Scheduler(bm, num_seqs, 8192)

    prompts = [[rng.randrange(1, 30000) for _ in range(rng.randint(100, 1000))] for _ in range(64)]

    def new_seq(i):
        prompt = prompts[i % len(prompts)]
        seq = Sequence(str(i), prompt, len(prompt), SamplingParams(max_tokens=rng.randint(50, 300)))
        sched.add(seq)
        return seq

    for i in range(num_seqs):
        new_seq(i)
    while sched.waiting:           # prefill everything first: we time the decode steady state
        sched.advance(sched.schedule())
    for s in sched.running:
        s.token_ids.append(1)
    times, next_id = [], num_seqs
    for _ in range(steps):
        t0 = time.perf_counter()
        out = sched.schedule()
        sched.advance(out)
        for seq in out.seqs:
            if seq.num_computed_tokens == seq.num_tokens:
                seq.token_ids.append(seq.num_tokens % 30000)
                if seq.num_output_tokens >= seq.params.max_tokens:
                    sched.finish(seq, "length")
                    new_seq(next_id)
                    next_id += 1
        times.append(time.perf_counter() - t0)
    return statistics.mean(times[20:]) * 1e3


def kv_waste(model) -> float:
    engine = tests.helpers.engine_without_forward(model, 4000, max_num_seqs="128")
    rng = random.Random(1)
    for i in range(300):
        ids = [rng.randrange(2, 4000) for _ in range(rng.randint(20, 700))]
        engine.add_request(str(i), "", SamplingParams(max_tokens=rng.randint(10, 300), ignore_eos=True),
                           prompt_token_ids=ids)
    wastes = []
    while engine.has_unfinished():
        engine.step()
        stats = engine.core.block_manager.memory_stats(engine.core.scheduler.running)
        if stats["allocated_slots"]:
            wastes.append((stats["allocated_slots"], stats["used_slots"]))
    return 1 - sum(u for _, u in wastes) / sum(a for a, _ in wastes)


def sharing(model, params: SamplingParams, prompt_len=512):
    """Peak KV blocks of one request with sharing, vs the blocks its sequences would hold unshared."""
    engine = tests.helpers.engine_without_forward(model, 2000)
    engine.add_request("x", "", params, prompt_token_ids=[random.randrange(2, 4000) for _ in range(prompt_len)])
    peak = (0, 0)
    while engine.has_unfinished():
        engine.step()
        stats = engine.core.block_manager.memory_stats(engine.core.scheduler.running)
        if stats["blocks"] + stats["blocks_saved_by_sharing"] > sum(peak):
            peak = (stats["blocks"], stats["blocks_saved_by_sharing"])
    return peak


def ttft(model, caching: bool, prompt_len=1000, repeats=3) -> float:
    engine = LLMEngine(EngineConfig.from_parameters({"model": model, "device": "cpu",
                                                     "enable_prefix_caching": str(caching)}))
    ids = [random.Random(2).randrange(2, 4000) for _ in range(prompt_len)]
    engine.generate([ids], SamplingParams(max_tokens=1))    # first time: fills the cache (if on)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        engine.generate([ids], SamplingParams(max_tokens=1))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=DEFAULT_MODEL)
    a = ap.parse_args()
    print("| running seqs | scheduler + blocks, ms/step |\n|---|---|")
    for n in (256, 1024):
        print(f"| {n} | {scheduler_step_time(n):.3f} |")
    print(f"\nKV waste, 300 requests, prompts U[20,700], outputs U[10,300], block 16: {kv_waste(a.model):.2%}\n")
    print("| request (prompt 512, output 64) | peak blocks held | blocks without sharing | saved |\n|---|---|---|---|")
    for name, p in [("n=4 sampling", SamplingParams(n=4, temperature=1.0, max_tokens=64, ignore_eos=True)),
                    ("beam width 4", SamplingParams(use_beam_search=True, n=4, max_tokens=64, ignore_eos=True))]:
        held, saved = sharing(a.model, p)
        print(f"| {name} | {held} | {held + saved} | {saved / (held + saved):.0%} |")
    on, off = ttft(a.model, True), ttft(a.model, False)
    print(f"\n| TTFT, repeated 1000-token prompt | ms |\n|---|---|\n| prefix caching off | {off:.1f} |\n"
          f"| prefix caching on | {on:.1f} |")


if __name__ == "__main__":
    main()
