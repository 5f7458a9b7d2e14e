"""qk_norm_rotary_store (q/k norm + rotary + paged-cache write in one kernel) against the composed torch
references, and the model's layers on the kernel path against the reference path.

Tolerances. fp32: kernel_testing.TOL (1e-4); the fp32 cases are the precise check of the math (eps,
weights, rotation). bf16 checks the dtype handling; the kernel rounds where the composed reference
rounds (the normed q/k to bf16, then the rotated result), so on GPU nearly every element is bit-equal. A
normed value next to a rounding boundary can round the other way, since the kernel's fp32 rstd differs
from torch's in its last bits (another summation order), and rotary carries that one-ulp step into two
outputs (fused multiply-adds in the rotation can flip a final rounding too). So on GPU at most 1% of the
elements may differ (a one-ulp change of rstd flips about 0.01%; leaving out the rounding after the norm
flips about 30%). Every element, on GPU and under the interpreter, lies within 3 bf16 ulps of the
tensor's largest magnitude (3 * 2^-7 * amax: one ulp from each rounding, the first carried through the
rotation). The mismatch count is not checked under the interpreter: it converts fp32 to bf16 by
truncation (triton's interpreter cast), not round-to-nearest-even as CUDA and torch do, so its bf16
results differ from torch's in about half the elements.
"""
import pytest
import torch

import kernels
from kernels.attention_prologue import qk_norm_rotary_store_ref
from tests.kernels.kernel_testing import DEVICE, ON_GPU, TOL

BF16_MAX_MISMATCH = 0.01        # on GPU; see the module's docstring
BLOCK_SIZE, NUM_BLOCKS, MAX_POS = 16, 32, 4096     # 512 slots: room for the GPU's 300 tokens


def assert_matches_reference(actual, expected):
    assert not torch.isnan(actual).any(), "NaN in the kernel's output"
    if expected.dtype != torch.bfloat16:
        atol, rtol = TOL[expected.dtype]
        torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)
        return
    if ON_GPU:
        differ = actual != expected
        assert differ.float().mean().item() <= BF16_MAX_MISMATCH, f"{int(differ.sum())} of {differ.numel()} differ"
    atol = 3 * 2 ** -7 * expected.float().abs().max().item()
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=0)


def randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.randn(*shape, generator=g, device=DEVICE).to(dtype)


def cos_sin_cache(head_dim):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    freqs = torch.outer(torch.arange(MAX_POS, dtype=torch.float64), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).float().to(DEVICE)


def fused_qkv_views(t, hq, hk, d, dtype):
    """q, k, v as the layer hands them over: strided views of one [T, (Hq + 2 Hk) * D] projection output."""
    q, k, v = randn(t, (hq + 2 * hk) * d, dtype=dtype).split([hq * d, hk * d, hk * d], dim=-1)
    return q.reshape(t, hq, d), k.reshape(t, hk, d), v.reshape(t, hk, d)


def cache_pool(hk, d, dtype):
    """[k|v, layer, blocks, block_size, Hk, D] of random values, as the engine's pool (one layer's caches
    are views into it); random, so a write to a wrong place shows."""
    return randn(2, 3, NUM_BLOCKS, BLOCK_SIZE, hk, d, dtype=dtype, seed=7)


def scattered_slots(t, pad_every=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    slots = torch.randperm(NUM_BLOCKS * BLOCK_SIZE, generator=g)[:t]
    slots[::pad_every] = -1                              # padding tokens (CUDA graph batches)
    return slots.to(DEVICE)


def unsorted_positions(t, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, MAX_POS, (t,), generator=g).to(DEVICE)


def norm_weights(d, dtype, qk_norm):
    if not qk_norm:
        return {}
    # distinct q and k weights (a swap shows); an eps that moves the result (one left out shows)
    return dict(q_norm_weight=randn(d, dtype=dtype, seed=3), k_norm_weight=randn(d, dtype=dtype, seed=4), eps=1e-2)


def run_both(positions, q, k, v, pool, slots, cs, norm):
    """(kernel's q, kernel's pool, reference's q, reference's pool); layer 1's caches are written."""
    ref_pool = pool.clone()
    q_ref = qk_norm_rotary_store_ref(positions, q, k, v, ref_pool[0, 1], ref_pool[1, 1], slots, cs, **norm)
    q_out = kernels.qk_norm_rotary_store(positions, q, k, v, pool[0, 1], pool[1, 1], slots, cs, **norm)
    return q_out, pool, q_ref, ref_pool


def assert_caches_match(pool, ref_pool, slots):
    """Rotated k within tolerance at the written slots; everything else (v, other slots and layers) exact."""
    written = slots[slots >= 0].long()
    hk, d = pool.shape[-2:]
    k_rows, k_ref_rows = pool[0, 1].view(-1, hk, d), ref_pool[0, 1].view(-1, hk, d)
    assert_matches_reference(k_rows[written], k_ref_rows[written])
    k_rows[written] = k_ref_rows[written]
    assert torch.equal(pool, ref_pool)


HEADS = [(16, 8), (12, 4), (6, 2)] + ([(32, 8), (40, 8), (64, 8)] if ON_GPU else [])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qk_norm", [True, False], ids=["qk_norm", "no_norm"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads", HEADS, ids=[f"{hq}q{hk}kv" for hq, hk in HEADS])
def test_matches_composed_reference(dtype, qk_norm, head_dim, heads):
    hq, hk = heads
    t = 300 if ON_GPU else 11
    q, k, v = fused_qkv_views(t, hq, hk, head_dim, dtype)
    k_in, v_in = k.clone(), v.clone()
    slots, positions, cs = scattered_slots(t), unsorted_positions(t), cos_sin_cache(head_dim)
    q_out, pool, q_ref, ref_pool = run_both(positions, q, k, v, cache_pool(hk, head_dim, dtype), slots, cs,
                                            norm_weights(head_dim, dtype, qk_norm))
    assert q_out.shape == q_ref.shape and q_out.dtype == dtype
    assert_matches_reference(q_out, q_ref)
    assert_caches_match(pool, ref_pool, slots)
    assert torch.equal(k, k_in) and torch.equal(v, v_in)      # only q is overwritten


def test_padding_tokens_write_nothing():
    """A step of padding only (slot -1 everywhere): the caches stay as they were; q is still computed."""
    t, hq, hk, d = 6, 6, 2, 64
    q, k, v = fused_qkv_views(t, hq, hk, d, torch.float32)
    pool = cache_pool(hk, d, torch.float32)
    before = pool.clone()
    slots = torch.full((t,), -1, device=DEVICE)
    q_out, pool, q_ref, _ = run_both(unsorted_positions(t), q, k, v, pool, slots, cos_sin_cache(d),
                                     norm_weights(d, torch.float32, True))
    assert torch.equal(pool, before)
    assert_matches_reference(q_out, q_ref)


def test_any_strides_and_index_dtype():
    """Views of one qkv share their strides, and the pool's caches have dense blocks; the kernel takes each
    tensor's own: q contiguous, k from a wider tensor, v head-major, caches whose blocks are padded
    (block stride != block_size * slot stride); int32 positions and slots."""
    t, hq, hk, d = 7, 6, 2, 64
    q = randn(t, hq, d)
    k = randn(t, hk + 3, d, seed=1)[:, 1:hk + 1]
    v = randn(hk, t, d, seed=2).transpose(0, 1)
    padded = randn(2, NUM_BLOCKS, BLOCK_SIZE + 1, hk, d, seed=7)
    before = padded.clone()
    dense = padded[:, :, :BLOCK_SIZE].clone()      # the reference's caches (it views them flat: dense only)
    slots, positions = scattered_slots(t).int(), unsorted_positions(t).int()
    cs, norm = cos_sin_cache(d), norm_weights(d, torch.float32, True)
    q_ref = qk_norm_rotary_store_ref(positions, q, k, v, dense[0], dense[1], slots, cs, **norm)
    q_out = kernels.qk_norm_rotary_store(positions, q, k, v, padded[0, :, :BLOCK_SIZE], padded[1, :, :BLOCK_SIZE],
                                         slots, cs, **norm)
    assert_matches_reference(q_out, q_ref)
    assert_matches_reference(padded[:, :, :BLOCK_SIZE], dense)
    assert torch.equal(padded[1, :, :BLOCK_SIZE], dense[1])
    assert torch.equal(padded[:, :, BLOCK_SIZE], before[:, :, BLOCK_SIZE])     # the blocks' padding rows


def test_q_alone_normed():
    """Either norm may be given alone: k is then only rotated."""
    t, hq, hk, d = 5, 12, 4, 64
    q, k, v = fused_qkv_views(t, hq, hk, d, torch.float32)
    slots = scattered_slots(t)
    q_out, pool, q_ref, ref_pool = run_both(unsorted_positions(t), q, k, v, cache_pool(hk, d, torch.float32), slots,
                                            cos_sin_cache(d), dict(q_norm_weight=randn(d, seed=3), eps=1e-6))
    assert_matches_reference(q_out, q_ref)
    assert_caches_match(pool, ref_pool, slots)


def test_no_tokens():
    q, k, v = fused_qkv_views(0, 4, 2, 64, torch.float32)
    pool = cache_pool(2, 64, torch.float32)
    before = pool.clone()
    q_out = kernels.qk_norm_rotary_store(unsorted_positions(0), q, k, v, pool[0, 1], pool[1, 1],
                                         torch.empty(0, dtype=torch.long, device=DEVICE), cos_sin_cache(64))
    assert q_out.shape == (0, 4, 64) and torch.equal(pool, before)


@torch.inference_mode()
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_model_kernel_path_equals_reference_path(tiny_checkpoints, arch, monkeypatch):
    """The layers' wiring (norm weights, eps, the engine's positions and slots): logits and caches of a
    prefill and a decode step, fused kernel path (all ops Triton) vs references only, in fp32."""
    from backend.model_runner import ModelRunner
    from tests.helpers import engine_config, prefill_then_decode_logits

    runner = ModelRunner(engine_config(tiny_checkpoints[arch], num_gpu_blocks_override=16, max_num_seqs=4,
                                       max_num_batched_tokens=64, device=DEVICE.type, dtype="float32",
                                       enforce_eager="true"))

    def prefill_then_decode():
        return prefill_then_decode_logits(runner), runner.kv_cache.clone()

    kernel_logits, kernel_cache = prefill_then_decode()
    monkeypatch.setenv("LLM_KERNELS", "reference")
    ref_logits, ref_cache = prefill_then_decode()
    for got, want in zip(kernel_logits, ref_logits):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(kernel_cache, ref_cache, atol=1e-4, rtol=1e-4)
