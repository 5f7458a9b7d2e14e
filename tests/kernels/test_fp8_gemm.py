"""The small-M weight-streaming GEMM (kernels/fp8_gemm.py): the Triton kernel against fp32 math on the same
values, on e4m3 weights with per-channel scales (W8A16, quantization fp8) and on unquantized weights in x's
dtype, with and without split-K; the split heuristic; Fp8Linear's W8A16 path behind
backend.quantization.TRITON_W8A16_MAX_M and its W8A8 stream (TRITON_W8A8_MAX_M) (the unquantized layers'
switch: test_weight_gemm_routing.py).

Tolerance: the kernel's products are exact (e4m3 converted to x's dtype is exact; bf16 x bf16 and
fp32 x fp32 dots accumulate in fp32), so it differs from the fp32 reference only by the order of the
fp32 sums and where the scale multiplies: at most ~(K + 2) * 2^-24 * sum_k |x_k w_k s| (the error bound
of a K-term fp32 sum), doubled for margin, plus the final rounding to x's dtype: half an ulp (2^-8
relative for bf16, 2^-11 for fp16, none for fp32) compiled, a whole ulp under Triton's interpreter
(its fp32 -> bf16/fp16 casts truncate). Inputs are NaN past every row, column and K edge
(through views of padded tensors), so a load that is not masked where it should be gives NaN. Tried:
K masks from the tile's start instead of its offset, the x load unmasked on K, the scale of the next
channel or none: 54 to 82 of 83 cases fail. The weight's K mask is checked on the GPU only: Triton's
interpreter reads e4m3's NaN as 480, and 0 (the masked x) x 480 is 0; unquantized weights are NaN there too,
which checks it everywhere. Split-K, tried: the reduce dropping the last partial, or reading slice 0's for
every slice; every slice's partial written to slice 0's rows; slices overlapping by a K step; the reduce
without the bias, or without the scale: 39 to 79 of 250 cases fail (the others do not split).
e4m3 x e4m3 dots (W8A8) compiled for Hopper sum with fewer bits than fp32 (the products are exact): add
FP8_DOT_EPS * sum |x_k w_k s| for every 32 K (a wgmma's K) there; the H100 measured ~1.6e-4 of that sum at
K = 200 (2^-12.6), 6.5 times the fp32 bound.
"""
import pytest
import torch
from torch import nn

import kernels
from kernels.fp8 import FP8_DTYPE
import kernels.fp8_gemm as fp8_gemm
import kernels.arrival as arrival
from kernels.arrival import arrival_counters
from kernels.dispatch import cdiv
from kernels.fp8_gemm import (fp8_weight_gemm_ref, fp8_weight_gemm_triton, gemm_config, k_slices, weight_gemm,
                              weight_gemm_ref, weight_gemm_triton)
from tests.kernels.kernel_testing import DEVICE, ON_GPU

FP8_DOT_EPS = 2 ** -13   # per 32 K of an e4m3 x e4m3 dot on the GPU: 5x what the H100 measured at K = 200

FP32_EPS = 2.0 ** -24
ROUNDING = {dtype: 0.0 if dtype == torch.float32 else (0.5 if ON_GPU else 1.0) * torch.finfo(dtype).eps
            for dtype in (torch.bfloat16, torch.float16, torch.float32)}   # of the cast to x's dtype, relative
NAN_FP8 = 0x7F   # e4m3fn's NaN bit pattern

# (N, K); (40, 2048): the heuristic splits K under the interpreter's 8 SMs (for every weight dtype)
SHAPES = [(50, 300), (97, 520), (16, 64), (40, 2048)] + ([(4096, 4096), (1024, 3072)] if ON_GPU else [])


def make_operands(m, n, k, dtype, bias, seed=0, pad=5, quantized=True):
    """x [m, k], weight [n, k], scale [n], bias [n]: views of padded tensors whose padding is NaN. quantized:
    an e4m3 weight and its per-channel scales; else the same channels' values in x's dtype, scale None."""
    g = torch.Generator().manual_seed(seed)
    x_full = torch.full((m + pad, k + pad), float("nan"), dtype=dtype)
    x_full[:m, :k] = (torch.randn(m, k, generator=g) * torch.logspace(-2, 2, m)[:, None]).to(dtype)
    values = (torch.randn(n, k, generator=g) * 100).clamp(-448, 448)
    scale = torch.logspace(-4, -1, n) * torch.rand(n, generator=g).add(0.5)   # channels of different sizes
    if quantized:
        w_full = torch.full((n + pad, k + pad), NAN_FP8, dtype=torch.uint8).view(FP8_DTYPE)
        w_full[:n, :k] = values.to(FP8_DTYPE)
    else:
        w_full = torch.full((n + pad, k + pad), float("nan"), dtype=dtype)
        w_full[:n, :k] = (values * scale[:, None]).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    to = dict(device=DEVICE)
    return (x_full.to(**to)[:m, :k], w_full.to(**to)[:n, :k], scale.to(**to) if quantized else None,
            b.to(**to) if b is not None else None)


def assert_within_fp32_sum_error(y, x, weight, scale, bias, fp8_dot=False):
    """y against fp32 math on the same values, within the bound of the module's docstring (scale None: an
    unquantized weight; fp8_dot: x and the weight e4m3, whose compiled dot sums with fewer bits)."""
    w = weight.float() * scale[:, None] if scale is not None else weight.float()
    exact = x.float() @ w.t() + (bias.float() if bias is not None else 0)
    magnitude = x.float().abs() @ w.abs().t() + (bias.float().abs() if bias is not None else 0)
    k = x.shape[1]
    bound = ROUNDING[y.dtype] * exact.abs() + 2 * (k + 2) * FP32_EPS * magnitude \
        + ROUNDING[y.dtype] * torch.finfo(y.dtype).smallest_normal + 1e-30   # fp16's subnormal spacing
    if fp8_dot and ON_GPU:
        bound = bound + (k / 32 + 1) * FP8_DOT_EPS * magnitude
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
    x, w, _, _ = make_operands(0, 50, 64, torch.bfloat16, bias=False, quantized=False)
    assert weight_gemm(x, w).shape == (0, 50)


# ---- unquantized weights (HAS_SCALE off) and split-K ------------------------------------------------------

@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", [1, 3, 16, 64])
def test_weight_gemm_matches_fp32_math(m, n, k, dtype, bias):
    """The weight in x's dtype (NaN past its K edge too, which the interpreter reads as NaN: the weight's
    K mask is checked here on CPU as well). The heuristic splits K at most of these shapes (8 SMs)."""
    x, w, _, b = make_operands(m, n, k, dtype, bias, seed=m + n + k, quantized=False)
    if m > 2:
        x[1] = 0   # a padding row: exactly the bias
    y = weight_gemm(x, w, b)
    assert y.dtype == dtype
    assert_within_fp32_sum_error(y, x, w, None, b)
    assert_within_fp32_sum_error(weight_gemm_ref(x, w, b), x, w, None, b)
    if m > 2:
        assert torch.equal(y[1], b if bias else torch.zeros_like(y[1]))


def gemm(quantized, x, w, scale, b, **knobs):
    return fp8_weight_gemm_triton(x, w, scale, b, **knobs) if quantized else weight_gemm_triton(x, w, b, **knobs)


# (split_k, block_k) at K = 300 / 1000: slices of 1, 2 or 3 K steps; a short last slice; last steps partial;
# a split past the K steps (the slice count drops to those that hold K)
SPLITS = [(1, 64), (2, 64), (3, 32), (4, 64), (8, 16), (16, 256)]


@pytest.mark.parametrize("quantized", [True, False])
@pytest.mark.parametrize("split_k,block_k", SPLITS)
@pytest.mark.parametrize("m,n,k,bias,dtype", [(1, 97, 300, True, torch.bfloat16), (5, 50, 1000, False, torch.float16),
                                              (17, 33, 300, True, torch.float32)])
def test_split_k(quantized, split_k, block_k, m, n, k, bias, dtype):
    """Each split of K within the fp32-sum bound, and deterministic: the same bits on a second run."""
    x, w, scale, b = make_operands(m, n, k, dtype, bias, seed=split_k * k + m, quantized=quantized)
    y = gemm(quantized, x, w, scale, b, split_k=split_k, block_k=block_k, block_n=32)
    assert_within_fp32_sum_error(y, x, w, scale, b)
    assert torch.equal(y, gemm(quantized, x, w, scale, b, split_k=split_k, block_k=block_k, block_n=32))


@pytest.mark.parametrize("k,split_k,block_k", [(300, 4, 64), (1000, 3, 32), (520, 8, 16), (64, 4, 64), (1, 2, 16),
                                               (4096, 4, 256), (14336, 4, 128), (5000, 16, 512)])
def test_k_slices_cover_k_once(k, split_k, block_k):
    per_split, slices = k_slices(k, split_k, block_k)
    assert per_split % block_k == 0 and 1 <= slices <= split_k
    covered = [i for s in range(slices) for i in range(s * per_split, min((s + 1) * per_split, k))]
    assert covered == list(range(k))   # every K once, in order; no slice empty
    assert (slices - 1) * per_split < k


LLAMA3_8B = [("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672), ("down", 14336, 4096)]


def programs_of(c, m, n, k):
    return cdiv(n, c.block_n) * cdiv(m, c.block_m) * k_slices(k, c.split_k, c.block_k)[1]


@pytest.mark.parametrize("m", [1, 16])
def test_heuristic_splits_k_where_the_n_tiling_leaves_sms_idle(monkeypatch, m):
    """On a 132-SM H100, Llama-3-8B at decode sizes: with e4m3 weights qkv, o and down (N tiles for under
    one program per SM) split K to 2-4 programs per SM, gate_up (3.4 per SM from its N tiles) does not;
    bf16 weights split none of them (0.7-1 per SM stream at bandwidth), only a grid under 0.5 per SM
    (Qwen3-0.6B's o, N = 1024), and not into slices of under MIN_SLICE_STEPS K steps."""
    monkeypatch.setattr(fp8_gemm, "num_sms", lambda device: 132)
    cuda = torch.device("cuda")
    for name, k, n in LLAMA3_8B:
        c = gemm_config(m, n, cuda, k, FP8_DTYPE)
        assert (c.split_k == 1) == (name == "gate_up"), (name, c)
        assert 2 * 132 <= programs_of(c, m, n, k) <= 4 * 132, (name, c)
        b = gemm_config(m, n, cuda, k, torch.bfloat16)
        assert b.split_k == 1 and programs_of(b, m, n, k) >= 0.5 * 132, (name, b)
        assert b.block_k * 2 in (256, 512) and (c.split_k > 1 or c.block_k in (128, 512))
    assert gemm_config(m, 6144, cuda).split_k == 1                        # no k: the N tiling alone
    small_o = gemm_config(m, 1024, cuda, 2048, torch.bfloat16)
    assert small_o.split_k == 4 and 2048 // small_o.block_k // small_o.split_k >= fp8_gemm.MIN_SLICE_STEPS
    assert gemm_config(m, 4096, cuda, 1024, FP8_DTYPE).split_k == 1       # Qwen3-0.6B's qkv: K too short


@pytest.mark.parametrize("split_k", [2, 3, 4])
def test_split_k_sums_every_slice_once_in_order(split_k):
    """fp32, no scale, no bias: the split result is bit for bit the in-order fp32 sum of each K slice's result
    from the unsplit kernel (same tiles, so the same dots), whichever slice's program arrives last."""
    x, w, _, _ = make_operands(3, 40, 1000, torch.float32, False, seed=split_k, quantized=False)
    knobs = dict(block_n=32, block_k=64)
    per_split, slices = k_slices(1000, split_k, 64)
    y = weight_gemm_triton(x, w, split_k=split_k, **knobs)
    total = torch.zeros_like(y)
    for s in range(slices):
        cut = slice(s * per_split, min(1000, (s + 1) * per_split))
        total += weight_gemm_triton(x[:, cut].contiguous(), w[:, cut].contiguous(), split_k=1, **knobs)
    assert torch.equal(y, total)


def test_split_k_counters_are_reset():
    """Every launch leaves the per-tile arrival counters at zero (the next split launch relies on it): after
    launches of different splits, tile counts and weight dtypes."""
    for quantized, m, n, k, split_k in [(True, 1, 97, 300, 2), (False, 5, 50, 1000, 4), (True, 17, 33, 300, 3)]:
        x, w, scale, b = make_operands(m, n, k, torch.bfloat16, True, seed=k, quantized=quantized)
        gemm(quantized, x, w, scale, b, split_k=split_k, block_k=32, block_n=16)
        assert not arrival_counters(x.device).any()


def test_split_k_counters_are_a_plain_tensor_under_inference_mode(monkeypatch):
    """First made inside inference_mode (an engine step), the counters are still a normal tensor: code outside
    inference_mode may reset them in place; later calls return the same buffer."""
    monkeypatch.setattr(arrival, "_counters", {})
    with torch.inference_mode():
        counters = arrival_counters(torch.device("cpu"))
    assert not counters.is_inference() and not counters.any()
    counters.fill_(2)
    assert arrival_counters(torch.device("cpu")) is counters


def test_split_k_on_and_off_agree():
    """The heuristic's config (a split at this shape, under the interpreter's 8 SMs and on a GPU) and the
    same without the split: both within the bound (they differ only in the order of the fp32 sums)."""
    x, w, _, b = make_operands(3, 40, 2048, torch.float32, True, seed=7, quantized=False)
    assert gemm_config(3, 40, x.device, 2048, w.dtype).split_k > 1
    for y in (weight_gemm_triton(x, w, b), weight_gemm_triton(x, w, b, split_k=1)):
        assert_within_fp32_sum_error(y, x, w, None, b)


# ---- the kernel's variants: e4m3 conversions, the swapped dot, e4m3 x (W8A8) -------------------------------

# Conversion 3 multiplies in bf16, which Triton's interpreter does on bf16's storage bits: a GPU test
CONVERTS_HERE = [c for c in sorted(fp8_gemm.CONVERTS) if ON_GPU or c != 3]


def every_e4m3_value(k=16):
    """[n, k] e4m3: every bit pattern but the two NaNs (which become 0), across rows and columns."""
    bits = torch.arange(256, dtype=torch.int32)
    bits[(bits & 0x7F) == 0x7F] = 0
    return bits.to(torch.uint8).view(FP8_DTYPE).reshape(-1, k)


@pytest.mark.parametrize("swap_ab", [False, True])
@pytest.mark.parametrize("convert", CONVERTS_HERE)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_every_e4m3_value_converts_exactly(dtype, convert, swap_ab):
    """x = I against every e4m3 value (subnormals, both zeros, +-448) with unit scales: the output is the
    weight itself, so each conversion must be exact."""
    w = every_e4m3_value().to(DEVICE)              # [16, 16]: out = I @ w.T = w.T
    x = torch.eye(16, dtype=dtype, device=DEVICE)
    y = fp8_weight_gemm_triton(x, w, torch.ones(16, device=DEVICE), convert=convert, swap_ab=swap_ab)
    assert torch.equal(y.float(), w.float().t())


@pytest.mark.parametrize("swap_ab", [False, True])
@pytest.mark.parametrize("convert", CONVERTS_HERE)
@pytest.mark.parametrize("m,n,k,split_k,block_n", [(1, 97, 520, 1, 64), (3, 50, 300, 2, 32), (16, 40, 2048, 4, 64)])
def test_variants_within_the_bound(m, n, k, split_k, block_n, convert, swap_ab):
    """Each conversion, with and without the swapped dot and split-K, within the fp32-sum bound; without the
    swap, every conversion gives the same bits (the conversions are exact; the dot is the same)."""
    x, w, scale, b = make_operands(m, n, k, torch.bfloat16, True, seed=m * n + convert)
    knobs = dict(split_k=split_k, block_n=block_n, block_k=64)
    y = fp8_weight_gemm_triton(x, w, scale, b, convert=convert, swap_ab=swap_ab, **knobs)
    assert_within_fp32_sum_error(y, x, w, scale, b)
    if not swap_ab:
        assert torch.equal(y, fp8_weight_gemm_triton(x, w, scale, b, convert=0, **knobs))


@pytest.mark.parametrize("swap_ab", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("m,n,k,split_k", [(1, 97, 520, 1), (3, 50, 300, 2), (16, 40, 2048, 4), (20, 64, 256, 1)])
def test_w8a8_matches_fp32_math(m, n, k, split_k, bias, swap_ab):
    """e4m3 x with per-token scales (rows of very different sizes; a zero row: its tiny scale) against fp32
    math on the dequantized values, within the fp32-sum bound; bf16 out."""
    x, w, scale, b = make_operands(m, n, k, torch.bfloat16, bias, seed=m + k)
    if m > 2:
        x[1] = 0
    x_fp8, x_scale = kernels.per_token_quant_fp8(x)
    y = fp8_gemm.fp8_w8a8_gemm_triton(x_fp8, x_scale, w, scale, b, split_k=split_k, block_n=32, block_k=64,
                                      swap_ab=swap_ab)
    assert y.dtype == torch.bfloat16
    x_dq = x_fp8.float() * x_scale
    assert_within_fp32_sum_error(y, x_dq, w, scale, b)
    assert_within_fp32_sum_error(fp8_gemm.fp8_w8a8_gemm_ref(x_fp8, x_scale, w, scale, b), x_dq, w, scale, b)
    if m > 2:
        assert torch.equal(y[1], b if bias else torch.zeros_like(y[1]))


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
    fp32 math on the dequantized weight), and W8A8 above it."""
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


@pytest.mark.parametrize("bias", [False, True])
def test_fp8_linear_w8a8_stream_path(monkeypatch, bias):
    """Up to TRITON_W8A8_MAX_M rows an Fp8Linear asks for its input quantized (quantizes_input: the op before
    hands an Fp8Activation) and streams it e4m3 x e4m3 through the Triton kernel, the dot swapped; given rows
    in the model's dtype it quantizes them itself (one launch) first. Both within the fp32-sum bound of the
    W8A8 math; above the threshold, no Triton launch (_scaled_mm)."""
    import backend.quantization as quantization
    launches = []
    monkeypatch.setattr(quantization, "fp8_w8a8_gemm_triton",
                        lambda *a, **kw: launches.append(a[0].shape) or fp8_gemm.fp8_w8a8_gemm_triton(*a, **kw))
    layer = fp8_layer(torch.float32, bias)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 200, generator=g).to(DEVICE)
    assert layer.quantizes_input(x) and quantization.TRITON_W8A16_MAX_M < 4 <= quantization.TRITON_W8A8_MAX_M
    assert fp8_gemm.gemm_config(4, 72, x.device, 200, x_fp8=True).swap_ab
    x_fp8, x_scale = kernels.per_token_quant_fp8(x)
    for given in (quantization.Fp8Activation(x_fp8, x_scale), x):
        y = layer(given)
        assert launches == [(4, 200)] and y.shape == (4, 72) and y.dtype == torch.float32
        assert_within_fp32_sum_error(y, x_fp8.float() * x_scale, layer.weight, layer.weight_scale, layer.bias,
                                     fp8_dot=True)
        launches.clear()
    monkeypatch.setattr(quantization, "TRITON_W8A8_MAX_M", 3)
    assert_within_fp32_sum_error(layer(x), x_fp8.float() * x_scale, layer.weight, layer.weight_scale, layer.bias,
                                 fp8_dot=True)
    assert launches == []


@pytest.mark.skipif(not ON_GPU, reason="the prefetch is PTX, compiled on a GPU with PDL (Hopper)")
@pytest.mark.parametrize("quantized", [True, False])
def test_l2_prefetch_changes_no_bits(monkeypatch, quantized):
    """The weights' L2 prefetch before the PDL wait (0 to 3 K steps, split or not, steps past a slice's end
    masked) leaves every output bit as without it."""
    x, w, scale, b = make_operands(3, 200, 2000, torch.bfloat16, True, seed=3, quantized=quantized)
    outs = {}
    for steps in (0, 1, 3):
        monkeypatch.setattr(fp8_gemm, "PREFETCH_STEPS", {w.element_size(): steps})
        assert fp8_gemm._prefetch_steps(w.element_size(), 128 // w.element_size(), True) == steps
        for split_k in (1, 4):   # K steps of one 128-byte line
            outs[steps, split_k] = gemm(quantized, x, w, scale, b, split_k=split_k, block_k=128 // w.element_size())
    for (steps, split_k), out in outs.items():
        assert torch.equal(out, outs[0, split_k]), (steps, split_k)


def test_fp8_model_streams_quantized_inputs_e4m3(monkeypatch, tiny_checkpoints):
    """quantization fp8, decode steps (M = 3): every projection of every layer streams e4m3 x e4m3 (none runs
    W8A16), and on CPU the logits are those of the same model with every GEMM through _scaled_mm
    (TRITON_W8A8_MAX_M 0): the same W8A8 math in another order. Not on the GPU: there _scaled_mm rounds each
    GEMM to bf16 and the fp8 dots sum with fewer bits, and the next per-token quantization turns such last-bit
    differences into whole e4m3 steps; the GPU's check is tests/gpu/test_gpu_fp8.py (each shape against the
    dequantized math, the engine against bf16)."""
    import backend.quantization as quantization
    from tests.kernels.test_weight_gemm_routing import forward_logits
    streamed, w8a16 = [], []
    monkeypatch.setattr(quantization, "fp8_w8a8_gemm_triton",
                        lambda *a, **kw: streamed.append(a[0].shape) or fp8_gemm.fp8_w8a8_gemm_triton(*a, **kw))
    monkeypatch.setattr(kernels, "fp8_weight_gemm",
                        lambda *a, **kw: w8a16.append(a[0].shape) or fp8_gemm.fp8_weight_gemm(*a, **kw))
    path = tiny_checkpoints["llama"]
    streaming = forward_logits(path, [], quantization="fp8")
    assert len([s for s in streamed if s[0] == 3]) == 2 * 2 * 4 and w8a16 == []   # decode steps x layers x GEMMs
    monkeypatch.setattr(quantization, "TRITON_W8A8_MAX_M", 0)
    streamed.clear()
    scaled_mm = forward_logits(path, [], quantization="fp8")
    assert streamed == []
    if not ON_GPU:
        torch.testing.assert_close(streaming, scaled_mm, rtol=1e-4, atol=1e-4)
