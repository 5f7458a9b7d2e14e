"""FP8 GEMM (quantization fp8) against bf16 at the projection shapes of Llama-3-8B and Qwen3-0.6B, on CUDA.

For each (model, projection, M): bf16 torch.mm; torch._scaled_mm alone (row-wise scales: per-token
[M, 1] x per-channel [1, N], fp32, bf16 out), and the whole Fp8Linear (per-token activation quantization
+ _scaled_mm), each timed with CUDA events over many launches (median of repeats). Prints a table with
TFLOP/s and the speed-up of each FP8 column over bf16.

    python bench/fp8_gemm.py [--m 1 16 64 256 8192] [--models llama3-8b qwen3-0.6b]
"""
import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from backend.quantization import Fp8Linear, quantize_rows  # noqa: E402
from bench.shapes import SHAPES  # noqa: E402


def projections(shape: str) -> list[tuple[str, int, int]]:
    """(name, K, N) of a decoder layer's fused projections (one rank)."""
    c = SHAPES[shape]
    h, i, d = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    return [("qkv", h, q + 2 * kv), ("o", q, h), ("gate_up", h, 2 * i), ("down", i, h)]


def time_ms(fn, iters: int, repeats: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return statistics.median(times)


def bench_one(m: int, k: int, n: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
    linear = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        linear.weight.normal_(0, k ** -0.5, generator=g)
    w_t = linear.weight.t()
    fp8 = Fp8Linear.from_linear(linear)
    x_fp8, x_scale = quantize_rows(x)
    w_fp8_t, w_scale = fp8.weight.t(), fp8.weight_scale.view(1, -1)
    iters = max(10, min(2000, int(2e11 / (2 * m * k * n + 1))))   # ~enough work per timing
    with torch.inference_mode():
        t_bf16 = time_ms(lambda: torch.mm(x, w_t), iters)
        t_mm = time_ms(lambda: torch._scaled_mm(x_fp8, w_fp8_t, scale_a=x_scale, scale_b=w_scale,
                                                out_dtype=torch.bfloat16), iters)
        t_layer = time_ms(lambda: fp8(x), iters)
    flops = 2 * m * k * n
    return dict(bf16=t_bf16, scaled_mm=t_mm, fp8_linear=t_layer, tflops_bf16=flops / t_bf16 / 1e9,
                tflops_fp8=flops / t_mm / 1e9)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, nargs="+", default=[1, 16, 64, 256, 8192])
    ap.add_argument("--models", nargs="+", default=["llama3-8b", "qwen3-0.6b"])
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs CUDA (FP8 tensor cores: H100 or newer)")
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print("| model | proj | M | K | N | bf16 mm (us) | _scaled_mm (us) | Fp8Linear (us) | bf16 TFLOP/s "
          "| fp8 TFLOP/s | speed-up mm | speed-up layer |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for model in a.models:
        for name, k, n in projections(model):
            for m in a.m:
                r = bench_one(m, k, n)
                print(f"| {model} | {name} | {m} | {k} | {n} | {r['bf16'] * 1e3:.1f} | {r['scaled_mm'] * 1e3:.1f} "
                      f"| {r['fp8_linear'] * 1e3:.1f} | {r['tflops_bf16']:.0f} | {r['tflops_fp8']:.0f} "
                      f"| {r['bf16'] / r['scaled_mm']:.2f}x | {r['bf16'] / r['fp8_linear']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
