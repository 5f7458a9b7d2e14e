"""Per-token FP8 activation quantization (quantization fp8): the Triton kernel against the torch reference,
bit for bit (values and scales), and against an independent formula."""
import pytest
import torch

import kernels
from kernels.quant_fp8 import per_token_quant_fp8_ref
from tests.kernels.kernel_testing import DEVICE, ON_GPU

SHAPES = [(1, 64), (7, 344), (3, 2048)] + ([(256, 4096), (8192, 1024), (16, 14336)] if ON_GPU else [])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_per_token_quant_equals_reference_bits(dtype, shape):
    g = torch.Generator(device=DEVICE).manual_seed(shape[1])
    m, k = shape
    x = (torch.randn(m, k, generator=g, device=DEVICE) * torch.logspace(-3, 3, m, device=DEVICE)[:, None]).to(dtype)
    if m > 2:
        x[1] = 0                                              # a padding row
    y, scale = kernels.per_token_quant_fp8(x)
    y_ref, scale_ref = per_token_quant_fp8_ref(x)
    assert y.dtype == torch.float8_e4m3fn and scale.shape == (m, 1) and scale.dtype == torch.float32
    assert torch.equal(scale, scale_ref)
    assert torch.equal(y.view(torch.uint8), y_ref.view(torch.uint8))
    amax = x.float().abs().amax(dim=1, keepdim=True)
    nonzero = amax[:, 0] > 0
    # each row's largest value maps to ±448
    assert torch.equal(scale[nonzero], amax[nonzero] / torch.full_like(amax[nonzero], 448))
    assert (y.float().abs().amax(dim=1)[nonzero] == 448).all()


def test_strided_rows():
    x = torch.randn(5, 3 * 96, device=DEVICE)[:, 96:192]
    y, scale = kernels.per_token_quant_fp8(x)
    y_ref, scale_ref = per_token_quant_fp8_ref(x)
    assert torch.equal(scale, scale_ref) and torch.equal(y.view(torch.uint8), y_ref.view(torch.uint8))


def assert_same_quantization(y, scale, y_ref, scale_ref):
    """Bits equal under the interpreter; compiled, within an ulp of the scale and one e4m3 step (see below)."""
    if ON_GPU:
        torch.testing.assert_close(scale, scale_ref, rtol=1e-6, atol=0)
        codes, ref_codes = y.view(torch.uint8).int(), y_ref.view(torch.uint8).int()
        differ = codes != ref_codes
        assert differ.float().mean() < 0.01 and ((codes - ref_codes).abs()[differ] == 1).all()
    else:
        assert torch.equal(scale, scale_ref) and torch.equal(y.view(torch.uint8), y_ref.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_silu_and_mul_quant_equals_activation_then_quant(dtype):
    from kernels.activation import silu_and_mul_quant_fp8_triton, silu_and_mul_triton
    from kernels.quant_fp8 import per_token_quant_fp8_triton
    g = torch.Generator(device=DEVICE).manual_seed(8)
    m, d = (40, 14336) if ON_GPU else (7, 300)
    x = (torch.randn(m, 2 * d + 64, generator=g, device=DEVICE) * 4)[:, :2 * d].to(dtype)   # strided rows
    x[3] = 0                                                                                # a padding row
    y, scale = silu_and_mul_quant_fp8_triton(x)
    assert y.shape == (m, d) and y.dtype == torch.float8_e4m3fn and scale.shape == (m, 1)
    assert_same_quantization(y, scale, *per_token_quant_fp8_triton(silu_and_mul_triton(x)))


@pytest.mark.parametrize("with_residual", [False, True], ids=["no_residual", "residual"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rms_norm_quant_equals_norm_then_quant_bits(dtype, with_residual):
    """The fused launch gives what rms_norm then per_token_quant_fp8 give (both kernels), and the residual sum.
    Compiled, the two kernels may sum a row's squares in another order (the layout follows each kernel's
    other ops): rstd may differ in its last bit, so on the GPU a scale may differ by an ulp and a value
    next to an e4m3 rounding boundary by one step (H100, fp32 rows of 4096); interpreted, the bits agree."""
    from kernels.rms_norm import rms_norm_quant_fp8_triton, rms_norm_triton
    from kernels.quant_fp8 import per_token_quant_fp8_triton
    g = torch.Generator(device=DEVICE).manual_seed(7)
    m, k = (40, 4096) if ON_GPU else (9, 320)
    x = (torch.randn(m, 2 * k, generator=g, device=DEVICE) * 3)[:, :k].to(dtype)   # strided rows
    x[2] = 0                                                                       # a padding row
    weight = torch.rand(k, generator=g, device=DEVICE).to(dtype) + 0.5
    residual = torch.randn(m, k, generator=g, device=DEVICE).to(dtype) if with_residual else None
    (y, scale), res_out = rms_norm_quant_fp8_triton(x, weight, 1e-6, residual)
    normed = rms_norm_triton(x, weight, 1e-6, residual)
    normed, want_res = normed if with_residual else (normed, None)
    assert_same_quantization(y, scale, *per_token_quant_fp8_triton(normed))
    assert (res_out is None) == (not with_residual)
    if with_residual:
        assert torch.equal(res_out, want_res)


def test_quantizing_kernels_on_no_rows():
    """An empty batch: each of the three returns FP8 values [0, n] and fp32 scales [0, 1], which the shared
    launch (kernels.fp8.launch_per_token_quant_fp8) allocates while launching nothing."""
    from kernels.activation import silu_and_mul_quant_fp8_triton
    from kernels.quant_fp8 import per_token_quant_fp8_triton
    from kernels.rms_norm import rms_norm_quant_fp8_triton
    x, gate_up = torch.empty(0, 64, device=DEVICE), torch.empty(0, 128, device=DEVICE)
    normed, res_out = rms_norm_quant_fp8_triton(x, torch.ones(64, device=DEVICE), 1e-6, x)
    assert res_out.shape == (0, 64)
    for y, scale in [normed, per_token_quant_fp8_triton(x), silu_and_mul_quant_fp8_triton(gate_up)]:
        assert y.shape == (0, 64) and y.dtype == torch.float8_e4m3fn
        assert scale.shape == (0, 1) and scale.dtype == torch.float32


def test_fp8_model_with_the_fused_norm_gives_the_same_logits(tiny_checkpoints, monkeypatch):
    """A W8A8 model whose RMSNorms and SiLU quantize for the next projection gives the logits of one whose projections
    quantize their own input (fp32 model: no dtype rounding hides a difference). Bit for bit here (the
    interpreter, and the H100 at this model's width); see the test above for why compiled wide rows
    may differ in an ulp."""
    import backend.quantization as quantization
    from backend.model_runner import ModelRunner
    from tests.helpers import engine_config, prefill_then_decode_logits
    monkeypatch.setattr(quantization, "TRITON_W8A16_MAX_M", 0)     # every batch through the W8A8 path
    runner = ModelRunner(engine_config(tiny_checkpoints["llama"], num_gpu_blocks_override=16, max_num_seqs=4,
                                       max_num_batched_tokens=64, device=DEVICE.type, dtype="float32",
                                       enforce_eager="true", quantization="fp8"))
    fused_calls = []
    for name in ("rms_norm_quant_fp8", "silu_and_mul_quant_fp8"):
        monkeypatch.setattr(kernels, name, lambda *a, f=getattr(kernels, name), n=name: fused_calls.append(n) or f(*a))
    with torch.inference_mode():
        with_fusion = prefill_then_decode_logits(runner)
        assert set(fused_calls) == {"rms_norm_quant_fp8", "silu_and_mul_quant_fp8"}   # the fused launches ran
        monkeypatch.setattr(quantization.Fp8Linear, "quantizes_input", lambda self, x: False)
        without = prefill_then_decode_logits(runner)
    for a, b in zip(with_fusion, without):
        assert torch.equal(a, b)
