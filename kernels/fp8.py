"""FP8 (e4m3, as torch.float8_e4m3fn and tl.float8e4nv) for the KV cache and activations: value / scale,
saturated to ±448, rounded to nearest even. A torch reference, the Triton helpers the cache-writing and the
per-token quantizing kernels share, and the launch of the latter."""
from __future__ import annotations

import torch

from kernels.dispatch import interpreted, lazy_jit, next_pow2, num_warps_for
from kernels.pdl import pdl

triton = tl = None  # bound to triton / triton.language by lazy_jit at the first launch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
MIN_AMAX = 1e-12   # per-token scales: an all-zero row (padding) gets a tiny scale, not 0 / 0


def is_fp8(t: torch.Tensor) -> bool:
    return t.dtype == FP8_DTYPE


def to_fp8_ref(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale in fp32, saturated (torch's cast alone turns values past 448 into NaN)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def from_fp8_ref(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.float() * scale


@lazy_jit
def _round_to_e4m3_grid(x):
    """fp32 x (|x| <= 448) rounded to the nearest e4m3 value (ties to even), still fp32. The cast to
    float8 is then exact, so its result does not depend on how the cast rounds (Triton's interpreter
    truncates); on the GPU this costs a few integer ops per element of a memory-bound store."""
    bits = x.to(tl.int32, bitcast=True)
    exponent = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)              # e4m3 subnormals share 2^-6's spacing
    ulp = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)     # 3 mantissa bits: powers of two,
    inv_ulp = ((127 - exponent + 3) << 23).to(tl.float32, bitcast=True)  # so these products are exact
    rounded = ((tl.abs(x) * inv_ulp + 12582912.0) - 12582912.0) * ulp   # 1.5 * 2^23: fp32 adds round to even
    # x's sign bit put back with an OR: a negation may compile to 0 - x, which turns -0.0 into +0.0
    # (torch's cast keeps it: a value that rounds to zero from below is -0).
    return (rounded.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)


@lazy_jit
def _saturated_e4m3(x, HW_CAST: tl.constexpr):
    """fp32 x saturated to +-448 and rounded to tl.float8e4nv, to nearest even: the hardware's cast (HW_CAST,
    compiled code), else _round_to_e4m3_grid first (the interpreter's cast truncates)."""
    x = tl.minimum(tl.maximum(x, -448.0), 448.0)
    if HW_CAST:
        return x.to(tl.float8e4nv, fp_downcast_rounding="rtne")
    return _round_to_e4m3_grid(x).to(tl.float8e4nv)


@lazy_jit
def _to_fp8(x, scale):
    """fp32 x -> tl.float8e4nv of x / scale, bit-equal to to_fp8_ref (IEEE division, as torch's)."""
    return _saturated_e4m3(tl.math.div_rn(x, scale), False)


@lazy_jit
def _quantize_row_fp8(x, y_ptr, scale_ptr, row, n_cols, BLOCK: tl.constexpr, HW_CAST: tl.constexpr):
    """The tail of every per-token quantizing kernel: fp32 row `row` x [BLOCK] (0 past n_cols) to FP8 at
    y_ptr (contiguous [rows, n_cols]) with its own scale max(amax, MIN_AMAX) / FP8_MAX, stored at
    scale_ptr + row. Each value is multiplied by the scale's reciprocal (one IEEE division a row, as
    vLLM's quantizing kernels do): a row of 14,336 is one program's, and a division per value made that
    program compute-bound (H100, M = 32, with the hardware cast: 4.9 -> 1.8 us a row of 14,336, 1.9 -> 1.3
    of 4,096). HW_CAST: see _saturated_e4m3. Literals, not the globals: a jit function may read only
    constexpr globals."""
    cols = tl.arange(0, BLOCK)
    amax = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12)
    scale = tl.math.div_rn(amax, 448.0)
    tl.store(scale_ptr + row, scale)
    y = _saturated_e4m3(x * tl.math.div_rn(1.0, scale), HW_CAST)
    tl.store(y_ptr + row * n_cols + cols, y, mask=cols < n_cols)


def launch_per_token_quant_fp8(kernel, rows, n_cols, device, *args, **constexprs):
    """(y_fp8 [rows, n_cols], scale [rows, 1] fp32) from a kernel that ends in _quantize_row_fp8, launched
    as kernel(y, scale, n_cols, *args, BLOCK, HW_CAST, **constexprs): one program per row, the whole row in one
    block. Its output is an FP8 GEMM's input: under PDL it releases that GEMM early (kernels.pdl)."""
    y = torch.empty(rows, n_cols, dtype=FP8_DTYPE, device=device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=device)
    if rows:
        block = next_pow2(n_cols)
        kernel[(rows,)](y, scale, n_cols, *args, BLOCK=block, HW_CAST=not interpreted(),
                        num_warps=num_warps_for(block, rows, device), **constexprs, **pdl(device, feeds_gemm=True))
    return y, scale
