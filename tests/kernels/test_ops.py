"""store_kvcache, rms_norm, rotary_embedding and silu_and_mul kernels against their torch references."""
import pytest
import torch

import kernels
from kernels.activation import silu_and_mul_ref
from kernels.rms_norm import rms_norm_ref
from kernels.rotary import rotary_embedding_ref
from kernels.store_kvcache import store_kvcache_ref

from tests.kernels.kernel_testing import DEVICE, ON_GPU, assert_close

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# (tokens, hidden): small everywhere; Llama-3-8B-sized rows on CUDA
SHAPES = [(1, 64), (7, 96), (33, 256)] + ([(256, 4096), (4096, 4096), (16, 14336)] if ON_GPU else [])


def randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.randn(*shape, generator=g, device=DEVICE).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm(dtype, shape):
    x, w = randn(*shape, dtype=dtype), randn(shape[-1], seed=1)
    assert_close(kernels.rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_fused_residual(dtype, shape):
    x, r, w = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype, seed=2), randn(shape[-1], dtype=dtype, seed=1)
    x0, r0 = x.clone(), r.clone()
    y, new_r = kernels.rms_norm(x, w, 1e-5, r)
    y_ref, r_ref = rms_norm_ref(x, w, 1e-5, r)
    assert_close(new_r, r_ref)
    assert_close(y, y_ref)
    assert torch.equal(x, x0) and torch.equal(r, r0)   # inputs untouched


def test_rms_norm_per_head_on_3d():
    """q/k norm (Qwen3) normalizes [T, H, D] over D."""
    x, w = randn(5, 4, 32, dtype=torch.bfloat16), randn(32, seed=3)
    assert_close(kernels.rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(4, 4, 16), (8, 2, 64), (5, 1, 128)] + ([(32, 8, 128), (28, 4, 128)] if ON_GPU else []))
def test_rotary(dtype, heads):
    hq, hk, d = heads
    t, max_pos = (300 if ON_GPU else 9), 4096
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float64), inv)
    cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1).float().to(DEVICE)
    pos = torch.randint(0, max_pos, (t,), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    # q and k as views of one fused projection, as a fused qkv layer would hand them over
    qkv = randn(t, (hq + 2 * hk) * d, dtype=dtype)
    q, k = qkv[:, :hq * d].view(t, hq, d), qkv[:, hq * d:(hq + hk) * d].view(t, hk, d)
    q_ref, k_ref = rotary_embedding_ref(pos, q, k, cache)
    q_out, k_out = kernels.rotary_embedding(pos, q, k, cache)
    assert_close(q_out, q_ref)
    assert_close(k_out, k_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 32), (7, 344), (3, 2048)] + ([(256, 14336), (4096, 14336)] if ON_GPU else []))
def test_silu_and_mul(dtype, shape):
    x = randn(shape[0], 2 * shape[1], dtype=dtype)
    assert_close(kernels.silu_and_mul(x), silu_and_mul_ref(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("heads", [(2, 16), (1, 64)] + ([(8, 128)] if ON_GPU else []))
def test_store_kvcache(dtype, block_size, heads):
    h, d = heads
    t, num_blocks = (512 if ON_GPU else 13), 64 if not ON_GPU else 4096
    g = torch.Generator().manual_seed(0)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:t]
    slots[::5] = -1                                   # padding rows
    slots = slots.to(DEVICE)
    k, v = randn(t, h, d, dtype=dtype), randn(t, h, d, dtype=dtype, seed=1)
    caches = [torch.full((num_blocks, block_size, h, d), 7.0, dtype=dtype, device=DEVICE) for _ in range(4)]
    kernels.store_kvcache(k, v, caches[0], caches[1], slots)
    store_kvcache_ref(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])


def test_store_kvcache_strided_views_of_one_pool():
    """The engine's caches are views [k|v, layer, ...] of one pool, and k/v may be views of a fused qkv."""
    pool = torch.zeros(2, 3, 8, 16, 2, 16, dtype=torch.float16, device=DEVICE)
    ref = pool.clone()
    kv = randn(5, 2 * 2 * 16, dtype=torch.float16)
    k, v = kv[:, :32].view(5, 2, 16), kv[:, 32:].view(5, 2, 16)
    slots = torch.tensor([0, 17, -1, 127, 64], device=DEVICE)
    kernels.store_kvcache(k, v, pool[0, 1], pool[1, 1], slots)
    store_kvcache_ref(k, v, ref[0, 1], ref[1, 1], slots)
    assert torch.equal(pool, ref)


@pytest.mark.skipif(not ON_GPU, reason="needs > 4 GiB of cache on CUDA")
def test_gpu_store_kvcache_past_int32():
    block_size, h, d = 16, 8, 128
    num_blocks = (2 ** 31) // (block_size * h * d) + 8
    k_cache = torch.zeros(num_blocks, block_size, h, d, dtype=torch.bfloat16, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.tensor([num_blocks * block_size - 1, (num_blocks - 3) * block_size + 5, 3], device=DEVICE)
    k, v = randn(3, h, d, dtype=torch.bfloat16), randn(3, h, d, dtype=torch.bfloat16, seed=1)
    kernels.store_kvcache(k, v, k_cache, v_cache, slots)
    flat_k, flat_v = k_cache.view(-1, h, d), v_cache.view(-1, h, d)
    assert torch.equal(flat_k[slots], k) and torch.equal(flat_v[slots], v)


def test_row_kernels_take_more_warps_only_with_a_row_per_sm(monkeypatch):
    """Rows over 1,024 elements get twice the warps when the launch has at most a row per SM (decode); wider
    launches (prefill) and narrow rows keep the usual count; the switch turns it off."""
    import kernels.dispatch as dispatch
    monkeypatch.setattr(dispatch, "num_sms", lambda device: 132)
    cuda = torch.device("cuda")
    assert [dispatch.num_warps_for(4096, rows, cuda) for rows in (1, 132, 133)] == [16, 16, 8]
    assert dispatch.num_warps_for(16384, 1, cuda) == 32 and dispatch.num_warps_for(1024, 1, cuda) == 4
    assert dispatch.num_warps_for(4096) == 8   # no row count: the usual
    monkeypatch.setattr(dispatch, "FEW_ROWS_MORE_WARPS", False)
    assert dispatch.num_warps_for(4096, 1, cuda) == 8
