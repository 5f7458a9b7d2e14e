from __future__ import annotations

import torch

from kernels.dispatch import lazy_jit, next_pow2, use_triton

triton = tl = None  # bound to triton / triton.language by lazy_jit at the first launch


def store_kvcache_ref(k, v, k_cache, v_cache, slot_mapping):
    """Write k, v [T, Hk, D] into the caches [num_blocks, block_size, Hk, D] at flat slots
    (block_id * block_size + offset); slot -1 marks padding and is skipped."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep]
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep]


@lazy_jit
def _store_kvcache_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                          k_stride_t, k_stride_h, v_stride_t, v_stride_h, c_stride_b, c_stride_s, c_stride_h,
                          num_heads, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                          BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per token; int64 slot math; slot < 0 (padding) is skipped."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    dst = (slot // BLOCK_SIZE) * c_stride_b + (slot % BLOCK_SIZE) * c_stride_s
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < num_heads) & (d < HEAD_DIM)
    kv = tl.load(k_ptr + t * k_stride_t + h * k_stride_h + d, mask=mask)
    tl.store(k_cache_ptr + dst + h * c_stride_h + d, kv, mask=mask)
    vv = tl.load(v_ptr + t * v_stride_t + h * v_stride_h + d, mask=mask)
    tl.store(v_cache_ptr + dst + h * c_stride_h + d, vv, mask=mask)


def store_kvcache_triton(k, v, k_cache, v_cache, slot_mapping):
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1, "k/v caches must share a layout"
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    t, h, d = k.shape
    if t:
        _store_kvcache_kernel[(t,)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0),
                                    v.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), h,
                                    BLOCK_SIZE=k_cache.shape[1], HEAD_DIM=d, BLOCK_H=next_pow2(h),
                                    BLOCK_D=next_pow2(d), num_warps=4)


def store_kvcache(k, v, k_cache, v_cache, slot_mapping):
    if use_triton(k):
        return store_kvcache_triton(k, v, k_cache, v_cache, slot_mapping)
    return store_kvcache_ref(k, v, k_cache, v_cache, slot_mapping)
