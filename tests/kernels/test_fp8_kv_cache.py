"""kv_cache_dtype fp8: the kernels that write the cache (store_kvcache, the fused attention prologue) and
paged attention reading it, against the torch references, under the Triton interpreter on CPU (compiled
on CUDA).

Writes are checked bit for bit against torch's float8_e4m3fn cast of value / scale (saturated to ±448).
Attention is checked against the reference attending the same FP8 cache dequantized to fp32, with the
tolerance of q's dtype (kernel_testing.TOL): both read identical FP8 values and the kernel's conversion
of e4m3 to q's dtype is exact, so the only differences are those of the bf16/fp32 cache paths (rounding
of P to bf16, summation order). The scales are not 1, so a kernel that dropped either would be off by
that factor (about 20x here).
"""
import pytest
import torch

import kernels
from kernels.attention_prologue import qk_norm_rotary_store_ref
from kernels.fp8 import FP8_DTYPE, to_fp8_ref
from kernels.paged_attention import paged_attention_ref, paged_attention_triton
from kernels.store_kvcache import store_kvcache_ref
from tests.kernels.kernel_testing import DEVICE, assert_close, make_paged_batch
from tests.kernels.test_attention_prologue import (cache_pool, cos_sin_cache, fused_qkv_views, norm_weights, randn,
                                                   scattered_slots, unsorted_positions)

K_SCALE, V_SCALE = 0.05, 0.03


def scales():
    return (torch.tensor([K_SCALE], device=DEVICE), torch.tensor([V_SCALE], device=DEVICE))


def bits(t):
    return t.view(torch.uint8)


# ---------------- writes ----------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("block_size", [16, 32])
def test_store_kvcache_fp8_bits_equal_torch(dtype, block_size):
    t, h, d, num_blocks = 13, 2, 64, 8
    slots = torch.randperm(num_blocks * block_size, generator=torch.Generator().manual_seed(0))[:t]
    slots[::5] = -1                                   # padding rows
    slots = slots.to(DEVICE)
    k, v = randn(t, h, d, dtype=dtype) * 10, randn(t, h, d, dtype=dtype, seed=1)
    k[0, 0, :4] = torch.tensor([1e4, -1e4, 0.0, -0.0], dtype=dtype)        # saturation and signed zero
    k_scale, v_scale = scales()
    caches = [torch.zeros(num_blocks, block_size, h, d, dtype=FP8_DTYPE, device=DEVICE) for _ in range(4)]
    kernels.store_kvcache(k, v, caches[0], caches[1], slots, k_scale, v_scale)
    store_kvcache_ref(k, v, caches[2], caches[3], slots, k_scale, v_scale)
    assert torch.equal(bits(caches[0]), bits(caches[2])) and torch.equal(bits(caches[1]), bits(caches[3]))
    written = slots[slots >= 0].long()
    expect_k = (k[slots >= 0].float() / K_SCALE).clamp(-448, 448).to(FP8_DTYPE)   # independent of the reference
    assert torch.equal(bits(caches[0].view(-1, h, d)[written]), bits(expect_k))
    assert caches[0].view(-1, h, d)[written].float().abs().max() == 448


def test_to_fp8_grid_rounding_matches_torch_everywhere():
    """Every e4m3 value, every midpoint between neighbours (ties to even), subnormals, saturation, ±0."""
    every = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE).float()
    every = every[~every.isnan()]
    pos = every[every >= 0].sort().values
    mids = (pos[1:] + pos[:-1]) / 2
    x = torch.cat([every, mids, -mids, torch.tensor([1e6, -1e6, 0.0, -0.0, 1e-30, 2.0 ** -10, 3 * 2.0 ** -10]),
                   randn(2000, seed=5).cpu() * 100]).to(DEVICE)
    n = x.numel()
    x = x[: n - n % 64].reshape(-1, 1, 64)        # tokens of one 64-wide head
    slots = torch.arange(x.shape[0], device=DEVICE)
    k_cache = torch.zeros(x.shape[0], 1, 1, 64, dtype=FP8_DTYPE, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    one = torch.ones(1, device=DEVICE)
    kernels.store_kvcache(x, x, k_cache, v_cache, slots, one, one)
    assert torch.equal(bits(k_cache.view(-1, 64)), bits(to_fp8_ref(x.view(-1, 64), one)))


@pytest.mark.parametrize("qk_norm", [True, False], ids=["qk_norm", "no_norm"])
@pytest.mark.parametrize("heads", [(16, 8), (6, 2)], ids=["16q8kv", "6q2kv"])
def test_prologue_writes_fp8(qk_norm, heads):
    """v: bits equal the reference's. k is rotated first (fp32: within 1e-4 of the reference), so a value
    next to an e4m3 rounding boundary may round the other way: at most 1% of k differs, each by one
    e4m3 step. Other slots and layers are untouched; q is as without FP8."""
    hq, hk = heads
    t, d = 11, 64
    q, k, v = fused_qkv_views(t, hq, hk, d, torch.float32)
    pool = cache_pool(hk, d, torch.float32).to(FP8_DTYPE)
    ref_pool = pool.clone()
    slots, positions, cs = scattered_slots(t), unsorted_positions(t), cos_sin_cache(d)
    norm = norm_weights(d, torch.float32, qk_norm)
    k_scale, v_scale = scales()
    q_ref = qk_norm_rotary_store_ref(positions, q, k, v, ref_pool[0, 1], ref_pool[1, 1], slots, cs, **norm,
                                     k_scale=k_scale, v_scale=v_scale)
    q_out = kernels.qk_norm_rotary_store(positions, q, k, v, pool[0, 1], pool[1, 1], slots, cs, **norm,
                                         k_scale=k_scale, v_scale=v_scale)
    torch.testing.assert_close(q_out, q_ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(bits(pool[1]), bits(ref_pool[1]))
    got, want = pool[0, 1].float(), ref_pool[0, 1].float()
    differ = got != want
    assert differ.float().mean() <= 0.01
    step = torch.maximum(want.abs(), got.abs()) * 2 ** -3 + 2 ** -9
    assert ((got - want).abs() <= step).all()
    written = slots[slots >= 0].long()
    assert got.view(-1, hk, d)[written].abs().max() > 1      # the write happened, scaled (|k| / 0.05 >> 1)
    pool[0, 1], ref_pool[0, 1] = 0, 0
    assert torch.equal(bits(pool), bits(ref_pool))


# ---------------- attention over an FP8 cache ----------------


def fp8_batch(b):
    """The batch's caches in FP8 (unwritten slots stay NaN), with the scales."""
    k_scale, v_scale = scales()
    return dict(b, k_cache=to_fp8_ref(b["k_cache"], k_scale), v_cache=to_fp8_ref(b["v_cache"], v_scale),
                k_scale=k_scale, v_scale=v_scale)


def ref_fp8(b):
    return paged_attention_ref(b["q"], b["k_cache"], b["v_cache"], b["block_tables"], b["seq_lens"],
                               b["query_start_loc"], b["scale"], b["k_scale"], b["v_scale"])


def run_fp8(b, max_query_len, **knobs):
    return paged_attention_triton(b["q"], b["k_cache"], b["v_cache"], b["block_tables"], b["seq_lens"],
                                  b["query_start_loc"], b["scale"], max_query_len, k_scale=b["k_scale"],
                                  v_scale=b["v_scale"], **knobs)


def scaled_randn_batch(seq_lens, q_lens, num_kv_heads, group, head_dim, block_size, dtype, seed=0):
    """Cache values scaled so that value / scale spans e4m3's range (up to ~100), as real scales make it."""
    b = make_paged_batch(seq_lens, q_lens, num_kv_heads, group, head_dim, block_size, dtype, seed=seed)
    b["k_cache"], b["v_cache"] = b["k_cache"] * (25 * K_SCALE), b["v_cache"] * (25 * V_SCALE)
    return fp8_batch(b)


@pytest.mark.parametrize("group", [1, 4, 5])
@pytest.mark.parametrize("segments", [1, 4])
def test_decode_fp8(group, segments):
    lens = [1, 15, 16, 17, 33, 70]
    b = scaled_randn_batch(lens, [1] * len(lens), 2, group, 32, 16, torch.bfloat16)
    ref = ref_fp8(b)
    assert_close(run_fp8(b, 1, num_segments=segments), ref)
    assert ref.float().abs().max() > 0.5      # attention outputs of the scaled values, not ~0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("path", ["auto", "split", "small_tiles", "split_decodes"])
def test_prefill_and_mixed_fp8(dtype, path):
    mixed = [(1, 1), (17, 17), (40, 7), (33, 1), (64, 64), (20, 0), (50, 1), (5, 3)]
    seq_lens, q_lens = zip(*mixed)
    b = scaled_randn_batch(list(seq_lens), list(q_lens), 2, 4, 32, 16, dtype, seed=3)
    kw = {"split": dict(num_segments=4), "small_tiles": dict(block_m=16, tile_n=16),
          "split_decodes": dict(split_decodes=True)}.get(path, {})
    assert_close(run_fp8(b, 64, **kw), ref_fp8(b))


def test_fp8_through_dispatch_and_the_reference_dequantizes():
    """The public function passes the scales on; the reference equals attention over the dequantized
    cache in the cache-dtype-free path (fp32 caches), so a scale it forgot would show."""
    b = scaled_randn_batch([40, 3, 17], [7, 1, 17], 1, 4, 32, 16, torch.float32)
    args = (b["q"], b["k_cache"], b["v_cache"], b["block_tables"], b["seq_lens"], b["query_start_loc"], b["scale"])
    out = kernels.paged_attention(*args, 17, k_scale=b["k_scale"], v_scale=b["v_scale"])
    deq = paged_attention_ref(b["q"], b["k_cache"].float() * K_SCALE, b["v_cache"].float() * V_SCALE,
                              *args[3:])
    assert_close(out, deq)
    assert_close(ref_fp8(b), deq)


@torch.inference_mode()
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_model_kernel_path_equals_reference_path_fp8(tiny_checkpoints, arch, monkeypatch):
    """fp8 weights and an FP8 cache through the layers: prefill then decode logits and caches, Triton kernels
    vs references (fp32 model). The kernel rotates k in another order than the reference (1e-7 apart), so
    an FP8 value next to a rounding boundary may round the other way: at most 1% of the cache differs,
    by one e4m3 step, and the logits agree to 1e-3."""
    from backend.model_runner import ModelRunner
    from tests.helpers import engine_config, prefill_then_decode_logits

    # the same GEMMs on both paths: W8A8 through _scaled_mm (the Triton W8A8 stream: tests/kernels/test_fp8_gemm.py)
    monkeypatch.setattr("backend.quantization.TRITON_W8A16_MAX_M", 0)
    monkeypatch.setattr("backend.quantization.TRITON_W8A8_MAX_M", 0)
    runner = ModelRunner(engine_config(tiny_checkpoints[arch], num_gpu_blocks_override=16, max_num_seqs=4,
                                       max_num_batched_tokens=64, device=DEVICE.type, dtype="float32",
                                       enforce_eager="true", quantization="fp8", kv_cache_dtype="fp8"))
    assert runner.kv_cache.dtype == FP8_DTYPE
    for layer in runner.model.model.layers:     # scales that are not 1 (a dropped one shows)
        layer.self_attn.k_scale.fill_(K_SCALE * 4)
        layer.self_attn.v_scale.fill_(V_SCALE * 4)

    def prefill_then_decode():
        return prefill_then_decode_logits(runner), runner.kv_cache.float().clone()

    kernel_logits, kernel_cache = prefill_then_decode()
    monkeypatch.setenv("LLM_KERNELS", "reference")
    ref_logits, ref_cache = prefill_then_decode()
    for got, want in zip(kernel_logits, ref_logits):
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
    differ = kernel_cache != ref_cache
    assert differ.float().mean() <= 0.01
    one_step = torch.maximum(kernel_cache.abs(), ref_cache.abs()) * 2 ** -3 + 2 ** -9
    assert ((kernel_cache - ref_cache).abs() <= one_step).all()
    assert ref_cache.abs().max() > 16        # written, and scaled
