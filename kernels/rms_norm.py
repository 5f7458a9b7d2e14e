from __future__ import annotations

import torch

from kernels.dispatch import lazy_jit, next_pow2, num_warps_for, use_triton
from kernels.pdl import pdl, pdl_wait
from kernels.fp8 import _quantize_row_fp8, launch_per_token_quant_fp8
from kernels.quant_fp8 import per_token_quant_fp8_ref

triton = tl = None  # bound to triton / triton.language by lazy_jit at the first launch


def rms_norm_ref(x, weight, eps, residual=None):
    """y = x / rms(x) * weight in fp32. With residual: x += residual first, return (y, x)."""
    if residual is not None:
        x = (x.float() + residual.float()).to(x.dtype)
        residual = x
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
    return y if residual is None else (y, residual)


@lazy_jit
def _normed_row(x_ptr, res_ptr, w_ptr, res_out_ptr, row, n_cols, x_stride, res_stride, eps,
                HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    """Row `row` of x (+ residual, whose rounded sum is stored to res_out) / rms * weight, fp32 [BLOCK]."""
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0).to(tl.float32)
        xr = (x + r).to(res_out_ptr.dtype.element_ty)      # the sum is rounded, as the reference does
        tl.store(res_out_ptr + row * n_cols + cols, xr, mask=mask)
        x = xr.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    return x * rstd * w


@lazy_jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, y_ptr, res_out_ptr, n_cols, x_stride, res_stride, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """One program per row; fp32 inside. Outputs are contiguous [rows, n_cols]."""
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    y = _normed_row(x_ptr, res_ptr, w_ptr, res_out_ptr, row, n_cols, x_stride, res_stride, eps, HAS_RESIDUAL, BLOCK)
    tl.store(y_ptr + row * n_cols + cols, y.to(y_ptr.dtype.element_ty), mask=cols < n_cols)


@lazy_jit
def _rms_norm_quant_fp8_kernel(y_ptr, scale_ptr, n_cols, x_ptr, res_ptr, w_ptr, res_out_ptr, x_stride, res_stride,
                               eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, HW_CAST: tl.constexpr,
                               PDL: tl.constexpr):
    """_rms_norm_kernel, then the row quantized to FP8 with its own scale (kernels.fp8): the normed
    row is rounded to x's dtype first, as rms_norm followed by per_token_quant_fp8 round it (the same
    math; compiled, the row sum's order may differ between the two kernels by an ulp of rstd)."""
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    y = _normed_row(x_ptr, res_ptr, w_ptr, res_out_ptr, row, n_cols, x_stride, res_stride, eps, HAS_RESIDUAL, BLOCK)
    _quantize_row_fp8(y.to(x_ptr.dtype.element_ty).to(tl.float32), y_ptr, scale_ptr, row, n_cols, BLOCK,
                      HW_CAST)


def _rows(t, n):
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _norm_inputs(x, weight, residual):
    """(n, x [rows, n], residual [rows, n] (x without one), weight), each with unit stride on the last dim."""
    n = x.shape[-1]
    x2 = _rows(x, n)
    r2 = _rows(residual, n) if residual is not None else x2
    return n, x2, r2, weight if weight.is_contiguous() else weight.contiguous()


def rms_norm_triton(x, weight, eps, residual=None):
    n, x2, r2, w = _norm_inputs(x, weight, residual)
    rows = x2.shape[0]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(y) if residual is not None else y
    if rows:
        block = next_pow2(n)
        _rms_norm_kernel[(rows,)](x2, r2, w, y, res_out, n, x2.stride(0), r2.stride(0), float(eps),
                                  HAS_RESIDUAL=residual is not None, BLOCK=block,
                                  num_warps=num_warps_for(block, rows, x.device),
                                  **pdl(x.device, feeds_gemm=True))
    return y if residual is None else (y, res_out)


def rms_norm_quant_fp8_triton(x, weight, eps, residual=None):
    """x [.., n] -> ((y_fp8 [rows, n], scale [rows, 1] fp32), residual_out | None): one launch for what
    rms_norm + per_token_quant_fp8 do in two (an FP8 projection's input)."""
    n, x2, r2, w = _norm_inputs(x, weight, residual)
    res_out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else None
    y_scale = launch_per_token_quant_fp8(_rms_norm_quant_fp8_kernel, x2.shape[0], n, x.device, x2, r2, w,
                                         res_out if res_out is not None else x2, x2.stride(0), r2.stride(0),
                                         float(eps), HAS_RESIDUAL=residual is not None)
    return y_scale, res_out


def rms_norm(x, weight, eps, residual=None):
    if use_triton(x):
        return rms_norm_triton(x, weight, eps, residual)
    return rms_norm_ref(x, weight, eps, residual)


def rms_norm_quant_fp8_ref(x, weight, eps, residual=None):
    out = rms_norm_ref(x, weight, eps, residual)
    y, residual_out = out if residual is not None else (out, None)
    return per_token_quant_fp8_ref(y.reshape(-1, x.shape[-1])), residual_out


def rms_norm_quant_fp8(x, weight, eps, residual=None):
    if use_triton(x):
        return rms_norm_quant_fp8_triton(x, weight, eps, residual)
    return rms_norm_quant_fp8_ref(x, weight, eps, residual)
