from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.dispatch import cdiv, lazy_jit, next_pow2, use_triton
from kernels.pdl import pdl, pdl_wait
from kernels.fp8 import _quantize_row_fp8, launch_per_token_quant_fp8
from kernels.quant_fp8 import per_token_quant_fp8_ref

triton = tl = None  # bound to triton / triton.language by lazy_jit at the first launch


def silu_and_mul_ref(x):
    """x = [gate | up] on the last dim -> silu(gate) * up."""
    gate, up = x.chunk(2, dim=-1)
    return (F.silu(gate.float()) * up.float()).to(x.dtype)


@lazy_jit
def _silu_and_mul_kernel(x_ptr, y_ptr, d, x_stride, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Grid (rows, cdiv(d, BLOCK)); fp32 inside; y contiguous [rows, d]."""
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_stride + d + cols, mask=mask, other=0.0).to(tl.float32)
    y = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(y_ptr + row * d + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def _gate_up_rows(x):
    """(d, x as [rows, 2d] with unit stride on the last dim)."""
    d = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * d)
    return d, x2 if x2.stride(-1) == 1 else x2.contiguous()


def silu_and_mul_triton(x):
    d, x2 = _gate_up_rows(x)
    y = torch.empty(*x.shape[:-1], d, dtype=x.dtype, device=x.device)
    rows = x2.shape[0]
    if rows and d:
        block = min(1024, next_pow2(d))
        _silu_and_mul_kernel[(rows, cdiv(d, block))](x2, y, d, x2.stride(0), BLOCK=block,
                                                             num_warps=4 if block >= 512 else 2,
                                                             **pdl(x.device, feeds_gemm=True))
    return y


def silu_and_mul(x):
    if use_triton(x):
        return silu_and_mul_triton(x)
    return silu_and_mul_ref(x)


@lazy_jit
def _silu_and_mul_quant_fp8_kernel(y_ptr, scale_ptr, d, x_ptr, x_stride, BLOCK: tl.constexpr, HW_CAST: tl.constexpr,
                                   PDL: tl.constexpr):
    """One program per row, the whole row in registers: silu(gate) * up as _silu_and_mul_kernel computes
    it, rounded to x's dtype, then quantized to FP8 with the row's own scale (kernels.fp8)."""
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_stride + d + cols, mask=mask, other=0.0).to(tl.float32)
    y = (gate / (1.0 + tl.exp(-gate)) * up).to(x_ptr.dtype.element_ty).to(tl.float32)
    _quantize_row_fp8(y, y_ptr, scale_ptr, row, d, BLOCK, HW_CAST)


def silu_and_mul_quant_fp8_triton(x):
    """x [.., 2d] -> (y_fp8 [rows, d], scale [rows, 1] fp32): silu_and_mul and per_token_quant_fp8 in one
    launch (the input of an FP8 down projection)."""
    d, x2 = _gate_up_rows(x)
    return launch_per_token_quant_fp8(_silu_and_mul_quant_fp8_kernel, x2.shape[0], d, x.device, x2, x2.stride(0))


def silu_and_mul_quant_fp8(x):
    if use_triton(x):
        return silu_and_mul_quant_fp8_triton(x)
    return per_token_quant_fp8_ref(silu_and_mul_ref(x).reshape(-1, x.shape[-1] // 2))
