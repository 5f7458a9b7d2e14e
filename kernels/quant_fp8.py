"""Per-token FP8 quantization of activations (quantization fp8): each row of x [M, K] to float8 e4m3 with
its own scale amax / 448, in one launch (the torch reference takes several: abs, amax, clamp, reciprocal,
multiply, cast).
Bit-equal to the reference: x times the scale's IEEE reciprocal, rounded to nearest even."""
from __future__ import annotations

import torch

from kernels.dispatch import lazy_jit, use_triton
from kernels.pdl import pdl_wait
from kernels.fp8 import FP8_DTYPE, FP8_MAX, MIN_AMAX, _quantize_row_fp8, launch_per_token_quant_fp8

triton = tl = None  # bound to triton / triton.language by lazy_jit at the first launch


def per_token_quant_fp8_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (x_fp8 [M, K], scale [M, 1] fp32), x ~ x_fp8 * scale."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True).clamp(min=MIN_AMAX)
    # A tensor divisor: torch on CUDA divides by a Python scalar as a product with its reciprocal, which
    # is not the correctly rounded quotient the kernel computes (div_rn).
    scale = amax / torch.full_like(amax, FP8_MAX)
    return (xf * (torch.ones_like(scale) / scale)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


@lazy_jit
def _per_token_quant_kernel(y_ptr, scale_ptr, k, x_ptr, x_stride, BLOCK: tl.constexpr, HW_CAST: tl.constexpr,
                            PDL: tl.constexpr):
    """One program per row, the whole row in registers (K <= 16k for the models served)."""
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * x_stride + cols, mask=cols < k, other=0.0).to(tl.float32)
    _quantize_row_fp8(x, y_ptr, scale_ptr, row, k, BLOCK, HW_CAST)


def per_token_quant_fp8_triton(x):
    m, k = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    return launch_per_token_quant_fp8(_per_token_quant_kernel, m, k, x.device, x, x.stride(0))


def per_token_quant_fp8(x):
    if use_triton(x):
        return per_token_quant_fp8_triton(x)
    return per_token_quant_fp8_ref(x)
