"""The hardware bound of a workload: measure copy bandwidth and bf16 matmul TFLOP/s on this GPU,
then bound = prefill FLOPs at the matmul rate + every decode step's weight and KV bytes at the
copy bandwidth (all requests decode in lockstep, as in the offline benchmark).

usage: python bench/bound.py --shape llama3-8b --num-seqs 256 --input-len 512 --output-len 256
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.shapes import SHAPES, params_of  # noqa: E402


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


def bound_seconds(shape, num_seqs, input_len, output_len, copy_bw, flops):
    c = SHAPES[shape]
    p = params_of(shape)
    kv_per_token = c["num_hidden_layers"] * 2 * c["num_key_value_heads"] * c["head_dim"] * 2
    attn_flops_per_token_ctx = 4 * c["num_hidden_layers"] * c["num_attention_heads"] * c["head_dim"]
    prefill_tokens = num_seqs * input_len
    prefill_flops = 2 * p * prefill_tokens + attn_flops_per_token_ctx * num_seqs * input_len ** 2 / 2
    decode_s = 0.0
    for i in range(output_len):
        decode_s += (2 * p + num_seqs * (input_len + i) * kv_per_token) / copy_bw
    return prefill_flops / flops + decode_s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    a = ap.parse_args()
    bw, fl = measure()
    s = bound_seconds(a.shape, a.num_seqs, a.input_len, a.output_len, bw, fl)
    single = 2 * params_of(a.shape) / bw
    print(json.dumps(dict(bound="roofline", shape=a.shape, copy_tb_s=round(bw / 1e12, 2), matmul_tflops=round(fl / 1e12),
                          bound_seconds=round(s, 2), bound_output_tok_s=round(a.num_seqs * a.output_len / s, 1),
                          single_decode_bound_ms=round(single * 1e3, 2))))


if __name__ == "__main__":
    main()
