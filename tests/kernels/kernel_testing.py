"""Shared pieces of the kernel tests."""
import torch

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")

# (atol, rtol) per dtype; bf16 as vLLM's kernel tests
TOL = {torch.bfloat16: (1.5e-2, 1e-2), torch.float16: (5e-3, 5e-3), torch.float32: (1e-4, 1e-4)}


def assert_close(actual, expected, dtype=None):
    atol, rtol = TOL[dtype or expected.dtype]
    assert not torch.isnan(actual).any(), "NaN in the kernel's output"
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)


def make_paged_batch(seq_lens, q_lens, num_kv_heads, group, head_dim, block_size, dtype, device=DEVICE,
                     seed=0, min_num_blocks=0):
    """A packed batch over a scattered paged cache.

    Blocks are assigned at random from a pool about twice the size needed; every slot that no
    sequence owns (whole free blocks and the tail of each last block) holds NaN, and the block
    table's padding holds an id far past the pool, so a kernel that reads past a sequence's length
    gives NaN or faults.
    """
    g = torch.Generator().manual_seed(seed)
    gd = torch.Generator(device=device).manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    need = sum(blocks_per_seq)
    num_blocks = max(2 * need + 3, min_num_blocks)
    width = max(blocks_per_seq + [1]) + 2
    owner = torch.randperm(num_blocks, generator=g)[:need]
    table = torch.full((len(seq_lens), width), num_blocks + 1_000_000, dtype=torch.int32)
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype, device=device)
    v_cache = torch.full_like(k_cache, float("nan"))
    i = 0
    for s, (n, nb) in enumerate(zip(seq_lens, blocks_per_seq)):
        ids = owner[i:i + nb]
        i += nb
        table[s, :nb] = ids.int()
        kv = torch.randn(2, nb * block_size, num_kv_heads, head_dim, generator=gd, device=device).to(dtype)
        kv[:, n:] = float("nan")
        k_cache[ids.to(device)] = kv[0].view(nb, block_size, num_kv_heads, head_dim)
        v_cache[ids.to(device)] = kv[1].view(nb, block_size, num_kv_heads, head_dim)
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    q = torch.randn(starts[-1], num_kv_heads * group, head_dim, generator=gd, device=device).to(dtype)
    i32 = dict(dtype=torch.int32, device=device)
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=table.to(device),
                seq_lens=torch.tensor(seq_lens, **i32), query_start_loc=torch.tensor(starts, **i32),
                scale=head_dim ** -0.5)


def ref_attention(b):
    """The reference, with the table's padding made harmless (it only reads a sequence's own blocks)."""
    from kernels.paged_attention import paged_attention_ref
    return paged_attention_ref(b["q"], b["k_cache"], b["v_cache"], b["block_tables"], b["seq_lens"],
                               b["query_start_loc"], b["scale"])
