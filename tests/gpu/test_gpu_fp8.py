"""On a CUDA machine (H100: FP8 tensor cores): quantization fp8 and kv_cache_dtype fp8.

  * the FP8 GEMM (per-token x per-channel scales, bf16 out: the Triton W8A8 stream at decode sizes,
    torch._scaled_mm above) against the same FP8 values dequantized and multiplied in fp32, at Llama-3-8B
    and Qwen3-0.6B projection shapes;
  * paged attention over an FP8 cache against the same kernel over the bf16 cache it was quantized from,
    decode and prefill (the FP8 kernel against the dequantizing reference is tests/kernels/test_fp8_kv_cache.py,
    which runs compiled here too);
  * the engine (CUDA graphs) with both options against the bf16 engine: next-token KL and greedy agreement.
Skipped where there is no GPU (CI); run through the device tool."""
import importlib

import pytest
import torch

from backend.quantization import Fp8Linear, quantize_rows, scaled_mm
from kernels.fp8 import to_fp8_ref
from tests.conftest import DEFAULT_MODEL
from tests.helpers import greedy, prompt_set

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

# (K, N): Llama-3-8B qkv, o, gate_up, down; Qwen3-0.6B qkv, o, gate_up, down
SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096),
          (1024, 4096), (2048, 1024), (1024, 6144), (3072, 1024)]


@pytest.mark.parametrize("fast_accum", [False, True], ids=["fp32-accum", "fast-accum"])
@pytest.mark.parametrize("m", [1, 16, 32, 64, 256, 4096])
@pytest.mark.parametrize("k, n", SHAPES, ids=[f"{k}x{n}" for k, n in SHAPES])
def test_fp8_linear_equals_dequantized_reference(monkeypatch, m, k, n, fast_accum):
    """M <= TRITON_W8A16_MAX_M: the W8A16 kernel (x as it is); above: x quantized per token, then the Triton
    W8A8 stream up to TRITON_W8A8_MAX_M rows, _scaled_mm above."""
    import backend.quantization as quantization
    monkeypatch.setattr(quantization, "SCALED_MM_FAST_ACCUM", fast_accum)
    g = torch.Generator(device="cuda").manual_seed(m + k + n)
    x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
    linear = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        linear.weight.normal_(0, k ** -0.5, generator=g)
    layer = Fp8Linear.from_linear(linear)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    x_fp8, x_scale = quantize_rows(x)
    x_ref = x.float() if m <= quantization.TRITON_W8A16_MAX_M else x_fp8.float() * x_scale
    ref = x_ref @ (layer.weight.float() * layer.weight_scale[:, None]).t()
    # the GEMM accumulates in fp32 and rounds once to bf16: within bf16's rounding of the result
    torch.testing.assert_close(y.float(), ref, atol=1e-2 * ref.abs().max().item(), rtol=1e-2)
    # and the FP8 layer stays near the bf16 one (e4m3's ~3% per element averages out over K)
    exact = linear(x).float()
    assert ((y.float() - exact).norm() / exact.norm()).item() < 0.05


def test_scaled_mm_fp32_and_fp16_outputs():
    """Row-wise _scaled_mm writes bf16 on CUDA; other model dtypes get it converted."""
    x = torch.randn(8, 256, device="cuda")
    w_fp8, w_scale = quantize_rows(torch.randn(128, 256, device="cuda"))
    x_fp8, x_scale = quantize_rows(x)
    ref = (x_fp8.float() * x_scale) @ (w_fp8.float() * w_scale).t()
    for dtype in (torch.float32, torch.float16):
        y = scaled_mm(x_fp8, x_scale, w_fp8, w_scale.view(-1), dtype)
        assert y.dtype == dtype
        torch.testing.assert_close(y.float(), ref, atol=1e-2 * ref.abs().max().item(), rtol=1e-2)


def attention_pair(seq_lens, q_lens, num_kv_heads=8, group=4, head_dim=128, block_size=16):
    """The kernel over a bf16 cache and over its FP8 copy (per-tensor scales amax / 448), same inputs."""
    from kernels.paged_attention import paged_attention_triton
    from tests.kernels.kernel_testing import make_paged_batch
    b = make_paged_batch(seq_lens, q_lens, num_kv_heads, group, head_dim, block_size, torch.bfloat16)
    k_scale, v_scale = (c.float().nan_to_num(0).abs().amax().view(1) / 448 for c in (b["k_cache"], b["v_cache"]))
    args = (b["block_tables"], b["seq_lens"], b["query_start_loc"], b["scale"], max(q_lens))
    bf16 = paged_attention_triton(b["q"], b["k_cache"], b["v_cache"], *args)
    fp8 = paged_attention_triton(b["q"], to_fp8_ref(b["k_cache"], k_scale), to_fp8_ref(b["v_cache"], v_scale), *args,
                                 k_scale=k_scale, v_scale=v_scale)
    return bf16.float(), fp8.float()


# e4m3 keeps 3 mantissa bits: ~3.5% relative error per element of K and V (measured with the references
# on these distributions); attention's averaging keeps the output's relative error near that.
FP8_ATTENTION_REL_ERR = 0.06


@pytest.mark.parametrize("batch, ctx, q_len", [(64, 1024, 1), (4, 700, 37)])
def test_fp8_tile_conversions_give_the_same_bits(monkeypatch, batch, ctx, q_len):
    """e4m3 -> bf16 directly and through fp32 are both exact: the kernel's outputs are equal bit for bit."""
    pa = importlib.import_module("kernels.paged_attention")   # kernels exports a function of that name
    outs = []
    for direct in (False, True):
        monkeypatch.setattr(pa, "FP8_CONVERT_DIRECT", direct)
        outs.append(attention_pair([ctx - 3 * i for i in range(batch)], [q_len] * batch)[1])
    assert not outs[0].isnan().any() and torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("batch, ctx", [(1, 4096), (64, 1024), (256, 512)])
def test_fp8_kv_decode_near_bf16_kv(batch, ctx):
    bf16, fp8 = attention_pair([ctx - (7 * i) % (ctx // 2) for i in range(batch)], [1] * batch)
    assert not fp8.isnan().any()
    assert ((fp8 - bf16).norm() / bf16.norm()).item() < FP8_ATTENTION_REL_ERR


@pytest.mark.parametrize("seq_lens, q_lens", [([4096], [4096]), ([2000, 900, 33], [1000, 900, 1])])
def test_fp8_kv_prefill_near_bf16_kv(seq_lens, q_lens):
    bf16, fp8 = attention_pair(seq_lens, q_lens)
    assert not fp8.isnan().any()
    assert ((fp8 - bf16).norm() / bf16.norm()).item() < FP8_ATTENTION_REL_ERR


def test_engine_fp8_with_cuda_graphs_near_bf16(tiny_checkpoints):
    """Both options on the GPU with CUDA graphs: next-token distributions of a teacher-forced run close to
    the bf16 engine's (bounds: tests/test_fp8.py's CPU measurements, with room for bf16), greedy tokens
    mostly the same, and graphs equal to eager on the first tokens."""
    from tests.test_fp8 import mean_kl, teacher_forced_logprobs
    path = tiny_checkpoints["llama"]
    ref = teacher_forced_logprobs(path, device="cuda", dtype="bfloat16")
    ours = teacher_forced_logprobs(path, device="cuda", dtype="bfloat16", quantization="fp8", kv_cache_dtype="fp8")
    kl = mean_kl(ref, ours)
    agree = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"GPU bf16 vs fp8+fp8kv: mean KL {kl:.2e}, top-1 agreement {agree:.2f}")
    assert kl < 0.01 and agree >= 0.75

    from tests.gpu.test_gpu_engine import gpu, ids
    prompts = prompt_set(8, seed=3)
    graphed = gpu(DEFAULT_MODEL, quantization="fp8", kv_cache_dtype="fp8", max_num_seqs=16)
    assert graphed.core.runner.graphs is not None and graphed.core.runner.kv_cache.dtype == torch.float8_e4m3fn
    eager = gpu(DEFAULT_MODEL, quantization="fp8", kv_cache_dtype="fp8", enforce_eager="true")
    a, b = ids(graphed.generate(prompts, greedy(8))), ids(eager.generate(prompts, greedy(8)))
    assert sum(x[0] == y[0] for x, y in zip(a, b)) >= 7, (a, b)


def test_fp8_kv_cache_doubles_the_blocks():
    """The same gpu_memory_utilization gives about twice the blocks with an FP8 cache (bf16 model)."""
    from backend.config import EngineConfig
    from backend.model_runner import ModelRunner
    blocks = {}
    for kv in ("auto", "fp8"):
        runner = ModelRunner(EngineConfig.from_parameters(dict(model=DEFAULT_MODEL, device="cuda", enforce_eager="true",
                                                               gpu_memory_utilization="0.3", kv_cache_dtype=kv)))
        blocks[kv] = runner.num_blocks
        del runner
        torch.cuda.empty_cache()
    assert 1.9 < blocks["fp8"] / blocks["auto"] < 2.1, blocks
