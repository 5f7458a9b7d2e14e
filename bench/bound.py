"""The hardware bound of a workload: measure copy bandwidth and bf16 matmul TFLOP/s on this GPU,
then bound = prefill FLOPs at the matmul rate + every decode step's weight and KV bytes at the
copy bandwidth (all requests decode in lockstep, as in the offline benchmark).

usage: python bench/bound.py --shape llama3-8b --num-seqs 256 --input-len 512 --output-len 256
       python bench/bound.py --shape llama3-8b --fp8-weights --fp8-kv     # issue 14's FP8 bound

--fp8-weights: the decoder projections are read at 1 byte a weight (embedding and LM head stay at
2) and prefill runs at the measured FP8 _scaled_mm rate; --fp8-kv: the KV cache at 1 byte an element.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.shapes import SHAPES, params_of  # noqa: E402


def measure_fp8_flops():
    """FP8 GEMM rate as the engine runs it: torch._scaled_mm, row-wise scales, bf16 out."""
    import triton.testing
    a = torch.randn(8192, 8192, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(8192, 8192, device="cuda").to(torch.float8_e4m3fn)
    sa, sb = torch.ones(8192, 1, device="cuda"), torch.ones(1, 8192, device="cuda")
    ms = triton.testing.do_bench(lambda: torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16),
                                 warmup=5, rep=50)
    return 2 * 8192**3 / (ms * 1e-3)


def weight_bytes(shape, fp8_weights=False) -> int:
    """Bytes of weights read per decode step: the projections (1 byte each with FP8), the rest bf16."""
    c = SHAPES[shape]
    h, i, l, v, d = (c[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size", "head_dim"))
    projections = l * (h * d * (c["num_attention_heads"] * 2 + c["num_key_value_heads"] * 2) + 3 * h * i)
    return projections * (1 if fp8_weights else 2) + 2 * (params_of(shape) - projections)


def measure():
    import triton.testing
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=5, rep=50)
    copy_bw = 2 * x.numel() / (ms * 1e-3)          # read + write
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    ms = triton.testing.do_bench(lambda: a @ b, warmup=5, rep=50)
    return copy_bw, 2 * 8192**3 / (ms * 1e-3)


def bound_seconds(shape, num_seqs, input_len, output_len, copy_bw, flops, fp8_weights=False, fp8_kv=False):
    c = SHAPES[shape]
    p = params_of(shape)
    kv_per_token = c["num_hidden_layers"] * 2 * c["num_key_value_heads"] * c["head_dim"] * (1 if fp8_kv else 2)
    weights = weight_bytes(shape, fp8_weights)
    attn_flops_per_token_ctx = 4 * c["num_hidden_layers"] * c["num_attention_heads"] * c["head_dim"]
    prefill_tokens = num_seqs * input_len
    prefill_flops = 2 * p * prefill_tokens + attn_flops_per_token_ctx * num_seqs * input_len ** 2 / 2
    decode_s = 0.0
    for i in range(output_len):
        decode_s += (weights + num_seqs * (input_len + i) * kv_per_token) / copy_bw
    return prefill_flops / flops + decode_s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--fp8-weights", action="store_true")
    ap.add_argument("--fp8-kv", action="store_true")
    a = ap.parse_args()
    bw, fl = measure()
    if a.fp8_weights:
        fl = measure_fp8_flops()
    s = bound_seconds(a.shape, a.num_seqs, a.input_len, a.output_len, bw, fl, a.fp8_weights, a.fp8_kv)
    single = weight_bytes(a.shape, a.fp8_weights) / bw
    print(json.dumps(dict(bound="roofline", shape=a.shape, fp8_weights=a.fp8_weights, fp8_kv=a.fp8_kv,
                          copy_tb_s=round(bw / 1e12, 2), matmul_tflops=round(fl / 1e12),
                          bound_seconds=round(s, 2), bound_output_tok_s=round(a.num_seqs * a.output_len / s, 1),
                          single_decode_bound_ms=round(single * 1e3, 2))))


if __name__ == "__main__":
    main()
