import torch
import torch.nn.functional as F

from kernels.dispatch import use_triton


def paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale):
    """Varlen causal attention over the paged cache, for a packed batch of prefill chunks and decodes.

    q [T, Hq, D] holds each sequence's new tokens, packed (query_start_loc [S+1] gives the cuts);
    their K/V are already in the cache. Sequence s has seq_lens[s] tokens in all; its new tokens
    are the last ones, so query i of s sits at position seq_lens[s] - q_len + i and sees every
    position up to it. block_tables [S, max_blocks] maps logical to physical blocks.
    """
    out = torch.empty_like(q)
    block_size = k_cache.shape[1]
    group = q.shape[1] // k_cache.shape[2]
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    for s, seq_len in enumerate(lens):
        q_s = q[starts[s]:starts[s + 1]]
        q_len = q_s.shape[0]
        if q_len == 0:
            continue
        blocks = block_tables[s, :(seq_len + block_size - 1) // block_size].long()
        k = k_cache[blocks].flatten(0, 1)[:seq_len].float().repeat_interleave(group, dim=1)
        v = v_cache[blocks].flatten(0, 1)[:seq_len].float().repeat_interleave(group, dim=1)
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device).unsqueeze(1)
        mask = torch.arange(seq_len, device=q.device).unsqueeze(0) <= q_pos  # [q_len, seq_len]
        o = F.scaled_dot_product_attention(q_s.float().transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                           attn_mask=mask, scale=scale)
        out[starts[s]:starts[s + 1]] = o.transpose(0, 1).to(q.dtype)
    return out


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, max_query_len=None):
    if use_triton(q):
        from kernels.triton_ops import paged_attention_triton
        return paged_attention_triton(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                                      max_query_len)
    return paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale)
