"""Mixed steps (decodes + a prompt chunk) eager vs on a mixed CUDA graph, random weights.

usage: python bench/mixed_step.py --shape qwen3-0.6b
For each case: host ms (the call's own time, no sync), GPU ms (CUDA events around the call), and
wall ms per step (call + sync), as medians over repeated steps; plus the start-up time and memory
that graph capture adds. Prints one JSON line per case.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from backend.calibration import synthetic_step  # noqa: E402
from backend.cuda_graph import CUDAGraphs  # noqa: E402
from bench.offline import build_engine  # noqa: E402

CASES = [(64, 1024, 512), (200, 1024, 1536), (200, 1024, 7900), (200, 1024, 0)]   # decodes, context, chunk


@torch.inference_mode()
def time_steps(runner, out, iters):
    for _ in range(3):
        runner._forward(out, None)
    torch.cuda.synchronize()
    host, gpu, wall = [], [], []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        a.record()
        runner._forward(out, None)
        b.record()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        host.append((t1 - t0) * 1e3)
        wall.append((t2 - t0) * 1e3)
        gpu.append(a.elapsed_time(b))
    return {k: round(statistics.median(v), 3) for k, v in (("host_ms", host), ("gpu_ms", gpu), ("wall_ms", wall))}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3-0.6b")
    ap.add_argument("--iters", type=int, default=20)
    a = ap.parse_args()
    t0 = time.perf_counter()
    engine = build_engine(a.shape, max_num_seqs=256, max_num_batched_tokens=8192, max_model_len=16384)
    build_s = time.perf_counter() - t0
    runner = engine.core.runner
    graphs = runner.graphs
    # capture again (kernels are compiled by now): the time and pool memory the graphs cost
    torch.cuda.synchronize()
    reserved = torch.cuda.memory_reserved()
    t0 = time.perf_counter()
    again = CUDAGraphs(runner.model, runner.kv_caches, 256, 8192, runner.block_size, graphs.tables.shape[1],
                       runner.device)
    again.capture()
    print(json.dumps(dict(shape=a.shape, engine_build_s=round(build_s, 1), capture_s=round(time.perf_counter() - t0, 2),
                          graphs=len(again.graphs), mixed_graphs=len(again.token_buckets),
                          graph_pool_mib=round((torch.cuda.memory_reserved() - reserved) / 2**20))), flush=True)
    del again
    for num_decodes, context, chunk in CASES:
        out, _ = synthetic_step(num_decodes, context, chunk, runner.block_size, runner.num_blocks)
        key = graphs.select(out.total_tokens, len(out.seqs))
        graphed = time_steps(runner, out, a.iters)
        runner.graphs = None
        eager = time_steps(runner, out, a.iters)
        runner.graphs = graphs
        print(json.dumps(dict(decodes=num_decodes, context=context, chunk=chunk, tokens=out.total_tokens, graph=key,
                              eager=eager, graphed=graphed,
                              speedup_wall=round(eager["wall_ms"] / graphed["wall_ms"], 2))), flush=True)


if __name__ == "__main__":
    main()
