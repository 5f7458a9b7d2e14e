"""FP8 GEMM (quantization fp8) against bf16 at the projection shapes of Llama-3-8B and Qwen3-0.6B, on CUDA.

For each (model, projection, M): bf16 torch.mm; torch._scaled_mm alone (row-wise scales: per-token
[M, 1] x per-channel [1, N], fp32, bf16 out), and the whole Fp8Linear (per-token activation quantization
+ _scaled_mm), and the Triton W8A16 kernel (kernels.fp8_weight_gemm: bf16 x, e4m3 weights dequantized
in registers, the whole layer in one launch, what Fp8Linear runs for M <= TRITON_W8A16_MAX_M), each
timed with CUDA events over many launches (median of repeats): at M <= 256 (decode sizes, which the
engine runs in CUDA graphs) as replays of a graph of those launches, so launch overhead is not counted;
every column cycles through copies of the weight (200 MB of e4m3, at most 64 copies), so weights are
read from HBM, not the 50 MB L2 (one 4096 x 4096 e4m3 weight would stay there between launches).
Prints a table with TFLOP/s, the speed-up of each FP8 column over bf16, and for M <= 16 the weight-read
bandwidth (bytes of the e4m3 weight and its fp32 scales / time) of the Fp8Linear and W8A16 paths, to
hold against the ~3.3 TB/s copy bandwidth of an H100 (issue 14: decode <= 1.15x the FP8 weight-read
time). Speed-up W8A16 > speed-up layer means the Triton kernel wins at that M. --sweep also times a few
tile shapes of the kernel at M <= 64 and prints the best (block_n, block_k, num_stages) against the
heuristic's.

    python bench/fp8_gemm.py [--m 1 16 64 256 8192] [--models llama3-8b qwen3-0.6b] [--sweep]
"""
import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from backend import quantization  # noqa: E402
from backend.quantization import Fp8Linear, quantize_rows  # noqa: E402
from kernels.fp8_gemm import fp8_weight_gemm_ref, fp8_weight_gemm_triton, gemm_config  # noqa: E402
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


SWEEP = [(bn, bk, stages) for bn in (16, 32, 64) for bk in (128, 256, 512) for stages in (3, 4, 6)]


def check_w8a16(x, fp8: Fp8Linear):
    """The compiled kernel against the reference (a miscompile should not reach the table)."""
    y = fp8_weight_gemm_triton(x, fp8.weight, fp8.weight_scale)
    ref = fp8_weight_gemm_ref(x, fp8.weight, fp8.weight_scale)
    torch.testing.assert_close(y.float(), ref.float(), atol=1e-2, rtol=1e-2)


def sweep_w8a16(x, layers: list[Fp8Linear], iters: int, graph: bool) -> tuple[float, tuple]:
    """(best ms, (block_n, block_k, num_stages)) over SWEEP."""
    best = (float("inf"), None)
    for bn, bk, stages in SWEEP:
        fns = [lambda l=l: fp8_weight_gemm_triton(x, l.weight, l.weight_scale, block_n=bn, block_k=bk,
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


def bench_one(m: int, k: int, n: int, sweep: bool) -> dict:
    quantization.TRITON_W8A16_MAX_M = 0   # "Fp8Linear" is the W8A8 path (quantize + _scaled_mm) here
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
    pairs = make_layers(k, n, max(1, min(64, int(ROTATE_BYTES // (n * k)))), g)
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
        check_w8a16(x, fp8s[0])
        t_w8a16 = time_ms([lambda f=f: fp8_weight_gemm_triton(x, f.weight, f.weight_scale) for f in fp8s],
                          iters, graph)
        best = sweep_w8a16(x, fp8s, iters, graph) if sweep and m <= 64 else None
    flops = 2 * m * k * n
    weight_bytes = n * k + 4 * n   # e4m3 weight + fp32 per-channel scales
    return dict(bf16=t_bf16, scaled_mm=t_mm, fast_accum=t_fast, fp8_linear=t_layer, w8a16=t_w8a16,
                tflops_bf16=flops / t_bf16 / 1e9,
                tflops_fp8=flops / t_mm / 1e9, tbps_layer=weight_bytes / t_layer / 1e9,
                tbps_w8a16=weight_bytes / t_w8a16 / 1e9, best=best)


def tbps(r: dict, key: str, m: int) -> str:
    return f"{r[key]:.2f}" if m <= 16 else "-"


def sweep_cell(r: dict, m: int, n: int) -> str:
    if r["best"] is None:
        return "-"
    t, (bn, bk, stages) = r["best"]
    _, bn0, bk0, _, stages0 = gemm_config(m, n, torch.device("cuda"))
    return f"{t * 1e3:.1f} at bn={bn} bk={bk} st={stages} (heuristic bn={bn0} bk={bk0} st={stages0})"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256, 8192])
    ap.add_argument("--models", nargs="+", default=["llama3-8b", "qwen3-0.6b"])
    ap.add_argument("--sweep", action="store_true", help="time tile shapes of the W8A16 kernel at M <= 64")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs CUDA (FP8 tensor cores: H100 or newer)")
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print("| model | proj | M | K | N | bf16 mm (us) | _scaled_mm (us) | fast accum (us) | Fp8Linear (us) "
          "| W8A16 (us) | bf16 TFLOP/s "
          "| fp8 TFLOP/s | speed-up mm | speed-up layer | speed-up W8A16 | layer w TB/s | W8A16 w TB/s "
          "| W8A16 best swept (us) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for model in a.models:
        for name, k, n in projections(model):
            for m in a.m:
                r = bench_one(m, k, n, a.sweep)
                print(f"| {model} | {name} | {m} | {k} | {n} | {r['bf16'] * 1e3:.1f} | {r['scaled_mm'] * 1e3:.1f} "
                      f"| {r['fast_accum'] * 1e3:.1f} "
                      f"| {r['fp8_linear'] * 1e3:.1f} | {r['w8a16'] * 1e3:.1f} | {r['tflops_bf16']:.0f} "
                      f"| {r['tflops_fp8']:.0f} | {r['bf16'] / r['scaled_mm']:.2f}x "
                      f"| {r['bf16'] / r['fp8_linear']:.2f}x | {r['bf16'] / r['w8a16']:.2f}x "
                      f"| {tbps(r, 'tbps_layer', m)} | {tbps(r, 'tbps_w8a16', m)} "
                      f"| {sweep_cell(r, m, n)} |", flush=True)


if __name__ == "__main__":
    main()
