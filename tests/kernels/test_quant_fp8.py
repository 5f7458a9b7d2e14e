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
    assert torch.equal(scale[nonzero], amax[nonzero] / torch.full_like(amax[nonzero], 448))   # each row's largest value maps to ±448
    assert (y.float().abs().amax(dim=1)[nonzero] == 448).all()


def test_strided_rows():
    x = torch.randn(5, 3 * 96, device=DEVICE)[:, 96:192]
    y, scale = kernels.per_token_quant_fp8(x)
    y_ref, scale_ref = per_token_quant_fp8_ref(x)
    assert torch.equal(scale, scale_ref) and torch.equal(y.view(torch.uint8), y_ref.view(torch.uint8))
