import torch

from kernels.dispatch import use_triton


def rotary_embedding_ref(positions, q, k, cos_sin_cache):
    """Neox-style rotary (as Llama/Qwen): q [T, Hq, D], k [T, Hk, D]; cos_sin_cache [max_pos, D]
    holds cos in the first D/2 columns and sin in the last. Returns new (q, k)."""
    cos, sin = cos_sin_cache[positions].float().chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

    def rotate(x):
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


def rotary_embedding(positions, q, k, cos_sin_cache):
    if use_triton(q):
        from kernels.triton_ops import rotary_embedding_triton
        return rotary_embedding_triton(positions, q, k, cos_sin_cache)
    return rotary_embedding_ref(positions, q, k, cos_sin_cache)
