"""Hot-path ops. Each op file holds a torch reference (`*_ref`) and, where written, an OpenAI-Triton
kernel; the public function picks the kernel on CUDA and the reference elsewhere (or when
LLM_KERNELS=reference is set), so callers never know which ran."""
from kernels.dispatch import use_triton
from kernels.paged_attention import paged_attention
from kernels.store_kvcache import store_kvcache
from kernels.rms_norm import rms_norm, rms_norm_quant_fp8
from kernels.rotary import rotary_embedding
from kernels.activation import silu_and_mul, silu_and_mul_quant_fp8
from kernels.attention_prologue import qk_norm_rotary_store
from kernels.quant_fp8 import per_token_quant_fp8
from kernels.fp8_gemm import fp8_weight_gemm
from kernels.argmax import first_argmax

__all__ = ["use_triton", "paged_attention", "store_kvcache", "rms_norm", "rms_norm_quant_fp8", "rotary_embedding",
           "silu_and_mul", "silu_and_mul_quant_fp8", "qk_norm_rotary_store", "per_token_quant_fp8", "fp8_weight_gemm",
           "first_argmax"]
