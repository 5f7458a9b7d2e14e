from __future__ import annotations

import torch

from kernels.dispatch import lazy_jit, next_pow2, use_triton
from kernels.pdl import pdl, pdl_wait

triton = tl = None  # bound to triton / triton.language by lazy_jit at the first launch


def rotary_embedding_ref(positions, q, k, cos_sin_cache):
    """Neox-style rotary (as Llama/Qwen): q [T, Hq, D], k [T, Hk, D]; cos_sin_cache [max_pos, D]
    holds cos in the first D/2 columns and sin in the last. Returns new (q, k)."""
    cos, sin = cos_sin_cache[positions].float().chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

    def rotate(x):
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


@lazy_jit
def _rotate_heads(x_ptr, t, stride_t, stride_h, num_heads, cos, sin, offs, HALF: tl.constexpr,
                  BLOCK_H: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)
    mask = (heads[:, None] < num_heads) & (offs[None, :] < HALF)
    p = x_ptr + t * stride_t + heads[:, None] * stride_h + offs[None, :]
    x1 = tl.load(p, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(p, (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(p + HALF, (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty), mask=mask)


@lazy_jit
def _rotary_kernel(pos_ptr, q_ptr, k_ptr, cs_ptr, q_stride_t, q_stride_h, k_stride_t, k_stride_h, cs_stride,
                   num_q_heads, num_k_heads, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
                   BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, PDL: tl.constexpr):
    """One program per token: rotates all its q and k heads in place (fp32 inside)."""
    pdl_wait(PDL)
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    offs = tl.arange(0, BLOCK_HALF)
    cs = cs_ptr + pos * cs_stride
    cos = tl.load(cs + offs, mask=offs < HALF, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(cs + HALF + offs, mask=offs < HALF, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(q_ptr, t, q_stride_t, q_stride_h, num_q_heads, cos, sin, offs, HALF, BLOCK_HQ)
    _rotate_heads(k_ptr, t, k_stride_t, k_stride_h, num_k_heads, cos, sin, offs, HALF, BLOCK_HK)


def rotary_embedding_triton(positions, q, k, cos_sin_cache):
    """Rotates q and k in place (copies first when their last dim is strided) and returns them."""
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    cs = cos_sin_cache if cos_sin_cache.stride(-1) == 1 else cos_sin_cache.contiguous()
    t, hq, d = q.shape
    if t:
        half = d // 2
        _rotary_kernel[(t,)](positions, q, k, cs, q.stride(0), q.stride(1), k.stride(0), k.stride(1), cs.stride(0),
                             hq, k.shape[1], HALF=half, BLOCK_HALF=next_pow2(half), BLOCK_HQ=next_pow2(hq),
                             BLOCK_HK=next_pow2(k.shape[1]), num_warps=4, **pdl(q.device))
    return q, k


def rotary_embedding(positions, q, k, cos_sin_cache):
    if use_triton(q):
        return rotary_embedding_triton(positions, q, k, cos_sin_cache)
    return rotary_embedding_ref(positions, q, k, cos_sin_cache)
