"""Causal prefill attention on one CUDA GPU: the paged kernel's tile-loop variants and tile configs against
torch SDPA (flash) on dense tensors; prints a markdown table.

    python3 bench/prefill_attention.py                 # every variant, bf16 cache (about 4 minutes on an H100)
    python3 bench/prefill_attention.py --fp8           # the same over an FP8 (e4m3) cache
    python3 bench/prefill_attention.py --variants off,fa2 --configs 128x64x8x3,128x128x8x2

Shapes are bench_kernels.prefill_rows' (Llama-3-8B heads: 32 q, 8 kv, head_dim 128, bf16, block size 16;
sequences x tokens 16 x 1024, 4 x 4096, 2 x 8192, each whole prompt new). The variants are combinations of
paged_attention_triton's variant knobs (kernels.paged_attention.VARIANT_KNOBS); the main ones run over
a grid of (block_m, tile_n, num_warps, num_stages), the one-knob ones over a few configs. Each row gives
TFLOP/s (causal FLOPs, 4 * Hq * D * n^2 / 2 per sequence, over the do_bench median), its ratio to SDPA,
the compiled kernel's registers and local-memory (spill) bytes per thread, and the max abs difference from
SDPA's output on the first shape (bf16 rounding gives ~1e-2; a wrong variant shows far more). Configs that
do not fit (out of shared memory, say) print why and are left out of the table. With --fp8, SDPA attends
the dequantized cache (its error column still measures the kernel alone) and its times are over bf16.
Run the GPU tests (pytest tests/kernels/test_paged_attention.py) first: a variant that faulted here would
spoil the CUDA context for every config after it.
"""
import argparse
import importlib
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.bench_kernels import BS, D, DT, HKV, HQ, dense_kv, ms, paged  # noqa: E402
from kernels.fp8 import to_fp8_ref  # noqa: E402

pa = importlib.import_module("kernels.paged_attention")   # the package exports a function of that name

SHAPES = [(16, 1024), (4, 4096), (2, 8192)]   # (sequences, tokens); the table is sorted by the second
SORT_SHAPE = 1

FA2 = dict(fma_softmax=True, k_row_major=True, dot_acc=True)
# name -> knobs, each variant spelled out whole (a knob left out is off, not PREFILL_VARIANT's); "off" is the
# loop before the variants; the shipped default (heuristic config, PREFILL_VARIANT) runs first as "shipped"
VARIANTS = {
    "off": {},
    "fma": dict(fma_softmax=True),
    "k_rows": dict(k_row_major=True),
    "dot_acc": dict(dot_acc=True),
    "early_v": dict(early_v=True),
    "hoist": dict(hoist_table=True),
    "prefetch": dict(prefetch_table=True),
    "reverse": dict(reverse_tiles=True),
    "fa2": FA2,
    "fa2+hoist": dict(FA2, hoist_table=True),
    "fa2+prefetch": dict(FA2, prefetch_table=True),
    "fa2+early_v": dict(FA2, early_v=True),
    "fa2+reverse": dict(FA2, reverse_tiles=True),
    "all": dict.fromkeys(pa.VARIANT_KNOBS, True),
}
VARIANTS = {name: {**dict.fromkeys(pa.VARIANT_KNOBS, False), **knobs} for name, knobs in VARIANTS.items()}
# (block_m, tile_n, num_warps, num_stages). 128 rows (32 tokens x 4 heads) on 4 warps was the default until the H100 sweep;
# compiled for sm_90 it spills (255 registers), so most of the grid is 8 warps or 64 rows.
WIDE_GRID = [(128, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2),
             (128, 128, 8, 3), (64, 64, 4, 3), (64, 64, 4, 4), (64, 128, 4, 2), (256, 64, 8, 3)]
NARROW_GRID = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2)]
WIDE_VARIANTS = ("off", "fa2", "fa2+hoist", "all")   # the rest run over NARROW_GRID


def shape_name(shape):
    return f"{shape[0]}x{shape[1]}"


def causal_flops(batch, n):
    return batch * 4 * HQ * D * n * n / 2


def make_case(batch, n, fp8):
    """Paged inputs (an FP8 cache with per-tensor scales if fp8) and the dense bf16 K/V SDPA attends:
    GQA repeated to 32 heads, since the flash backend wants equal head counts."""
    q, kc, vc, bt, sl, qsl = paged(batch, n, n)
    scales = {}
    if fp8:
        k_scale, v_scale = (c.float().abs().amax().view(1) / 448 for c in (kc, vc))
        kc, vc = to_fp8_ref(kc, k_scale), to_fp8_ref(vc, v_scale)
        scales = dict(k_scale=k_scale, v_scale=v_scale)
        k, v = dense_kv((kc.float() * k_scale).to(DT), (vc.float() * v_scale).to(DT), bt)
    else:
        k, v = dense_kv(kc, vc, bt)
    k, v = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)
    qd = q.view(batch, n, HQ, D).transpose(1, 2).contiguous()
    return dict(paged=(q, kc, vc, bt, sl, qsl), scales=scales, dense=(qd, k, v), batch=batch, n=n)


def sdpa(case):
    return F.scaled_dot_product_attention(*case["dense"], is_causal=True, scale=D ** -0.5)


def sdpa_reference(case):
    """SDPA's time (ms, flash backend) and its output in the kernel's [tokens, heads, D] layout."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        t = ms(lambda: sdpa(case))
        out = sdpa(case)
    return t, out.transpose(1, 2).reshape(-1, HQ, D)


def other_sdpa_backends(case):
    """{backend: ms} of SDPA left to choose its backend and forced to cuDNN's (None where it cannot run)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    times = {"default": ms(lambda: sdpa(case))}
    try:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            times["cudnn"] = ms(lambda: sdpa(case))
    except RuntimeError:
        times["cudnn"] = None
    return times


def run_kernel(case, config=None, variant=None):
    knobs = dict(variant or {})
    if config is not None:
        knobs.update(zip(("block_m", "tile_n", "num_warps", "num_stages"), config))
    return pa.paged_attention_triton(*case["paged"], D ** -0.5, case["n"], **case["scales"], **knobs)


def compiled_kernels():
    """The attention kernel's compiled variants so far (Triton 3.x keeps them in device_caches[device][0])."""
    fn = pa._paged_attention_kernel
    fn = fn.jitted() if hasattr(fn, "jitted") else fn   # lazy_jit rebinds the name to the jitted kernel at launch
    try:
        return [k for c in fn.device_caches.values() for k in c[0].values()]
    except (AttributeError, IndexError, TypeError):
        return []


def resources(new_kernels):
    """'registers/local-memory bytes' per thread (local memory holds spills) of the kernel a config compiled;
    'cached' where an earlier row compiled it, '?' where this Triton does not say."""
    if not new_kernels:
        return "cached"
    regs = {(getattr(k, "n_regs", None), getattr(k, "n_spills", None)) for k in new_kernels}
    regs.discard((None, None))
    return ", ".join(f"{r}/{s}" for r, s in sorted(regs, key=str)) if regs else "?"


def time_config(cases, name, config, ref_out):
    """{shape: ms} of one variant and config (None where it failed), its resources and its error on cases[0]."""
    before = {id(k) for k in compiled_kernels()}
    variant = VARIANTS.get(name, {})   # "shipped": every knob left to the defaults
    times = {}
    try:
        out = run_kernel(cases[0], config, variant)
        torch.cuda.synchronize()
        err = (out.float() - ref_out.float()).abs().max().item()
        for case in cases:
            times[(case["batch"], case["n"])] = ms(lambda: run_kernel(case, config, variant))
    except Exception as e:  # noqa: BLE001 (out of shared memory or registers, a compile error)
        print(f"# {name} {config}: failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}",
              flush=True)
        return None
    res = resources([k for k in compiled_kernels() if id(k) not in before])
    return dict(variant=name, config=config, times=times, err=err, res=res)


def tflops(case_shape, t_ms):
    return causal_flops(*case_shape) / (t_ms * 1e-3) / 1e12


def print_table(rows, sdpa_ms, shapes):
    sort_key = shapes[min(SORT_SHAPE, len(shapes) - 1)]
    rows = sorted(rows, key=lambda r: -tflops(sort_key, r["times"][sort_key]))
    cells = " | ".join(f"{shape_name(s)} TFLOP/s (x SDPA)" for s in shapes)
    print(f"\n### Sorted by TFLOP/s at {shape_name(sort_key)}\n")
    print(f"| variant | block_m, tile_n, warps, stages | regs/local B | max abs err vs SDPA ({shape_name(shapes[0])}) "
          f"| {cells} |")
    print("|---|---|---|---|" + "---|" * len(shapes))
    sdpa_cells = " | ".join(f"{tflops(s, sdpa_ms[s]):.0f} (1.00)" for s in shapes)
    print(f"| SDPA flash, dense | - | - | - | {sdpa_cells} |")
    for r in rows:
        perf = " | ".join(f"{tflops(s, r['times'][s]):.0f} ({sdpa_ms[s] / r['times'][s]:.2f})" for s in shapes)
        cfg = "auto" if r["config"] is None else ", ".join(map(str, r["config"]))
        print(f"| {r['variant']} | {cfg} | {r['res']} | {r['err']:.2e} | {perf} |")
    print()
    for s in shapes:
        best = min(rows, key=lambda r: r["times"][s])
        cfg = "auto" if best["config"] is None else best["config"]
        print(f"best at {shape_name(s)}: {best['variant']} {cfg}: {tflops(s, best['times'][s]):.0f} TFLOP/s, "
              f"{sdpa_ms[s] / best['times'][s]:.2f}x SDPA")


def parse_configs(text):
    return [tuple(int(x) for x in c.split("x")) for c in text.split(",")] if text else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fp8", action="store_true", help="an FP8 (e4m3) KV cache with per-tensor scales")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma-separated names out of: {', '.join(VARIANTS)} (default: all of them)")
    ap.add_argument("--configs", type=parse_configs, default=None, metavar="MxNxWxS,...",
                    help="block_m x tile_n x num_warps x num_stages for every variant, instead of the grids")
    ap.add_argument("--quick", action="store_true", help="the narrow grid for every variant")
    ap.add_argument("--shapes", default=",".join(shape_name(s) for s in SHAPES), metavar="BxN,...",
                    help="sequences x tokens; the first gives the error column, the second sorts the table")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/prefill_attention.py times CUDA kernels: no CUDA device here (the interpreter's times "
                 "would mean nothing). Run it on the GPU host.")
    names = a.variants.split(",")
    unknown = set(names) - set(VARIANTS)
    if unknown:
        sys.exit(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    shapes = [tuple(int(x) for x in s.split("x")) for s in a.shapes.split(",")]
    import triton
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"cache {'fp8 e4m3' if a.fp8 else 'bf16'}, block size {BS}")

    start = time.time()
    cases, sdpa_ms = [], {}
    ref_out = None
    for batch, n in shapes:
        case = make_case(batch, n, a.fp8)
        sdpa_ms[(batch, n)], out = sdpa_reference(case)
        others = ", ".join(f"{name} {tflops((batch, n), t):.0f}" if t else f"{name} n/a"
                           for name, t in other_sdpa_backends(case).items())
        print(f"# SDPA other backends {batch}x{n}: {others} TFLOP/s", flush=True)
        if ref_out is None:
            ref_out = out
        del case["dense"], out   # SDPA's inputs are no longer needed
        cases.append(case)
        print(f"# SDPA flash {batch}x{n}: {tflops((batch, n), sdpa_ms[(batch, n)]):.0f} TFLOP/s", flush=True)
    torch.cuda.empty_cache()

    plan = [("shipped", None)]   # the shipped default: heuristic config, PREFILL_VARIANT
    for name in names:
        grid = a.configs or (WIDE_GRID if name in WIDE_VARIANTS and not a.quick else NARROW_GRID)
        plan += [(name, config) for config in grid]
    print(f"# {len(plan)} configs", flush=True)
    rows = []
    for name, config in plan:
        row = time_config(cases, name, config, ref_out)
        if row is None:
            continue
        rows.append(row)
        perf = ", ".join(f"{shape_name(s)} {tflops(s, t):.0f}" for s, t in row["times"].items())
        print(f"# {name} {config or 'auto'}: {perf} TFLOP/s, err {row['err']:.1e}, regs/local B {row['res']} "
              f"({time.time() - start:.0f} s)", flush=True)
    if rows:
        print_table(rows, sdpa_ms, shapes)


if __name__ == "__main__":
    main()
