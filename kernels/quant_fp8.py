"""Per-token FP8 quantization of activations (quantization fp8): each row of x [M, K] to float8 e4m3 with
its own scale amax / 448, in one launch (the torch reference takes five: abs, amax, clamp, divide, cast).
Bit-equal to the reference: IEEE divisions and kernels.fp8's exact rounding."""
from __future__ import annotations

import torch

from kernels.dispatch import lazy_jit, next_pow2, num_warps_for, use_triton
from kernels.fp8 import FP8_DTYPE, FP8_MAX, _to_fp8

triton = tl = None  # bound to triton / triton.language by lazy_jit at the first launch

MIN_AMAX = 1e-12   # an all-zero row (padding) gets a tiny scale, not 0 / 0


def per_token_quant_fp8_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (x_fp8 [M, K], scale [M, 1] fp32), x ~ x_fp8 * scale."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True).clamp(min=MIN_AMAX)
    # A tensor divisor: torch on CUDA divides by a Python scalar as a product with its reciprocal, which
    # is not the correctly rounded quotient the kernel computes (div_rn).
    scale = amax / torch.full_like(amax, FP8_MAX)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


@lazy_jit
def _per_token_quant_kernel(x_ptr, y_ptr, scale_ptr, k, x_stride, BLOCK: tl.constexpr):
    """One program per row, the whole row in registers (K <= 16k for the models served)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < k
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12)
    scale = tl.math.div_rn(amax, 448.0)
    tl.store(scale_ptr + row, scale)
    tl.store(y_ptr + row * k + cols, _to_fp8(x, scale), mask=mask)


def per_token_quant_fp8_triton(x):
    m, k = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty(m, k, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m:
        block = next_pow2(k)
        _per_token_quant_kernel[(m,)](x, y, scale, k, x.stride(0), BLOCK=block, num_warps=num_warps_for(block))
    return y, scale


def per_token_quant_fp8(x):
    if use_triton(x):
        return per_token_quant_fp8_triton(x)
    return per_token_quant_fp8_ref(x)
