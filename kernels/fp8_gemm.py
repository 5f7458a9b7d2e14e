"""W8A16 GEMM for small batches (quantization fp8, decode): y [M, N] = x [M, K] @ (w [N, K] * w_scale [N, 1]).T
(+ bias) in x's dtype, with float8 e4m3 weights and per-output-channel fp32 scales; x is not quantized.

At decode sizes (M up to ~64) the GEMM is a stream of the weight: time ~ bytes of w / bandwidth. The kernel
  * tiles N only: each program owns BLOCK_N output channels and all BLOCK_M rows of an M tile, and loops
    over the whole K accumulating in fp32 registers, so no split-K partials and no reduce launch;
    parallelism comes from small BLOCK_N instead (the heuristic shrinks it to 16 until there are about
    two programs per SM; Llama-3-8B's narrowest projection, N = 4096, gets 256);
  * converts each [BLOCK_K, BLOCK_N] e4m3 tile to x's dtype in registers (exact: every e4m3 value is a
    bf16, fp16 and fp32 value) for a tensor-core dot with M padded to 16 rows (free: memory-bound);
  * applies the per-channel scale once to the fp32 accumulator, adds the bias in fp32, casts once.
No host syncs and no data-dependent host branches (the config follows shapes only): CUDA-graph safe.
"""
from __future__ import annotations

import os

import torch

from kernels.dispatch import cdiv, lazy_jit, num_sms, use_triton

triton = tl = None  # bound to triton / triton.language by lazy_jit at the first launch


def fp8_weight_gemm_ref(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ (weight [N, K] e4m3 * weight_scale [N]).T (+ bias) in fp32, cast to x's dtype."""
    y = x.float() @ (weight.float() * weight_scale.float()[:, None]).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


@lazy_jit
def _fp8_weight_gemm_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, m, n, k, x_stride, w_stride, out_stride,
                            HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok, m_ok = offs_n < n, offs_m < m
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * x_stride + offs_k[None, :]          # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * w_stride + offs_k[:, None]          # [BLOCK_K, BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k, BLOCK_K):
        k_ok = offs_k + k0 < k   # every load masked on K: the row past K is another row's (or no) memory
        x = tl.load(x_ptrs + k0, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs + k0, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST_DOT:
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w.to(tl.float32).to(x.dtype), acc, input_precision=DOT_PRECISION)
    acc *= tl.load(scale_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * out_stride + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def gemm_config(m: int, n: int, device: torch.device) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) from the shapes only (python ints)."""
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64     # tl.dot needs >= 16 rows; padding rows cost no bytes
    sms = num_sms(device)
    if m <= 16:
        # From bench/fp8_gemm.py --sweep on the H100 (Llama-3-8B projections, M = 1 and 16): a wide output
        # (gate_up, 28672) streams best in short K steps; the others in long ones (512) over the widest
        # tile that still gives ~0.7 programs per SM (qkv 64, o and down 32): 22-28% under the old pick.
        if cdiv(n, 32) >= 4 * sms:
            return block_m, 64, 128, 4, 3
        block_n = next((wide for wide in (64, 32) if cdiv(n, wide) >= 0.7 * sms), 16)
        return block_m, block_n, 512, 4, 4
    m_tiles = cdiv(m, block_m)
    block_n = 16
    for wide in (64, 32):   # widest tile that still leaves ~2 programs per SM to keep loads in flight
        if cdiv(n, wide) * m_tiles >= 2 * sms:
            block_n = wide
            break
    return block_m, block_n, 256, 4, 4


def fp8_weight_gemm_triton(x, weight, weight_scale, bias=None, *, block_n=None, block_k=None, num_warps=None,
                           num_stages=None):
    """The keyword-only knobs override the heuristic (tests force tile shapes with them; bench sweeps them)."""
    m, k = x.shape
    n = weight.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if x.stride(-1) != 1:
        x = x.contiguous()
    assert weight.stride(-1) == 1 and weight_scale.is_contiguous() and (bias is None or bias.is_contiguous())
    config = gemm_config(m, n, x.device)
    bm, bn, bk, warps, stages = (knob or c for knob, c in zip((None, block_n, block_k, num_warps, num_stages), config))
    grid = (cdiv(n, bn), cdiv(m, bm))
    _fp8_weight_gemm_kernel[grid](
        x, weight, weight_scale, bias if bias is not None else weight_scale, out, m, n, k,
        x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else None,   # fp32: no silent tf32
        # Triton's interpreter multiplies bf16 operands' storage bits in tl.dot: run those dots in fp32 there
        UPCAST_DOT=x.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1",
        num_warps=warps, num_stages=stages)
    return out


def fp8_weight_gemm(x, weight, weight_scale, bias=None):
    """x [M, K] (bf16/fp16/fp32) with e4m3 weight [N, K] and fp32 weight_scale [N] -> [M, N] in x's dtype."""
    if use_triton(x):
        return fp8_weight_gemm_triton(x, weight, weight_scale, bias)
    return fp8_weight_gemm_ref(x, weight, weight_scale, bias)
