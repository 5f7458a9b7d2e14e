"""Small-M GEMMs (decode) at the projection shapes of Llama-3-8B and Qwen3-0.6B, on CUDA: FP8 against bf16,
and the Triton weight-streaming kernel (kernels/fp8_gemm.py) on e4m3 and on bf16 weights.

For each (model, projection, M): bf16 torch.mm (cuBLAS); the Triton kernel on the same bf16 weights
(kernels.fp8_gemm.weight_gemm_triton: what UnquantizedLinear runs for M <= TRITON_BF16_GEMV_MAX_M);
torch._scaled_mm alone (row-wise scales: per-token [M, 1] x per-channel [1, N], fp32, bf16 out), and the
whole Fp8Linear (per-token activation quantization + _scaled_mm), and the Triton W8A16 kernel
(kernels.fp8_weight_gemm: bf16 x, e4m3 weights dequantized in registers, what Fp8Linear runs for
M <= TRITON_W8A16_MAX_M). Both Triton columns run the heuristic's config (gemm_config), which splits K
where the N tiling leaves SMs idle; where it does, a "no split" column times the same kernel with
split_k=1 (the N tiling alone, as before split-K). The Triton columns run at M <= 256 only.
Each is timed with CUDA events over many launches (median of repeats): at M <= 256 (decode sizes, which
the engine runs in CUDA graphs) as replays of a graph of those launches, so launch overhead is not
counted; every column cycles through copies of the weight (200 MB of e4m3, 400 MB of bf16, at most 64
copies), so weights are read from HBM, not the 50 MB L2 (one 4096 x 4096 e4m3 weight would stay there
between launches). Prints a table with TFLOP/s, the speed-up of each FP8 column over bf16 mm, and for
M <= 16 the weight-read bandwidth (bytes of the weight, and of the e4m3 weight's fp32 scales, / time)
and each time over the weight-read time at --copy-bw (targets, single-request decode: <= 1.10x the
bf16 read, <= 1.15x the FP8 read).

--sweep: the split-K sweep, at M = 1 (--sweep-m) over Llama-3-8B's four projections, for e4m3 and bf16
weights: split_k in 1, 2, 4, 8 x block_n x block_k (128, 256, 512 bytes of weight a row) x stages;
prints the best configs of each (us, weight TB/s), the heuristic's, and a summary of the best per
projection. ~150 kernels to compile on a fresh machine, shorter timings than the table's: 63 s on an
H200 (Triton 3.6), the H100 about the same. --sweep-tiles: the earlier per-row sweep of tile
shapes (no split) at M <= 64, a column of the table.

    python bench/fp8_gemm.py [--m 1 16 64 256 8192] [--models llama3-8b qwen3-0.6b] [--copy-bw 3.0e12]
    python bench/fp8_gemm.py --sweep [--sweep-m 1] --m   # the split-K sweep only (no table)
    python bench/fp8_gemm.py --m 1 16 --sweep            # the table at M = 1, 16, then the sweep
    python bench/fp8_gemm.py --m --variants 1 16         # the e4m3 kernel's variants (see VARIANTS)
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from backend import quantization  # noqa: E402
from backend.quantization import Fp8Linear, quantize_rows  # noqa: E402
from kernels.fp8_gemm import (CONVERTS, fp8_w8a8_gemm_ref, fp8_w8a8_gemm_triton, fp8_weight_gemm_ref,  # noqa: E402
                              fp8_weight_gemm_triton, gemm_config, k_slices, weight_gemm_ref, weight_gemm_triton)
from bench.shapes import SHAPES  # noqa: E402


def projections(shape: str) -> list[tuple[str, int, int]]:
    """(name, K, N) of a decoder layer's fused projections (one rank)."""
    c = SHAPES[shape]
    h, i, d = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    return [("qkv", h, q + 2 * kv), ("o", q, h), ("gate_up", h, 2 * i), ("down", i, h)]


ROTATE_BYTES = 200e6     # weight copies cycled per timing: 4x the H100's 50 MB L2, so weights come from HBM
GRAPH_MAX_M = 256        # decode sizes run in CUDA graphs: timed as graph replays (no launch overhead)


def time_ms(fns: list, iters: int, graph: bool, repeats: int = 5) -> float:
    """Median ms per call, cycling through fns (one per weight copy)."""
    for fn in fns:
        fn()   # compiles; the graph's capture then needs no warm-up
    torch.cuda.synchronize()
    rounds = max(1, iters // len(fns))
    if graph:
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph):
            for _ in range(rounds):
                for fn in fns:
                    fn()
        run = cuda_graph.replay
    else:
        def run():
            for _ in range(rounds):
                for fn in fns:
                    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / (rounds * len(fns)))
    return statistics.median(times)


TILE_SWEEP = [(bn, bk, stages) for bn in (16, 32, 64) for bk in (128, 256, 512) for stages in (3, 4, 6)]
# --sweep: K steps in bytes of weight a row (e4m3: that many elements; bf16: half)
SPLIT_SWEEP = [(split, bn, bk_bytes, stages) for split in (1, 2, 4, 8) for bn in (16, 32, 64)
               for bk_bytes in (128, 256, 512) for stages in (3, 4)]
SWEEP_ITERS = 240        # launches per timing in --sweep (the table's: up to 2000): ~2-10 ms a replay at M = 1


def check_against(y, ref, what: str):
    """A compiled kernel against the reference (a miscompile should not reach the table)."""
    try:
        torch.testing.assert_close(y.float(), ref.float(), atol=1e-2, rtol=1e-2)
    except AssertionError as e:
        raise AssertionError(f"{what}: {e}") from None


def sweep_w8a16(x, layers: list[Fp8Linear], iters: int, graph: bool) -> tuple[float, tuple]:
    """(best ms, (block_n, block_k, num_stages)) over TILE_SWEEP, no split (--sweep-tiles)."""
    best = (float("inf"), None)
    for bn, bk, stages in TILE_SWEEP:
        fns = [lambda l=l: fp8_weight_gemm_triton(x, l.weight, l.weight_scale, split_k=1, block_n=bn, block_k=bk,
                                                  num_stages=stages) for l in layers]
        try:
            best = min(best, (time_ms(fns, iters, graph), (bn, bk, stages)))
        except Exception as e:   # e.g. out of shared memory: big tiles at many stages
            print(f"# sweep bn={bn} bk={bk} st={stages}: {type(e).__name__}", file=sys.stderr)
    return best


def make_layers(k: int, n: int, copies: int, g: torch.Generator) -> list[tuple[torch.nn.Linear, Fp8Linear]]:
    out = []
    for _ in range(copies):
        linear = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            linear.weight.normal_(0, k ** -0.5, generator=g)
        out.append((linear, Fp8Linear.from_linear(linear)))
    return out


def weight_copies(k: int, n: int) -> int:
    return max(1, min(64, int(ROTATE_BYTES // (n * k))))


def triton_times(x, pairs, iters: int, graph: bool) -> dict:
    """The Triton kernel on bf16 and on e4m3 weights: the heuristic's config, and where it splits, the
    N tiling alone (the heuristic's config without k: its tiles before split-K)."""
    m, k = x.shape
    n = pairs[0][0].weight.shape[0]
    linear, fp8 = pairs[0]
    check_against(weight_gemm_triton(x, linear.weight), weight_gemm_ref(x, linear.weight), "bf16 Triton")
    check_against(fp8_weight_gemm_triton(x, fp8.weight, fp8.weight_scale),
                  fp8_weight_gemm_ref(x, fp8.weight, fp8.weight_scale), "W8A16")
    out = {}
    for key, weight_dtype, run in (
            ("bf16_triton", torch.bfloat16, lambda l, f, **kw: weight_gemm_triton(x, l.weight, **kw)),
            ("w8a16", fp8.weight.dtype, lambda l, f, **kw: fp8_weight_gemm_triton(x, f.weight, f.weight_scale, **kw))):
        c = gemm_config(m, n, x.device, k, weight_dtype)
        split = k_slices(k, c.split_k, c.block_k)[1]
        out[key + "_split"] = split
        out[key] = time_ms([lambda l=l, f=f: run(l, f) for l, f in pairs], iters, graph)
        tiles = gemm_config(m, n, x.device, None, weight_dtype)
        no_split = dict(split_k=1, block_n=tiles.block_n, block_k=tiles.block_k, num_stages=tiles.num_stages)
        out[key + "_nosplit"] = out[key] if split == 1 else \
            time_ms([lambda l=l, f=f: run(l, f, **no_split) for l, f in pairs], iters, graph)
    return out


def bench_one(m: int, k: int, n: int, sweep_tiles: bool) -> dict:
    quantization.TRITON_W8A16_MAX_M = 0   # "Fp8Linear" is quantize + _scaled_mm here (not the Triton W8A8 stream)
    quantization.TRITON_W8A8_MAX_M = 0
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
    pairs = make_layers(k, n, weight_copies(k, n), g)
    fp8s = [fp8 for _, fp8 in pairs]
    x_fp8, x_scale = quantize_rows(x)
    iters = max(10, min(2000, int(2e11 / (2 * m * k * n + 1))))   # ~enough work per timing
    graph = m <= GRAPH_MAX_M
    with torch.inference_mode():
        t_bf16 = time_ms([lambda l=l: torch.mm(x, l.weight.t()) for l, _ in pairs], iters, graph)
        t_mm = time_ms([lambda f=f: torch._scaled_mm(x_fp8, f.weight.t(), scale_a=x_scale,
                                                     scale_b=f.weight_scale.view(1, -1), out_dtype=torch.bfloat16)
                        for f in fp8s], iters, graph)
        try:   # cuBLASLt's fast accumulation (no periodic promotion to fp32 inside the tensor-core sums)
            t_fast = time_ms([lambda f=f: torch._scaled_mm(x_fp8, f.weight.t(), scale_a=x_scale,
                                                           scale_b=f.weight_scale.view(1, -1),
                                                           out_dtype=torch.bfloat16, use_fast_accum=True)
                              for f in fp8s], iters, graph)
        except RuntimeError as e:
            print(f"# use_fast_accum: {e}", file=sys.stderr)
            t_fast = float("nan")
        t_layer = time_ms([lambda f=f: f(x) for f in fp8s], iters, graph)
        nan = float("nan")
        triton = triton_times(x, pairs, iters, graph) if m <= GRAPH_MAX_M else dict(
            bf16_triton=nan, bf16_triton_nosplit=nan, bf16_triton_split=0, w8a16=nan, w8a16_nosplit=nan,
            w8a16_split=0)
        best = sweep_w8a16(x, fp8s, iters, graph) if sweep_tiles and m <= 64 else None
    flops = 2 * m * k * n
    fp8_bytes, bf16_bytes = n * k + 4 * n, 2 * n * k   # e4m3 weight + fp32 per-channel scales; bf16 weight
    return dict(bf16=t_bf16, scaled_mm=t_mm, fast_accum=t_fast, fp8_linear=t_layer, **triton,
                tflops_bf16=flops / t_bf16 / 1e9, tflops_fp8=flops / t_mm / 1e9,
                fp8_bytes=fp8_bytes, bf16_bytes=bf16_bytes, best=best)


def tbps(weight_bytes: int, ms: float, m: int) -> str:
    return f"{weight_bytes / ms / 1e9:.2f}" if m <= 16 and ms == ms else "-"


def of_read(weight_bytes: int, ms: float, m: int, copy_bw: float) -> str:
    """Time over the weight-read time at copy_bw (the decode targets: 1.10x bf16, 1.15x FP8)."""
    return f"{ms * 1e-3 / (weight_bytes / copy_bw):.2f}x" if m <= 16 and ms == ms else "-"


def us(ms: float) -> str:
    return f"{ms * 1e3:.1f}" if ms == ms else "-"


def sweep_cell(r: dict, m: int, n: int) -> str:
    if r["best"] is None:
        return "-"
    t, (bn, bk, stages) = r["best"]
    c = gemm_config(m, n, torch.device("cuda"))
    return f"{t * 1e3:.1f} at bn={bn} bk={bk} st={stages} (heuristic bn={c.block_n} bk={c.block_k} st={c.num_stages})"


def print_table(models, ms, copy_bw: float, sweep_tiles: bool):
    print("| model | proj | M | K | N | bf16 mm (us) | bf16 Triton (us) | bf16 Triton no split (us) "
          "| _scaled_mm (us) | fast accum (us) | Fp8Linear (us) | W8A16 (us) | W8A16 no split (us) "
          "| split bf16 / fp8 | bf16 TFLOP/s | fp8 TFLOP/s | speed-up mm | speed-up layer | speed-up W8A16 "
          "| bf16 mm w TB/s | bf16 Triton w TB/s | layer w TB/s | W8A16 w TB/s | bf16 Triton / bf16 read "
          "| W8A16 / FP8 read | W8A16 best swept (us) |")
    print("|" + "---|" * 26)
    for model in models:
        for name, k, n in projections(model):
            for m in ms:
                r = bench_one(m, k, n, sweep_tiles)
                print(f"| {model} | {name} | {m} | {k} | {n} | {us(r['bf16'])} | {us(r['bf16_triton'])} "
                      f"| {us(r['bf16_triton_nosplit'])} | {us(r['scaled_mm'])} | {us(r['fast_accum'])} "
                      f"| {us(r['fp8_linear'])} | {us(r['w8a16'])} | {us(r['w8a16_nosplit'])} "
                      f"| {r['bf16_triton_split']} / {r['w8a16_split']} "
                      f"| {r['tflops_bf16']:.0f} | {r['tflops_fp8']:.0f} | {r['bf16'] / r['scaled_mm']:.2f}x "
                      f"| {r['bf16'] / r['fp8_linear']:.2f}x | {r['bf16'] / r['w8a16']:.2f}x "
                      f"| {tbps(r['bf16_bytes'], r['bf16'], m)} | {tbps(r['bf16_bytes'], r['bf16_triton'], m)} "
                      f"| {tbps(r['fp8_bytes'], r['fp8_linear'], m)} | {tbps(r['fp8_bytes'], r['w8a16'], m)} "
                      f"| {of_read(r['bf16_bytes'], r['bf16_triton'], m, copy_bw)} "
                      f"| {of_read(r['fp8_bytes'], r['w8a16'], m, copy_bw)} | {sweep_cell(r, m, n)} |", flush=True)


# ---- --sweep: split-K x tiles at M = 1 -------------------------------------------------------------------

def split_sweep_one(m: int, k: int, n: int, fp8: bool) -> tuple[tuple[float, str], list[tuple[float, str]]]:
    """((ms, config) of the heuristic, [(ms, config)] over SPLIT_SWEEP fastest first) for one projection."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
    pairs = make_layers(k, n, weight_copies(k, n), g)
    if fp8:
        weights = [(f.weight, f.weight_scale) for _, f in pairs]
        ref = fp8_weight_gemm_ref(x, *weights[0])

        def run(w, **kw):
            return fp8_weight_gemm_triton(x, *w, **kw)
    else:
        weights = [(l.weight,) for l, _ in pairs]
        ref = weight_gemm_ref(x, *weights[0])

        def run(w, **kw):
            return weight_gemm_triton(x, *w, **kw)
    del pairs   # the other weight's copies: not read here
    weight_dtype = weights[0][0].dtype

    def timed(**knobs) -> float:
        check_against(run(weights[0], **knobs), ref, f"{knobs}")
        return time_ms([lambda w=w: run(w, **knobs) for w in weights], SWEEP_ITERS, True)

    results = []
    with torch.inference_mode():
        c = gemm_config(m, n, x.device, k, weight_dtype)
        heuristic = (timed(), config_label(c.split_k, c.block_n, c.block_k, c.num_stages))
        for split, bn, bk_bytes, stages in SPLIT_SWEEP:
            bk = bk_bytes // weight_dtype.itemsize
            if split > 1 and k_slices(k, split, bk)[1] < split:
                continue   # fewer K steps than slices: the same as a smaller split
            try:
                results.append((timed(split_k=split, block_n=bn, block_k=bk, num_stages=stages),
                                config_label(split, bn, bk, stages)))
            except Exception as e:   # e.g. out of shared memory: big tiles at many stages
                print(f"# sweep {config_label(split, bn, bk, stages)}: {type(e).__name__}: {str(e)[:200]}",
                      file=sys.stderr)
    return heuristic, sorted(results)


def config_label(split: int, block_n: int, block_k: int, stages: int) -> str:
    return f"split={split} bn={block_n} bk={block_k} st={stages}"


def print_split_sweep(m: int, top: int = 5):
    start = time.time()
    summary = []
    for fp8 in (True, False):
        weight = "e4m3" if fp8 else "bf16"
        for name, k, n in projections("llama3-8b"):
            heuristic, results = split_sweep_one(m, k, n, fp8)
            weight_bytes = n * k + 4 * n if fp8 else 2 * n * k
            print(f"# sweep llama3-8b {name} M={m} {weight} weights (K={k}, N={n}, {len(results)} configs):")
            for (t, label), tag in [(r, "") for r in results[:top]] + [(heuristic, " (heuristic)")]:
                print(f"#   {t * 1e3:7.1f} us  {weight_bytes / t / 1e9:5.2f} TB/s  {label}{tag}")
            summary.append((weight, name, heuristic, results[0], weight_bytes))
    print(f"\n# split-K sweep at M = {m}, Llama-3-8B ({time.time() - start:.0f} s)")
    print("| weights | proj | heuristic (us) | TB/s | config | best (us) | TB/s | config |")
    print("|---|---|---|---|---|---|---|---|")
    for weight, name, (th, ch), (tb, cb), weight_bytes in summary:
        print(f"| {weight} | {name} | {th * 1e3:.1f} | {weight_bytes / th / 1e9:.2f} | {ch} "
              f"| {tb * 1e3:.1f} | {weight_bytes / tb / 1e9:.2f} | {cb} |", flush=True)


# --variants: the e4m3 kernel's variants, each over VARIANT_TILES (split_k, block_n, K step in bytes), 3 stages
VARIANTS = [(f"w8a16 {CONVERTS[c]}{' swap' if swap else ''}", False, dict(convert=c, swap_ab=swap))
            for swap in (False, True) for c in sorted(CONVERTS)] + \
           [(f"w8a8{' swap' if swap else ''}", True, dict(swap_ab=swap)) for swap in (False, True)]
VARIANT_TILES = [(split, bn, bk) for split in (1, 2, 4) for bn in (32, 64, 128) for bk in (128, 512)]


def variant_sweep(ms: list[int], top: int = 3):
    """Each variant of the e4m3 weight stream (VARIANTS) at each M over Llama-3-8B's projections: the best
    of VARIANT_TILES per projection, and the sum over the four (one layer's GEMMs)."""
    start = time.time()
    summary = {}
    for m in ms:
        for name, k, n in projections("llama3-8b"):
            g = torch.Generator(device="cuda").manual_seed(0)
            x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
            x_fp8, x_scale = quantize_rows(x)
            layers = [f for _, f in make_layers(k, n, weight_copies(k, n), g)]
            weight_bytes = n * k + 4 * n
            refs = {False: fp8_weight_gemm_ref(x, layers[0].weight, layers[0].weight_scale),
                    True: fp8_w8a8_gemm_ref(x_fp8, x_scale, layers[0].weight, layers[0].weight_scale)}
            quant_ms = time_ms([lambda: quantize_rows(x)] * 8, SWEEP_ITERS, True)
            print(f"# llama3-8b {name} M={m} (K={k}, N={n}): per-token quantization of x alone {quant_ms * 1e3:.1f} us")
            for label, w8a8, variant in VARIANTS:
                def run(f, **kw):
                    if w8a8:
                        return fp8_w8a8_gemm_triton(x_fp8, x_scale, f.weight, f.weight_scale, **variant, **kw)
                    return fp8_weight_gemm_triton(x, f.weight, f.weight_scale, **variant, **kw)
                results = []
                with torch.inference_mode():
                    for split, bn, bk in VARIANT_TILES:
                        knobs = dict(split_k=split, block_n=bn, block_k=bk, num_stages=3)
                        if split > 1 and k_slices(k, split, bk)[1] < split:
                            continue
                        try:
                            check_against(run(layers[0], **knobs), refs[w8a8], f"{label} {knobs}")
                            results.append((time_ms([lambda f=f: run(f, **knobs) for f in layers], SWEEP_ITERS, True),
                                            config_label(split, bn, bk, 3)))
                        except Exception as e:   # out of shared memory, or an unsupported dot
                            print(f"#   {label} {knobs}: {type(e).__name__}: {str(e)[:160]}", file=sys.stderr)
                results.sort()
                for t, cfg in results[:top]:
                    print(f"#   {label:34s} {t * 1e3:7.1f} us  {weight_bytes / t / 1e9:5.2f} TB/s  {cfg}", flush=True)
                if results:
                    summary.setdefault((m, label), []).append(results[0][0])
    print(f"\n# e4m3 variants, Llama-3-8B, best tiles per projection, sum of qkv + o + gate_up + down "
          f"({time.time() - start:.0f} s)")
    print("| M | variant | layer GEMMs (us) |")
    print("|---|---|---|")
    for (m, label), times in summary.items():
        total = f"{sum(times) * 1e3:.1f}" if len(times) == 4 else "incomplete"
        print(f"| {m} | {label} | {total} |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--m", type=int, nargs="*", default=[1, 2, 4, 8, 16, 32, 64, 128, 256, 8192],
                    help="rows of the table (none: no table)")
    ap.add_argument("--models", nargs="+", default=["llama3-8b", "qwen3-0.6b"])
    ap.add_argument("--copy-bw", type=float, default=3.0e12,
                    help="bytes/s for the 'x of weight read' columns (H100: ~3.0e12)")
    ap.add_argument("--sweep", action="store_true",
                    help="the split-K sweep (split_k x block_n x block_k x stages) at --sweep-m, Llama-3-8B, "
                         "e4m3 and bf16 weights")
    ap.add_argument("--sweep-m", type=int, default=1)
    ap.add_argument("--variants", type=int, nargs="*",
                    help="the e4m3 kernel's variants (conversions, swapped dot, W8A8) at these M")
    ap.add_argument("--sweep-tiles", action="store_true",
                    help="the table's last column: tile shapes of the W8A16 kernel (no split) at M <= 64")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs CUDA (FP8 tensor cores: H100 or newer)")
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"{torch.cuda.get_device_properties(0).multi_processor_count} SMs")
    if a.m:
        print_table(a.models, a.m, a.copy_bw, a.sweep_tiles)
    if a.sweep:
        print_split_sweep(a.sweep_m)
    if a.variants:
        variant_sweep(a.variants)


if __name__ == "__main__":
    main()
