"""quantization: fp8 (W8A8), vLLM's name: float8 e4m3 weights with one scale per output channel, and
activations quantized on the fly with one scale per token; each GEMM is torch._scaled_mm with row-wise
scales (per-token x per-channel), fp32 accumulation, output in the model's dtype.

Why per-token activation scales (not per-tensor): a token's quantization then depends on that token
only, so a request's outputs do not change with the batch it runs in, and the CUDA graphs' padding rows
(whatever they hold) cannot move the real rows' scale; an outlier token costs precision to itself only.
The cost is the same one amax pass over the activations. The scales stay on the device (no host sync).

Weights come either from a bf16/fp32 checkpoint, quantized at load (quantize_linears, after the q/k/v
and gate/up fusion: per-channel scales make the fused weight's quantization that of its parts), or from
an FP8 checkpoint (Hugging Face layout: float8_e4m3fn `weight`, `weight_scale` per tensor or per
channel): fp8_linears makes room for them before loading; a per-tensor scale is expanded to its
channels (exact), so q, k and v with different scales fuse by concatenation. A checkpoint's
`input_scale` (static activation scales) is not used: dynamic per-token scales are at least as precise.

On CPU torch._scaled_mm runs too (same code path; fp32 output), so CPU tests check the real thing.

Up to TRITON_W8A8_MAX_M rows (decode) on CUDA the same W8A8 math runs in the Triton weight-streaming kernel
(kernels.fp8_gemm.fp8_w8a8_gemm_triton: e4m3 x e4m3 tensor-core dots, K slices added in fp32): cuBLASLt's FP8
GEMM is built for large M, and at decode sizes the GEMM is a stream of the weight. The op before a projection
quantizes its input where it is one launch already (the RMSNorm before q/k/v and gate/up, SiLU-and-mul
before down: quantizes_input), so a decode layer adds one quantizing launch (o's input). The W8A16 kernel
(kernels.fp8_weight_gemm: x as it is, the weights dequantized in registers) remains for at most
TRITON_W8A16_MAX_M rows (0: off, the default).

Unquantized projections (UnquantizedLinear, vLLM's UnquantizedLinearMethod) run torch's GEMM (cuBLAS), or
the same Triton weight-streaming kernel on their weights in the model's dtype (kernels.fp8_gemm.weight_gemm)
on CUDA when the flattened M is at most TRITON_BF16_GEMV_MAX_M (0: off).
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from kernels.fp8 import FP8_DTYPE
from kernels.fp8_gemm import fp8_w8a8_gemm_triton, weight_gemm

# The decoder layers' projections that run in FP8 (the embedding and the LM head stay in the model's dtype,
# as in vLLM's FP8 checkpoints).
FP8_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Largest flattened M that takes the Triton W8A16 kernel on CUDA (x not quantized); 0: none. It used to be 32;
# the W8A8 stream with fast per-token quantization beat it in the H100 decode step (bench/RESULTS.md, profile_decode
# FP8, Llama-3-8B shape, 512 context): 1 sequence 3.72 -> 3.55 ms a step, 16: 4.40 -> 4.16, 32: 5.97 -> 4.71;
# served at 32 concurrent requests (tritonserver, 512 in / 256 out) 4,964 -> 6,264 output tokens a second.
# W8A8 is also vLLM's FP8 math, and a token's activations are then quantized alike at every batch size.
TRITON_W8A16_MAX_M = 0

# Largest flattened M whose W8A8 GEMMs stream through the Triton kernel on CUDA (above it, _scaled_mm). H100
# (same profile): 64 sequences 6.69 -> 5.77 ms a step; at 128, 8.29 (cuBLAS) against 9.12 (Triton).
TRITON_W8A8_MAX_M = 64

# Off the Triton path (CPU), every row count multiplies the FP8 weights' exact values with unquantized
# activations (kernels.fp8_gemm.fp8_weight_gemm_ref, the W8A16 kernel's math) instead of W8A8:
# bench/fp8_quality.py --weight-only sets it, to measure the weight-only arithmetic against W8A8's.
TORCH_PATH_WEIGHT_ONLY = False

# Largest flattened M at which the unquantized projections (weights in the model's dtype, bf16 when served)
# take the Triton weight-streaming kernel on CUDA instead of torch's GEMM (cuBLAS). H100: the Llama-3-8B
# projections' sum 158 vs 161 us at M = 1, 161 vs 164 at M = 16, a loss at 32 (bench/fp8_gemm.py); in the
# engine, single-request W8 decode 6.34 -> 6.11 ms a token (no split-K reduce launches: 390 -> 326 kernels).
# M is a shape, so the choice is fixed per captured CUDA graph.
TRITON_BF16_GEMV_MAX_M = 16

# cuBLASLt's FP8 fast accumulation (the tensor cores' partial sums are not promoted to fp32 every few
# K steps), as vLLM's Hopper FP8 GEMMs run. H100 (bench/fp8_gemm.py): gate_up 68 -> 59 us at M = 256,
# 1669 -> 1418 us at 8192; W8 offline FP8 12,836-12,995 -> 13,550 tok/s in one call; within the GPU
# test's tolerance of the dequantized reference at every Llama-3-8B and Qwen3-0.6B shape.
SCALED_MM_FAST_ACCUM = True


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of x [M, K] to FP8 with its own scale: (x_fp8 [M, K], scale [M, 1] fp32), x ~ x_fp8 * scale.
    One Triton launch on CUDA (kernels.per_token_quant_fp8), the torch reference elsewhere; bit-equal."""
    return kernels.per_token_quant_fp8(x)


def scaled_mm(x_fp8, x_scale, weight, weight_scale, out_dtype):
    """x_fp8 [M, K] (scales [M, 1]) @ weight [N, K].T (scales [N]) -> [M, N] in out_dtype. CUDA's row-wise
    _scaled_mm writes bf16 only: other dtypes are converted from it there."""
    if x_fp8.device.type == "cuda" and (x_fp8.shape[1] % 16 or weight.shape[0] % 16):
        # cuBLAS's FP8 GEMM wants K and N in multiples of 16 (served models' are): same math, dequantized.
        return ((x_fp8.float() * x_scale) @ (weight.float() * weight_scale.view(-1, 1)).t()).to(out_dtype)
    mm_dtype = out_dtype if x_fp8.device.type == "cpu" else torch.bfloat16
    fast = {"use_fast_accum": True} if SCALED_MM_FAST_ACCUM and x_fp8.is_cuda else {}
    y = torch._scaled_mm(x_fp8, weight.t(), scale_a=x_scale, scale_b=weight_scale.view(1, -1), out_dtype=mm_dtype,
                         **fast)
    return y.to(out_dtype)


def unquantized_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight [N, K].T (+ bias), all in one dtype: torch's GEMM, or the Triton weight-streaming
    kernel for at most TRITON_BF16_GEMV_MAX_M rows on the Triton path."""
    rows = x.reshape(-1, x.shape[-1])
    if 0 < rows.shape[0] <= TRITON_BF16_GEMV_MAX_M and kernels.use_triton(rows):
        return weight_gemm(rows, weight, bias).reshape(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


class UnquantizedLinear(nn.Linear):
    """nn.Linear (same parameters, same checkpoint names) whose GEMM is unquantized_gemm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return unquantized_gemm(x, self.weight, self.bias)


class Fp8Activation(NamedTuple):
    """An FP8 projection's input already quantized per token (by the RMSNorm before it, in one launch)."""
    data: torch.Tensor    # [M, K] float8 e4m3
    scale: torch.Tensor   # [M, 1] fp32

    @property
    def shape(self):
        return self.data.shape


class Fp8Linear(nn.Module):
    """y = x @ (weight * weight_scale[:, None]).T + bias, with x quantized per token."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.ones(out_features, dtype=torch.float32, device=device),
                                         requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None
        self.out_dtype = dtype

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Fp8Linear":
        w = linear.weight
        fp8 = cls(w.shape[1], w.shape[0], linear.bias is not None, w.dtype, w.device)
        fp8.weight.data, fp8.weight_scale.data = (t.contiguous() for t in quantize_weight(w))
        if linear.bias is not None:
            fp8.bias.data = linear.bias.data
        return fp8

    @classmethod
    def concat(cls, linears: list["Fp8Linear"]) -> "Fp8Linear":
        """One projection of several (fused q/k/v, gate/up): weights and per-channel scales concatenated."""
        first = linears[0]
        fused = cls(first.in_features, sum(l.out_features for l in linears), first.bias is not None,
                    first.out_dtype, device="meta")
        fused.weight = nn.Parameter(torch.cat([l.weight for l in linears]), requires_grad=False)
        fused.weight_scale = nn.Parameter(torch.cat([l.weight_scale for l in linears]), requires_grad=False)
        if first.bias is not None:
            fused.bias = nn.Parameter(torch.cat([l.bias for l in linears]), requires_grad=False)
        return fused

    @staticmethod
    def _takes_w8a16(num_rows: int) -> bool:
        """Small batches on the Triton path: the W8A16 kernel, x as it is (see the module's docstring)."""
        return num_rows <= TRITON_W8A16_MAX_M

    def quantizes_input(self, x: torch.Tensor) -> bool:
        """Whether forward(x) would quantize x per token on the Triton path (W8A8): the op before may do
        it in its own launch instead and hand over an Fp8Activation."""
        return kernels.use_triton(x) and not self._takes_w8a16(x.numel() // x.shape[-1])

    def forward(self, x: torch.Tensor | Fp8Activation) -> torch.Tensor:
        if isinstance(x, Fp8Activation):   # quantized by the op before
            x_fp8, x_scale, lead = x.data, x.scale, x.shape[:-1]
        else:
            lead = x.shape[:-1]
            rows = x.reshape(-1, x.shape[-1])
            if not rows.shape[0]:
                return x.new_empty(*lead, self.out_features)
            if self._takes_w8a16(rows.shape[0]) if kernels.use_triton(rows) else TORCH_PATH_WEIGHT_ONLY:
                y = kernels.fp8_weight_gemm(rows.to(self.out_dtype), self.weight, self.weight_scale, self.bias)
                return y.reshape(*lead, self.out_features)
            x_fp8, x_scale = quantize_rows(rows)
        if x_fp8.shape[0] <= TRITON_W8A8_MAX_M and kernels.use_triton(x_fp8):
            y = fp8_w8a8_gemm_triton(x_fp8, x_scale, self.weight, self.weight_scale, self.bias, self.out_dtype)
            return y.reshape(*lead, self.out_features)
        y = scaled_mm(x_fp8, x_scale, self.weight, self.weight_scale, self.out_dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (FP8 [N, K], scale [N] fp32): each output channel scaled so its largest |value| is 448."""
    w_fp8, scale = quantize_rows(w)
    return w_fp8, scale.view(-1)


def _projections(model):
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                yield parent, name, child


def fp8_linears(model):
    """Before loading an FP8 checkpoint: each decoder projection becomes an Fp8Linear of the same shape
    (empty FP8 weight, per-channel scales), so that the checkpoint's tensors load by name."""
    for parent, name, child in _projections(model):
        if name in FP8_PROJECTIONS and isinstance(child, nn.Linear):
            w = child.weight
            setattr(parent, name, Fp8Linear(w.shape[1], w.shape[0], child.bias is not None, w.dtype, w.device))


def quantize_linears(model):
    """After loading (and fusing) a bf16/fp32 checkpoint: each decoder projection quantized to FP8."""
    for parent, name, child in _projections(model):
        if isinstance(child, nn.Linear):
            setattr(parent, name, Fp8Linear.from_linear(child))


def checkpoint_scale(tensor: torch.Tensor, channels: int) -> torch.Tensor:
    """A checkpoint's weight_scale (per tensor: one element; per channel: [N] or [N, 1]) as [channels] fp32:
    a per-tensor scale is expanded to every channel, which is exact."""
    t = tensor.float().reshape(-1)
    if t.numel() == 1:
        return t.expand(channels)
    if t.numel() != channels:
        raise ValueError(f"weight_scale has {t.numel()} elements for {channels} output channels")
    return t


# ---- FP8 checkpoints ----------------------------------------------------------------------------------
# The layouts of FP8 checkpoints this engine loads (config.json quantization_config):
# - "channel": float8 `weight` with `weight_scale` per tensor or per output channel: quant_method fp8
#   (vLLM's Fp8LinearMethod), compressed-tensors' float-quantized with strategy tensor or channel
#   (e.g. RedHat/Neural Magic's Llama FP8 checkpoints), fbgemm_fp8 (Meta's). Loaded as they are.
# - "block": quant_method fp8 with weight_block_size (DeepSeek-V3 style, e.g. Qwen3's official FP8
#   checkpoints): `weight_scale_inv` per [bn, bk] block. Dequantized at load and quantized again per
#   output channel (this engine's GEMMs scale per token x per channel), which rounds twice: close to
#   the checkpoint, not bit-equal to it.
FP8_CHANNEL, FP8_BLOCK = "channel", "block"


def checkpoint_fp8_layout(quantization_config: dict | None) -> str | None:
    """FP8_CHANNEL, FP8_BLOCK or None (no quantization_config); ValueError for what cannot load here."""
    qc = quantization_config
    if not qc:
        return None
    method = qc.get("quant_method")
    if method == "fp8":
        block = qc.get("weight_block_size")
        if block and (len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block)):
            raise ValueError(f"the checkpoint's FP8 weight_block_size {block!r} is not two positive integers")
        return FP8_BLOCK if block else FP8_CHANNEL
    if method == "fbgemm_fp8":
        return FP8_CHANNEL
    if method == "compressed-tensors":
        _check_compressed_tensors_fp8(qc)
        return FP8_CHANNEL
    raise ValueError(f"the checkpoint's quantization_config has quant_method {method!r}: not supported "
                     "(supported: fp8, fbgemm_fp8, and compressed-tensors with FP8 weights)")


def _check_compressed_tensors_fp8(qc: dict):
    """compressed-tensors: every group's weights 8-bit float, per tensor or per channel; only lm_head
    left unquantized (each decoder projection here is FP8 or none is)."""
    groups = list((qc.get("config_groups") or {}).values())
    if not groups:
        raise ValueError("the checkpoint's compressed-tensors quantization_config has no config_groups")
    for group in groups:
        weights = group.get("weights") or {}
        if weights.get("type") != "float" or weights.get("num_bits") != 8 or \
                weights.get("strategy") not in ("tensor", "channel"):
            raise ValueError("the checkpoint's compressed-tensors weights are not FP8 per tensor or per channel "
                             f"(got {weights!r}): not supported")
    ignored = [name for name in qc.get("ignore") or [] if not name.endswith("lm_head")]
    if ignored:
        raise ValueError(f"the checkpoint leaves {ignored[:3]} unquantized: not supported (only lm_head may be)")


def dequantize_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: list[int]) -> torch.Tensor:
    """A block-scaled FP8 weight [N, K] (scale_inv [ceil(N/bn), ceil(K/bk)], a multiplier despite its
    name) as fp32."""
    n, k = weight.shape
    bn, bk = block
    scales = scale_inv.float().repeat_interleave(bn, dim=0)[:n].repeat_interleave(bk, dim=1)[:, :k]
    return weight.float() * scales
