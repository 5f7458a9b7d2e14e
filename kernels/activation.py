from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.dispatch import cdiv, lazy_jit, next_pow2, use_triton

triton = tl = None  # bound to triton / triton.language by lazy_jit at the first launch


def silu_and_mul_ref(x):
    """x = [gate | up] on the last dim -> silu(gate) * up."""
    gate, up = x.chunk(2, dim=-1)
    return (F.silu(gate.float()) * up.float()).to(x.dtype)


@lazy_jit
def _silu_and_mul_kernel(x_ptr, y_ptr, d, x_stride, BLOCK: tl.constexpr):
    """Grid (rows, cdiv(d, BLOCK)); fp32 inside; y contiguous [rows, d]."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_stride + d + cols, mask=mask, other=0.0).to(tl.float32)
    y = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(y_ptr + row * d + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def silu_and_mul_triton(x):
    d = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(*x.shape[:-1], d, dtype=x.dtype, device=x.device)
    rows = x2.shape[0]
    if rows and d:
        block = min(1024, next_pow2(d))
        _silu_and_mul_kernel[(rows, cdiv(d, block))](x2, y, d, x2.stride(0), BLOCK=block,
                                                             num_warps=4 if block >= 512 else 2)
    return y


def silu_and_mul(x):
    if use_triton(x):
        return silu_and_mul_triton(x)
    return silu_and_mul_ref(x)
