from __future__ import annotations

import torch

from kernels.dispatch import lazy_jit, next_pow2, use_triton
from kernels.pdl import pdl, pdl_wait
from kernels.fp8 import _to_fp8, is_fp8, to_fp8_ref

triton = tl = None  # bound to triton / triton.language by lazy_jit at the first launch


def store_kvcache_ref(k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None):
    """Write k, v [T, Hk, D] into the caches [num_blocks, block_size, Hk, D] at flat slots
    (block_id * block_size + offset); slot -1 marks padding and is skipped. FP8 caches get
    k / k_scale and v / v_scale (fp32 tensors of one element), saturated (kernels.fp8)."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    if is_fp8(k_cache):
        k, v = to_fp8_ref(k, k_scale), to_fp8_ref(v, v_scale)
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep]
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep]


@lazy_jit
def _store_kvcache_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, k_scale_ptr, v_scale_ptr,
                          k_stride_t, k_stride_h, v_stride_t, v_stride_h, c_stride_b, c_stride_s, c_stride_h,
                          num_heads, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                          BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, KV_FP8: tl.constexpr, PDL: tl.constexpr):
    """One program per token; int64 slot math; slot < 0 (padding) is skipped. KV_FP8: the caches
    are float8 and take value / scale (the scales are read on the device: no host sync)."""
    pdl_wait(PDL)
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    dst = (slot // BLOCK_SIZE) * c_stride_b + (slot % BLOCK_SIZE) * c_stride_s
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < num_heads) & (d < HEAD_DIM)
    kv = tl.load(k_ptr + t * k_stride_t + h * k_stride_h + d, mask=mask)
    vv = tl.load(v_ptr + t * v_stride_t + h * v_stride_h + d, mask=mask)
    if KV_FP8:
        kv = _to_fp8(kv.to(tl.float32), tl.load(k_scale_ptr))
        vv = _to_fp8(vv.to(tl.float32), tl.load(v_scale_ptr))
    tl.store(k_cache_ptr + dst + h * c_stride_h + d, kv, mask=mask)
    tl.store(v_cache_ptr + dst + h * c_stride_h + d, vv, mask=mask)


def store_kvcache_triton(k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None):
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1, "k/v caches must share a layout"
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    t, h, d = k.shape
    if t:
        fp8 = is_fp8(k_cache)
        _store_kvcache_kernel[(t,)](k, v, k_cache, v_cache, slot_mapping, k_scale if fp8 else k,
                                    v_scale if fp8 else v, k.stride(0), k.stride(1), v.stride(0),   # unused unless fp8
                                    v.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), h,
                                    BLOCK_SIZE=k_cache.shape[1], HEAD_DIM=d, BLOCK_H=next_pow2(h),
                                    BLOCK_D=next_pow2(d), KV_FP8=fp8, num_warps=4, **pdl(k.device))


def store_kvcache(k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None):
    """k_scale, v_scale: fp32 tensors of one element, needed with FP8 caches only."""
    if use_triton(k):
        return store_kvcache_triton(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return store_kvcache_ref(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
