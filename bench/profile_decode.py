"""Where a decode step's time goes on the GPU host: wall time per step, the host's share, the GPU's
busy time, kernels per step and the top kernels (torch.profiler), with every running sequence
decoding (prompts done) at a fixed context.

usage: python3 bench/profile_decode.py --shape qwen3-0.6b --num-seqs 256 --context 1024 [--steps 50] [--fp32-logits]
Prints a JSON line and the profiler's kernel table (the LM head's GEMM, the logits' fp32 copy, if
any, and the argmax are rows of it).
"""
import argparse
import json
import os
import queue
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from backend.sampling_params import CUMULATIVE, DELTA, SamplingParams  # noqa: E402
from bench.offline import build_engine, workload  # noqa: E402
from bench.shapes import SHAPES, params_of  # noqa: E402


def host_wait_timer(engine):
    """Seconds the engine thread spends waiting for step results (the GPU's share it cannot hide)."""
    from backend import sampler
    waited = [0.0]
    original = sampler.StepResult.host_token_ids

    def timed(self):
        t = time.perf_counter()
        ids = original(self)
        waited[0] += time.perf_counter() - t
        return ids
    sampler.StepResult.host_token_ids = timed
    return waited


def step_probe(engine):
    """Per step: tokens scheduled, and seconds spent in Python's garbage collector."""
    import gc
    record = {"tokens": 0, "gc_s": 0.0, "gc_gen": -1}
    started = [0.0]

    def on_gc(phase, info):
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            record["gc_s"] += time.perf_counter() - started[0]
            record["gc_gen"] = max(record["gc_gen"], info["generation"])
    gc.callbacks.append(on_gc)
    schedule = engine.core.scheduler.schedule

    def counted():
        out = schedule()
        record["tokens"] = out.total_tokens if out else 0
        return out
    engine.core.scheduler.schedule = counted
    return record


def host_profile(engine, steps: int, rows: int):
    """The host's Python per step, by function (cProfile; its overhead inflates the times)."""
    import cProfile
    import pstats
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        engine.step()
    profiler.disable()
    stats = pstats.Stats(profiler)
    stats.sort_stats("tottime").print_stats(rows)


def segment_timer(engine):
    """Wall seconds per part of the engine thread's step (perf_counter around each; ~1 us overhead each)."""
    totals = {}
    core = engine.core

    def timed(owner, name, label):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                totals[label] = totals.get(label, 0.0) + time.perf_counter() - t
        setattr(owner, name, wrapper)
    timed(core.scheduler, "schedule", "schedule")
    timed(core.runner, "run", "runner.run (staging, launches)")
    timed(core, "_update", "update (incl. waiting for tokens)")
    timed(core, "_outputs", "core outputs")
    timed(engine, "_handle", "front (output processor, callbacks)")
    return totals


LABELS = ("lm_head", "sampler")   # profiler ranges around the runner's compute_logits and sample_step


def label_logits_and_sampling(runner):
    """Put the LM head (compute_logits) and the sampler (sample_step: the fp32 copy, if any, and the
    argmax) in profiler ranges of their own, so that their GPU time per step can be read apart."""
    def labelled(owner, name, label):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            with torch.profiler.record_function(label):
                return original(*args, **kwargs)
        setattr(owner, name, wrapper)
    labelled(runner.model, "compute_logits", LABELS[0])
    labelled(runner.sampler, "sample_step", LABELS[1])


def labelled_gpu_ms(prof, steps: int) -> dict:
    """GPU ms per step of the kernels launched inside each LABELS range."""
    totals = {label: 0.0 for label in LABELS}
    for e in prof.events():
        if e.name in totals and e.device_type == torch.autograd.DeviceType.CPU:
            totals[e.name] += e.device_time_total
    return {f"{label}_gpu_ms_per_step": round(us / steps / 1e3, 3) for label, us in totals.items()}


def kernel_stats(prof, steps: int) -> dict:
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and e.name not in LABELS]
    kernels = [e for e in events if "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]
    busy_us = sum(e.time_range.elapsed_us() for e in kernels)
    return {"kernels_per_step": round(len(kernels) / steps, 1), "gpu_kernel_ms_per_step": round(busy_us / steps / 1e3, 3),
            "copies_per_step": round((len(events) - len(kernels)) / steps, 1)}


def chain_table(prof, steps: int) -> list[dict]:
    """Where the GPU's critical path goes: kernels in the order they finish, each charged the time from the
    previous kernel's end to its own (under PDL a kernel starts before the one it waits for ends, so its own
    duration overlaps; the end-to-end gaps add up to the step). Keyed by the kernel and the two that finished
    before it (which tells e.g. qkv's GEMM, after a down projection and an RMSNorm, from gate_up's)."""
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                      and e.name not in LABELS and "memcpy" not in e.name.lower() and "memset" not in e.name.lower()),
                     key=lambda e: e.time_range.end)
    short = [e.name.split("<")[0][:40] for e in kernels]
    charged: dict[tuple, list[float]] = {}
    for i in range(2, len(kernels)):
        gap = kernels[i].time_range.end - kernels[i - 1].time_range.end
        charged.setdefault((short[i - 2], short[i - 1], short[i]), []).append(gap)
    rows = [dict(kernel=k[2], after=f"{k[0]} > {k[1]}", us_per_step=round(sum(g) / steps, 1),
                 per_step=round(len(g) / steps, 1), us_median=round(sorted(g)[len(g) // 2], 2))
            for k, g in charged.items()]
    return sorted(rows, key=lambda r: -r["us_per_step"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3-0.6b")
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--fp32-logits", action="store_true",
                    help="greedy steps too take the argmax of an fp32 copy of the logits (the way before)")
    ap.add_argument("--table", type=int, default=20, help="rows of the kernel table (0: none)")
    ap.add_argument("--serving-like", action="store_true",
                    help="as the server runs requests: DELTA outputs, detokenized, a callback per output")
    ap.add_argument("--chain", type=int, default=0,
                    help="also print the N largest shares of the GPU's critical path (chain_table)")
    ap.add_argument("--cprofile", type=int, default=0, help="also print the engine thread's top N functions (cProfile)")
    ap.add_argument("--engine-param", nargs="+", default=[], metavar="KEY=VALUE",
                    help="more engine parameters, as in config.pbtxt (e.g. quantization=fp8 kv_cache_dtype=fp8)")
    a = ap.parse_args()
    engine = build_engine(a.shape, max(a.num_seqs, 1), 8192, max_model_len=a.context + 4 * a.steps + 64,
                          enforce_eager=str(a.enforce_eager), **dict(kv.split("=", 1) for kv in a.engine_param))
    prompts, _ = workload(a.num_seqs, (a.context, a.context), (1, 1))
    params = SamplingParams(temperature=a.temperature, max_tokens=4 * a.steps + 32, ignore_eos=True,
                            detokenize=a.serving_like, output_kind=DELTA if a.serving_like else CUMULATIVE)
    if a.fp32_logits:
        params.__dict__["needs_fp32_logits"] = True   # what the cached property would hold for a sampled request
    sink = queue.SimpleQueue()
    for i, p in enumerate(prompts):
        engine.add_request(f"p{i}", "", params, prompt_token_ids=p, on_output=sink.put if a.serving_like else None)
    sched = engine.core.scheduler
    while engine.has_unfinished() and (engine._inbox or sched.waiting or any(
            s.num_computed_tokens < s.num_prompt_tokens for s in sched.running)):
        engine.step()
    for _ in range(10):
        engine.step()
    dev = engine.config.torch_device

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    waited = host_wait_timer(engine)
    probe = step_probe(engine)
    segments = segment_timer(engine)
    sync()
    t = time.perf_counter()
    step_ms = []
    for _ in range(a.steps):
        probe.update(gc_s=0.0, gc_gen=-1)
        t_step = time.perf_counter()
        engine.step()
        step_ms.append(((time.perf_counter() - t_step) * 1e3, probe["tokens"], round(probe["gc_s"] * 1e3, 1), probe["gc_gen"]))
    sync()
    wall = (time.perf_counter() - t) / a.steps
    step_ms.sort()
    measured, slowest = list(step_ms), step_ms[-5:]
    step_ms = [m[0] for m in step_ms]
    wait = waited[0] / a.steps
    measured_segments = dict(segments)
    from torch.profiler import ProfilerActivity, profile
    label_logits_and_sampling(engine.core.runner)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(a.steps):
            engine.step()
        sync()
    cfg = SHAPES[a.shape]
    weight_ms = params_of(a.shape) * 2 / 3.01e12 * 1e3
    kv_bytes = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * 2 * a.context * a.num_seqs
    bound_ms = weight_ms + kv_bytes / 3.01e12 * 1e3
    print(json.dumps(dict(shape=a.shape, num_seqs=a.num_seqs, context=a.context, eager=a.enforce_eager,
                          ms_per_step=round(wall * 1e3, 3), step_ms_p50=round(step_ms[len(step_ms) // 2], 3),
                          gc_ms=round(sum(m[2] for m in measured), 1),
                          slowest_steps=[(round(m, 1), tokens, gc_ms, gen) for m, tokens, gc_ms, gen in slowest],
                          running=len(engine.core.scheduler.running), host_busy_ms=round((wall - wait) * 1e3, 3),
                          waiting_for_gpu_ms=round(wait * 1e3, 3), bound_ms=round(bound_ms, 3),
                          weight_read_ms=round(weight_ms, 3), of_bound=round(bound_ms / wall / 1e3, 3),
                          host_ms_per_step={k: round(v / a.steps * 1e3, 3) for k, v in measured_segments.items()},
                          **kernel_stats(prof, a.steps), **labelled_gpu_ms(prof, a.steps))), flush=True)
    for row in chain_table(prof, a.steps)[:a.chain]:
        print(json.dumps(row))
    if a.cprofile:
        host_profile(engine, a.steps, a.cprofile)
    if a.table:
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=a.table, max_name_column_width=70))
    engine.shutdown()


if __name__ == "__main__":
    main()
