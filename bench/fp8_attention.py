"""Decode attention over an FP8 KV cache against the same over bf16 (H100): microseconds per call as
CUDA-graph replays over copies of the batch past the L2, and K/V bytes read per second. The FP8 kernel
is timed in both tile conversions (e4m3 -> fp32 -> bf16, and e4m3 -> bf16) and over tile shapes, so that
kernels/paged_attention.py's FP8 defaults come from a measurement.

    python3 bench/fp8_attention.py [--sweep]
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import importlib  # noqa: E402
pa = importlib.import_module("kernels.paged_attention")   # the package exports a function of that name
from bench.bench_kernels import D, copies_for, graph_us, paged  # noqa: E402
from kernels.fp8 import to_fp8_ref  # noqa: E402

SHAPES = [(256, 640), (256, 1024), (64, 4096), (16, 4096), (1, 4096)]
TILES = [(tn, st, w) for tn in (64, 128) for st in (2, 3, 4) for w in (4, 8)]


def fp8_copy(batch):
    q, k, v, tables, seq_lens, qsl = batch
    k_scale, v_scale = (c.float().abs().amax().view(1) / 448 for c in (k, v))
    return (q, to_fp8_ref(k, k_scale), to_fp8_ref(v, v_scale), tables, seq_lens, qsl), k_scale, v_scale


def timed(data, scales=None, **knobs):
    sc = D ** -0.5
    kw = dict(k_scale=scales[0], v_scale=scales[1]) if scales else {}
    try:
        return graph_us([lambda b=b: pa.paged_attention_triton(*b, sc, 1, **kw, **knobs) for b in data])
    except Exception as e:  # noqa: BLE001 (out of shared memory, registers)
        print(f"# {knobs}: {type(e).__name__}", flush=True)
        return float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true", help="also tile_n x stages x warps for each conversion")
    a = ap.parse_args()
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print("| batch | ctx | bf16 us (TB/s) | fp8 via fp32 us (TB/s) | fp8 direct us (TB/s) | fp8 best swept |")
    print("|---|---|---|---|---|---|")
    for batch, ctx in SHAPES:
        bf16_bytes = 2 * batch * ctx * 8 * D * 2
        n = copies_for(bf16_bytes // 2)
        bf16 = [paged(batch, ctx, 1, seed=i) for i in range(n)]
        fp8 = [fp8_copy(b) for b in bf16]
        scales = (fp8[0][1], fp8[0][2])
        fp8 = [f[0] for f in fp8]
        t_bf16 = timed(bf16[:copies_for(bf16_bytes)])
        cells, best = [], (float("inf"), "")
        for direct in (False, True):
            pa.FP8_CONVERT_DIRECT = direct
            t = timed(fp8, scales)
            cells.append(t)
            if a.sweep:
                for tn, st, w in TILES:
                    ts = timed(fp8, scales, tile_n=tn, num_stages=st, num_warps=w)
                    if ts < best[0]:
                        best = (ts, f"{ts:.1f} at direct={direct} tile_n={tn} stages={st} warps={w}")
        pa.FP8_CONVERT_DIRECT = False
        tbs = lambda t, nbytes: f"{t:.1f} ({nbytes / (t * 1e-6) / 1e12:.2f})"  # noqa: E731
        print(f"| {batch} | {ctx} | {tbs(t_bf16, bf16_bytes)} | {tbs(cells[0], bf16_bytes / 2)} | "
              f"{tbs(cells[1], bf16_bytes / 2)} | {best[1] or '-'} |", flush=True)
        del bf16, fp8
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
