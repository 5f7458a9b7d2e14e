"""The attention layer's prologue in one launch: per-head q/k RMSNorm (optional, Qwen3), Neox rotary on
q and k, and the paged-cache write of k and v.

Separately these are up to six launches per layer (q norm, k norm, their .contiguous() copies of the
strided qkv views, rotary, store_kvcache); at decode each costs more than its work. The kernel reads
q, k and v straight from the fused qkv projection's output (strided views) and never writes k back:
rotated k only goes to the cache.
"""
from __future__ import annotations

import torch

from kernels.dispatch import lazy_jit, next_pow2, num_warps_for, use_triton
from kernels.pdl import pdl, pdl_wait
from kernels.fp8 import _to_fp8, is_fp8
from kernels.rms_norm import rms_norm_ref
from kernels.rotary import rotary_embedding_ref
from kernels.store_kvcache import store_kvcache_ref

triton = tl = None  # bound to triton / triton.language by lazy_jit at the first launch


def qk_norm_rotary_store_ref(positions, q, k, v, k_cache, v_cache, slot_mapping, cos_sin_cache,
                             q_norm_weight=None, k_norm_weight=None, eps=1e-6, k_scale=None, v_scale=None):
    """The three references in the order the layer ran them: q/k norm, rotary, cache write.
    Returns a new q; leaves q, k and v untouched."""
    if q_norm_weight is not None:
        q = rms_norm_ref(q, q_norm_weight, eps)
    if k_norm_weight is not None:
        k = rms_norm_ref(k, k_norm_weight, eps)
    q, k = rotary_embedding_ref(positions, q, k, cos_sin_cache)
    store_kvcache_ref(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return q


@lazy_jit
def _head_tile(num_heads, offs, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    """Head indices [BLOCK_H, 1] and the mask of a [BLOCK_H, BLOCK_HALF] half-head tile."""
    heads = tl.arange(0, BLOCK_H)[:, None]
    return heads, (heads < num_heads) & (offs[None, :] < HALF)


@lazy_jit
def _normed_rotated(x_at, mask, w_ptr, eps, cos, sin, offs, HAS_NORM: tl.constexpr, HALF: tl.constexpr):
    """A token's heads at x_at (pointers to each head's first half): optional RMSNorm over the head,
    then rotary; fp32 halves out. Masked lanes load 0, so they add nothing to the sum of squares."""
    x1 = tl.load(x_at, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_at + HALF, mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:
        rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF) + eps)[:, None]
        w1 = tl.load(w_ptr + offs, mask=offs < HALF, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(w_ptr + HALF + offs, mask=offs < HALF, other=0.0).to(tl.float32)[None, :]
        # rounded to the input dtype between norm and rotary, as the separate ops stored it
        x1 = (x1 * rstd * w1).to(x_at.dtype.element_ty).to(tl.float32)
        x2 = (x2 * rstd * w2).to(x_at.dtype.element_ty).to(tl.float32)
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@lazy_jit
def _for_cache(x, cache_ptr, scale_ptr, KV_FP8: tl.constexpr):
    """x as the cache stores it: its dtype, or FP8 of x / scale."""
    if KV_FP8:
        y = _to_fp8(x.to(tl.float32), tl.load(scale_ptr))
    else:
        y = x.to(cache_ptr.dtype.element_ty)
    return y


@lazy_jit
def _qk_norm_rotary_store_kernel(
        pos_ptr, slot_ptr, cs_ptr, q_ptr, k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, q_w_ptr, k_w_ptr, eps,
        k_scale_ptr, v_scale_ptr,
        q_stride_t, q_stride_h, k_stride_t, k_stride_h, v_stride_t, v_stride_h, cs_stride,
        c_stride_b, c_stride_s, c_stride_h, num_q_heads, num_kv_heads,
        BLOCK_SIZE: tl.constexpr, HALF: tl.constexpr, HAS_Q_NORM: tl.constexpr, HAS_K_NORM: tl.constexpr,
        BLOCK_HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, KV_FP8: tl.constexpr,
        PDL: tl.constexpr):
    """One program per token: all its q heads (written back in place), then, unless its slot is
    padding (< 0), all its k and v heads into the cache. int64 token and slot offsets. KV_FP8: the
    caches are float8 and take value / scale."""
    t = tl.program_id(0).to(tl.int64)
    # before the wait, what no kernel of the forward pass writes: the batch's positions and slots, the angles
    pos = tl.load(pos_ptr + t).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    offs = tl.arange(0, BLOCK_HALF)
    cos = tl.load(cs_ptr + pos * cs_stride + offs, mask=offs < HALF, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(cs_ptr + pos * cs_stride + HALF + offs, mask=offs < HALF, other=0.0).to(tl.float32)[None, :]
    pdl_wait(PDL)

    q_heads, q_mask = _head_tile(num_q_heads, offs, HALF, BLOCK_HQ)
    q_at = q_ptr + t * q_stride_t + q_heads * q_stride_h + offs[None, :]
    q1, q2 = _normed_rotated(q_at, q_mask, q_w_ptr, eps, cos, sin, offs, HAS_Q_NORM, HALF)
    tl.store(q_at, q1.to(q_ptr.dtype.element_ty), mask=q_mask)
    tl.store(q_at + HALF, q2.to(q_ptr.dtype.element_ty), mask=q_mask)

    if slot >= 0:
        kv_heads, kv_mask = _head_tile(num_kv_heads, offs, HALF, BLOCK_HK)
        dst = (slot // BLOCK_SIZE) * c_stride_b + (slot % BLOCK_SIZE) * c_stride_s + kv_heads * c_stride_h + offs[None, :]
        k_at = k_ptr + t * k_stride_t + kv_heads * k_stride_h + offs[None, :]
        k1, k2 = _normed_rotated(k_at, kv_mask, k_w_ptr, eps, cos, sin, offs, HAS_K_NORM, HALF)
        # through k's dtype first: the reference rounds rotated k to it before the cache takes it
        tl.store(k_cache_ptr + dst, _for_cache(k1.to(k_ptr.dtype.element_ty), k_cache_ptr, k_scale_ptr, KV_FP8),
                 mask=kv_mask)
        tl.store(k_cache_ptr + dst + HALF,
                 _for_cache(k2.to(k_ptr.dtype.element_ty), k_cache_ptr, k_scale_ptr, KV_FP8), mask=kv_mask)
        v_at = v_ptr + t * v_stride_t + kv_heads * v_stride_h + offs[None, :]
        tl.store(v_cache_ptr + dst, _for_cache(tl.load(v_at, mask=kv_mask), v_cache_ptr, v_scale_ptr, KV_FP8),
                 mask=kv_mask)
        tl.store(v_cache_ptr + dst + HALF,
                 _for_cache(tl.load(v_at + HALF, mask=kv_mask), v_cache_ptr, v_scale_ptr, KV_FP8), mask=kv_mask)


def _last_dim_dense(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def qk_norm_rotary_store_triton(positions, q, k, v, k_cache, v_cache, slot_mapping, cos_sin_cache,
                                q_norm_weight=None, k_norm_weight=None, eps=1e-6, k_scale=None, v_scale=None):
    """One launch. Overwrites q in place (its storage: for the layer, the qkv projection's output) and
    returns it, so no q buffer is allocated; k and v are only read."""
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1, "k/v caches must share a layout"
    q, k, v, cs = (_last_dim_dense(x) for x in (q, k, v, cos_sin_cache))
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    assert head_dim % 2 == 0 and k.shape[2] == head_dim and v.shape == k.shape
    if num_tokens:
        half = head_dim // 2
        block_hq = next_pow2(num_q_heads)
        fp8 = is_fp8(k_cache)
        _qk_norm_rotary_store_kernel[(num_tokens,)](
            positions, slot_mapping, cs, q, k, v, k_cache, v_cache,
            _last_dim_dense(q_norm_weight) if q_norm_weight is not None else q,   # placeholders: never read
            _last_dim_dense(k_norm_weight) if k_norm_weight is not None else k, float(eps),
            k_scale if fp8 else k, v_scale if fp8 else v,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cs.stride(0),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), num_q_heads, num_kv_heads,
            BLOCK_SIZE=k_cache.shape[1], HALF=half, HAS_Q_NORM=q_norm_weight is not None,
            HAS_K_NORM=k_norm_weight is not None, BLOCK_HALF=next_pow2(half), BLOCK_HQ=block_hq,
            BLOCK_HK=next_pow2(num_kv_heads), KV_FP8=fp8,
            num_warps=num_warps_for(block_hq * 2 * next_pow2(half), num_tokens, q.device),
            **pdl(q.device, feeds_attention=True))
    return q


def qk_norm_rotary_store(positions, q, k, v, k_cache, v_cache, slot_mapping, cos_sin_cache,
                         q_norm_weight=None, k_norm_weight=None, eps=1e-6, k_scale=None, v_scale=None):
    """q [T, Hq, D], k/v [T, Hk, D] (views of the qkv projection are fine: last dim contiguous).
    RMSNorms each q (k) head over D when q_norm_weight (k_norm_weight) is given, applies Neox rotary at
    `positions` (cos_sin_cache [max_pos, D]: cos | sin), writes rotated k and v into the paged caches
    [num_blocks, block_size, Hk, D] at slot_mapping (-1: padding, nothing written), and returns the
    normed, rotated q. Use the returned q only: the kernel path writes it into q's storage, the
    reference returns a new tensor. FP8 caches (float8_e4m3fn) take k / k_scale and v / v_scale
    (fp32 tensors of one element), saturated to ±448."""
    args = (positions, q, k, v, k_cache, v_cache, slot_mapping, cos_sin_cache, q_norm_weight, k_norm_weight, eps,
            k_scale, v_scale)
    if use_triton(q):
        return qk_norm_rotary_store_triton(*args)
    return qk_norm_rotary_store_ref(*args)
