"""W8A16 FP8-weight GEMM (quantization fp8, small M): the Triton kernel against fp32 math on the same values,
and Fp8Linear's W8A16 path behind backend.quantization.TRITON_W8A16_MAX_M.

Tolerance: the kernel's products are exact (e4m3 converted to x's dtype is exact; bf16 x bf16 and
fp32 x fp32 dots accumulate in fp32), so it differs from the fp32 reference only by the order of the
fp32 sums and where the scale multiplies: at most ~(K + 2) * 2^-24 * sum_k |x_k w_k s| (the error bound
of a K-term fp32 sum), doubled for margin, plus the final rounding to x's dtype: half an ulp (2^-8
relative for bf16, 2^-11 for fp16, none for fp32) compiled, a whole ulp under Triton's interpreter
(its fp32 -> bf16/fp16 casts truncate). Inputs are NaN past every row, column and K edge
(through views of padded tensors), so a load that is not masked where it should be gives NaN. Tried:
K masks from the tile's start instead of its offset, the x load unmasked on K, the scale of the next
channel or none: 54 to 82 of 83 cases fail. The weight's K mask is checked on the GPU only: Triton's
interpreter reads e4m3's NaN as 480, and 0 (the masked x) x 480 is 0.
"""
import pytest
import torch
from torch import nn

import kernels
from kernels.fp8 import FP8_DTYPE
from kernels.fp8_gemm import fp8_weight_gemm_ref, fp8_weight_gemm_triton
from tests.kernels.kernel_testing import DEVICE, ON_GPU

FP32_EPS = 2.0 ** -24
ROUNDING = {dtype: 0.0 if dtype == torch.float32 else (0.5 if ON_GPU else 1.0) * torch.finfo(dtype).eps
            for dtype in (torch.bfloat16, torch.float16, torch.float32)}   # of the cast to x's dtype, relative
NAN_FP8 = 0x7F   # e4m3fn's NaN bit pattern

SHAPES = [(50, 300), (97, 520), (16, 64)] + ([(4096, 4096), (1024, 3072)] if ON_GPU else [])


def make_operands(m, n, k, dtype, bias, seed=0, pad=5):
    """x [m, k], weight [n, k] e4m3, scale [n], bias [n]: views of padded tensors whose padding is NaN."""
    g = torch.Generator().manual_seed(seed)
    x_full = torch.full((m + pad, k + pad), float("nan"), dtype=dtype)
    x_full[:m, :k] = (torch.randn(m, k, generator=g) * torch.logspace(-2, 2, m)[:, None]).to(dtype)
    w_full = torch.full((n + pad, k + pad), NAN_FP8, dtype=torch.uint8).view(FP8_DTYPE)
    w_full[:n, :k] = (torch.randn(n, k, generator=g) * 100).clamp(-448, 448).to(FP8_DTYPE)
    scale = torch.logspace(-4, -1, n) * torch.rand(n, generator=g).add(0.5)   # channels of different sizes
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    to = dict(device=DEVICE)
    return (x_full.to(**to)[:m, :k], w_full.to(**to)[:n, :k], scale.to(**to),
            b.to(**to) if b is not None else None)


def assert_within_fp32_sum_error(y, x, weight, scale, bias):
    """y against fp32 math on the same values, within the bound of the module's docstring."""
    w = weight.float() * scale[:, None]
    exact = x.float() @ w.t() + (bias.float() if bias is not None else 0)
    magnitude = x.float().abs() @ w.abs().t() + (bias.float().abs() if bias is not None else 0)
    k = x.shape[1]
    bound = ROUNDING[y.dtype] * exact.abs() + 2 * (k + 2) * FP32_EPS * magnitude \
        + ROUNDING[y.dtype] * torch.finfo(y.dtype).smallest_normal + 1e-30   # fp16's subnormal spacing
    assert y.shape == exact.shape and not torch.isnan(y).any()
    # Past the dtype's largest value (fp16's 65504 at the GPU shapes) the right answer is inf of the same sign.
    top = torch.finfo(y.dtype).max
    overflow = exact.abs() - bound > top * (1 + ROUNDING[y.dtype])
    fits = exact.abs() + bound < top
    assert torch.equal(y[overflow].float(), exact[overflow].sign() * float("inf"))
    err = (y.float() - exact).abs()[fits]
    bound = bound[fits]
    assert (err <= bound).all(), f"max error {err.max():.3g}, worst error/bound {(err / bound).max():.3g}"


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", [1, 3, 16, 64])
def test_fp8_weight_gemm_matches_fp32_math(m, n, k, dtype, bias):
    x, w, scale, b = make_operands(m, n, k, dtype, bias, seed=m + n + k)
    if m > 2:
        x[1] = 0   # a padding row: exactly the bias
    y = kernels.fp8_weight_gemm(x, w, scale, b)
    assert y.dtype == dtype
    assert_within_fp32_sum_error(y, x, w, scale, b)
    assert_within_fp32_sum_error(fp8_weight_gemm_ref(x, w, scale, b), x, w, scale, b)
    if m > 2:
        assert torch.equal(y[1], b if bias else torch.zeros_like(y[1]))


@pytest.mark.parametrize("block_n,block_k", [(16, 64), (32, 128), (64, 256)])
@pytest.mark.parametrize("m", [3, 40])
def test_every_tile_shape(m, block_n, block_k):
    """The heuristic's tiles and more: several K steps with a partial last one, N tiles past N, M tiles past M."""
    x, w, scale, b = make_operands(m, 97, 300, torch.bfloat16, bias=True, seed=block_n)
    y = fp8_weight_gemm_triton(x, w, scale, b, block_n=block_n, block_k=block_k)
    assert_within_fp32_sum_error(y, x, w, scale, b)


def test_no_rows():
    x, w, scale, _ = make_operands(0, 50, 64, torch.bfloat16, bias=False)
    assert kernels.fp8_weight_gemm(x, w, scale).shape == (0, 50)


def fp8_layer(dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(200, 72, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(72, 200, generator=g) * torch.rand(72, 1, generator=g))
        if bias:
            linear.bias.copy_(torch.randn(72, generator=g))
    from backend.quantization import Fp8Linear
    return Fp8Linear.from_linear(linear.to(device=DEVICE, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
def test_fp8_linear_w8a16_path(monkeypatch, dtype, bias):
    """With the threshold set, Fp8Linear runs the Triton W8A16 kernel for M <= threshold (x not quantized:
    fp32 math on the dequantized weight), and _scaled_mm (W8A8) above it."""
    import backend.quantization as quantization
    import kernels.fp8_gemm as fp8_gemm
    launches = []
    monkeypatch.setattr(fp8_gemm, "fp8_weight_gemm_triton",
                        lambda *a, **kw: launches.append(a[0].shape) or fp8_weight_gemm_triton(*a, **kw))
    monkeypatch.setattr(quantization, "TRITON_W8A16_MAX_M", 4)
    layer = fp8_layer(dtype, bias)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 2, 200, generator=g).to(device=DEVICE, dtype=dtype)   # flattened M = 4
    y = layer(x)
    assert launches == [(4, 200)] and y.shape == (2, 2, 72) and y.dtype == dtype
    assert_within_fp32_sum_error(y.reshape(4, 72), x.reshape(4, 200), layer.weight, layer.weight_scale, layer.bias)
    if not ON_GPU and dtype == torch.bfloat16:
        return   # CPU _scaled_mm has no bf16 row-wise path to compare with (the model's CPU dtype is fp32)
    layer(torch.randn(5, 200, generator=g).to(device=DEVICE, dtype=dtype))   # M = 5 > threshold: W8A8
    assert launches == [(4, 200)]
