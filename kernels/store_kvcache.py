import torch

from kernels.dispatch import use_triton


def store_kvcache_ref(k, v, k_cache, v_cache, slot_mapping):
    """Write k, v [T, Hk, D] into the caches [num_blocks, block_size, Hk, D] at flat slots
    (block_id * block_size + offset); slot -1 marks padding and is skipped."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep]
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep]


def store_kvcache(k, v, k_cache, v_cache, slot_mapping):
    if use_triton(k):
        from kernels.triton_ops import store_kvcache_triton
        return store_kvcache_triton(k, v, k_cache, v_cache, slot_mapping)
    return store_kvcache_ref(k, v, k_cache, v_cache, slot_mapping)
