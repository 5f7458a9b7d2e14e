"""Offline throughput: the engine directly, every request submitted at once (random weights).

usage: python bench/offline.py --shape llama3-8b --num-seqs 256 --input-len 512 512 --output-len 256 256
Prints one JSON line (same fields as the HF peer's) plus a step profile.
"""
import argparse
import json
import os
import random
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from backend.config import EngineConfig  # noqa: E402
from backend.engine import LLMEngine  # noqa: E402
from backend.sampling_params import SamplingParams  # noqa: E402
from bench.shapes import make_shape_dir  # noqa: E402


def build_engine(shape, max_num_seqs=256, max_num_batched_tokens=8192, max_model_len=2048, **extra):
    path = make_shape_dir(shape, os.path.join(tempfile.gettempdir(), "llm-bench-shapes"))
    # The core in this process unless --engine-param says otherwise: the tools time and profile its parts.
    params = dict(model=path, load_format="dummy", max_num_seqs=str(max_num_seqs),
                  max_num_batched_tokens=str(max_num_batched_tokens), max_model_len=str(max_model_len),
                  engine_core_process="false")
    params.update(extra)
    return LLMEngine(EngineConfig.from_parameters(params))


def workload(num_seqs, input_len, output_len, seed=0):
    rng = random.Random(seed)
    prompts = [[rng.randrange(10000) for _ in range(rng.randint(*input_len))] for _ in range(num_seqs)]
    outputs = [rng.randint(*output_len) for _ in range(num_seqs)]
    return prompts, outputs


def timed_steps(engine):
    """Wrap runner.run to measure the model's step time (forward + logits, synchronized) by step
    kind, against the engine's whole step."""
    stats = {"run_s": 0.0, "steps": 0, "decode_s": 0.0, "decode_steps": 0, "mixed_s": 0.0, "mixed_steps": 0,
             "mixed_tokens": 0}
    run = engine.core.runner.run

    def timed(out, batch, in_flight=None):
        t0 = time.perf_counter()
        r = run(out, batch, in_flight)
        if r.token_ids.is_cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        stats["run_s"] += dt
        stats["steps"] += 1
        kind = "decode" if out.total_tokens == len(out.seqs) else "mixed"
        stats[kind + "_s"] += dt
        stats[kind + "_steps"] += 1
        if kind == "mixed":
            stats["mixed_tokens"] += out.total_tokens
        return r
    engine.core.runner.run = timed
    return stats


def step_summary(stats, seconds):
    if not stats:
        return {}
    return dict(steps=stats["steps"], gpu_share=round(stats["run_s"] / seconds, 3),
                decode_ms_per_step=round(stats["decode_s"] / max(1, stats["decode_steps"]) * 1e3, 2),
                decode_steps=stats["decode_steps"], decode_s=round(stats["decode_s"], 2),
                mixed_s=round(stats["mixed_s"], 2), mixed_steps=stats["mixed_steps"], mixed_tokens=stats["mixed_tokens"])


def profile_steps(engine, prompts, params):
    """torch.profiler over a short run: the top kernels by GPU time."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine.generate(prompts, params)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--input-len", type=int, nargs=2, default=[512, 512])
    ap.add_argument("--output-len", type=int, nargs=2, default=[256, 256])
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="also print a torch.profiler kernel table")
    ap.add_argument("--engine-param", nargs="+", default=[], metavar="KEY=VALUE",
                    help="more engine parameters, as in config.pbtxt (e.g. quantization=fp8 kv_cache_dtype=fp8)")
    ap.add_argument("--step-profile", action="store_true",
                    help="time each step's model run by kind (synchronizes after each step: no overlap)")
    a = ap.parse_args()
    extra = dict(kv.split("=", 1) for kv in a.engine_param)
    t_load = time.perf_counter()
    engine = build_engine(a.shape, a.max_num_seqs, a.max_num_batched_tokens,
                          max_model_len=a.input_len[1] + a.output_len[1] + 16,
                          enforce_eager=str(a.enforce_eager), tensor_parallel_size=str(a.tensor_parallel_size),
                          **extra)
    t_load = time.perf_counter() - t_load
    prompts, outs = workload(a.num_seqs, a.input_len, a.output_len)
    params = [SamplingParams(temperature=a.temperature, max_tokens=o, ignore_eos=True, detokenize=False)
              for o in outs]
    engine.generate(prompts[:4], [SamplingParams(max_tokens=8, ignore_eos=True, detokenize=False)] * 4)
    stats = timed_steps(engine) if a.step_profile else {}
    torch.cuda.synchronize() if engine.config.torch_device.type == "cuda" else None
    t0 = time.perf_counter()
    results = engine.generate(prompts, params)
    dt = time.perf_counter() - t0
    n = sum(len(r.token_ids) for r in results)
    print(json.dumps(dict(engine="ours", shape=a.shape, num_seqs=a.num_seqs, input_len=a.input_len,
                          output_len=a.output_len, output_tokens=n, seconds=round(dt, 2),
                          output_tok_s=round(n / dt, 1), tensor_parallel_size=a.tensor_parallel_size, kv_blocks=engine.core.runner.num_blocks,
                          load_s=round(t_load, 1), engine_params=extra, cuda_graphs=engine.core.runner.graphs is not None,
                          async_scheduling=engine.core.async_scheduling, ms_per_output_step=round(dt / max(a.output_len) * 1e3, 2),
                          **step_summary(stats, dt))))
    if a.profile:
        profile_steps(engine, prompts[:64], [SamplingParams(max_tokens=16, ignore_eos=True, detokenize=False)] * 64)
    engine.shutdown()   # stops tensor-parallel workers


if __name__ == "__main__":
    main()
