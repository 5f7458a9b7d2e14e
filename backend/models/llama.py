"""The Llama family (Llama 2/3, Mistral, Qwen2/2.5, Qwen3) over a paged KV cache.

Parameter names follow Hugging Face checkpoints so weights load by name. Hot ops go through
`kernels`, which picks the Triton kernel on CUDA and the torch reference elsewhere.
"""
import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

import kernels
from backend import parallel
from backend.attention import AttentionMetadata
from backend.quantization import Fp8Activation, Fp8Linear, UnquantizedLinear


@dataclass
class LlamaArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position: int
    qkv_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool
    tp_size: int = 1      # tensor parallelism: the head, MLP and vocabulary counts above are this rank's share
    tp_rank: int = 0

    @classmethod
    def from_hf(cls, c: dict) -> "LlamaArgs":
        model_type = c.get("model_type", "llama")
        if model_type not in ("llama", "mistral", "qwen2", "qwen3"):
            raise ValueError(f"model_type {model_type!r} is not supported (llama, mistral, qwen2, qwen3)")
        rope = c.get("rope_parameters") or {}          # transformers >= 5 keeps rope settings here
        scaling = c.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        heads = c["num_attention_heads"]
        return cls(
            vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
            num_layers=c["num_hidden_layers"], num_heads=heads, num_kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads, rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            rope_theta=c.get("rope_theta") or rope.get("rope_theta", 10000.0), rope_scaling=scaling,
            max_position=c.get("max_position_embeddings", 4096),
            qkv_bias=model_type == "qwen2" or bool(c.get("attention_bias", False)),
            qk_norm=model_type == "qwen3", tie_word_embeddings=bool(c.get("tie_word_embeddings", False)))


def shard_for_rank(a: LlamaArgs, size: int, rank: int) -> LlamaArgs:
    """This rank's share: heads, KV heads, MLP width and vocabulary split evenly across `size` ranks."""
    if size == 1:
        return a
    for name in ("num_heads", "num_kv_heads", "intermediate_size", "vocab_size"):
        if getattr(a, name) % size:
            raise ValueError(f"parameter 'tensor_parallel_size' ({size}) must divide the model's {name} "
                             f"({getattr(a, name)})")
    return dataclasses.replace(a, num_heads=a.num_heads // size, num_kv_heads=a.num_kv_heads // size,
                               intermediate_size=a.intermediate_size // size, vocab_size=a.vocab_size // size,
                               tp_size=size, tp_rank=rank)


def rope_cos_sin_cache(args: LlamaArgs, max_position: int) -> torch.Tensor:
    d = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    s = args.rope_scaling
    kind = (s or {}).get("rope_type", (s or {}).get("type"))
    if kind == "llama3":
        inv_freq = _llama3_scale(inv_freq, s)
    elif kind == "linear":
        inv_freq = inv_freq / s["factor"]
    elif kind not in (None, "default"):
        raise ValueError(f"rope scaling {kind!r} is not supported")
    freqs = torch.outer(torch.arange(max_position, dtype=torch.float64), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).float()


def _llama3_scale(inv_freq, s):
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = ((old_len / wavelen) - low) / (high - low)
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)


def fuse_linears(*linears: UnquantizedLinear | Fp8Linear) -> UnquantizedLinear | Fp8Linear:
    if isinstance(linears[0], Fp8Linear):
        return Fp8Linear.concat(linears)
    weight = torch.cat([l.weight for l in linears])
    bias = torch.cat([l.bias for l in linears]) if linears[0].bias is not None else None
    fused = UnquantizedLinear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        fused.bias = nn.Parameter(bias, requires_grad=False)
    return fused


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x, residual=None, quantize_for=None):
        """quantize_for: the projection that reads the output; an Fp8Linear that would quantize it per
        token gets it quantized here instead, in the norm's own launch (an Fp8Activation)."""
        if isinstance(quantize_for, Fp8Linear) and quantize_for.quantizes_input(x):
            (y, scale), residual_out = kernels.rms_norm_quant_fp8(x, self.weight, self.eps, residual)
            return Fp8Activation(y, scale) if residual is None else (Fp8Activation(y, scale), residual_out)
        return kernels.rms_norm(x, self.weight, self.eps, residual)


class Attention(nn.Module):
    def __init__(self, a: LlamaArgs):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = a.num_heads, a.num_kv_heads, a.head_dim
        self.q_proj = UnquantizedLinear(a.hidden_size, a.num_heads * a.head_dim, bias=a.qkv_bias)
        self.k_proj = UnquantizedLinear(a.hidden_size, a.num_kv_heads * a.head_dim, bias=a.qkv_bias)
        self.v_proj = UnquantizedLinear(a.hidden_size, a.num_kv_heads * a.head_dim, bias=a.qkv_bias)
        self.o_proj = UnquantizedLinear(a.num_heads * a.head_dim, a.hidden_size, bias=False)
        if a.qk_norm:
            self.q_norm = RMSNorm(a.head_dim, a.rms_norm_eps)
            self.k_norm = RMSNorm(a.head_dim, a.rms_norm_eps)
        self.qk_norm = a.qk_norm
        self.scale = a.head_dim ** -0.5
        # kv_cache_dtype fp8: the cache holds k / k_scale and v / v_scale (1.0 unless the checkpoint has
        # them); tensors, so that kernels read them on the device. Ignored by bf16/fp32 caches.
        self.register_buffer("k_scale", torch.ones(1, dtype=torch.float32), persistent=False)
        self.register_buffer("v_scale", torch.ones(1, dtype=torch.float32), persistent=False)

    def fuse_weights(self):
        """One matmul for q, k and v (the checkpoint's separate weights, concatenated)."""
        self.qkv_proj = fuse_linears(self.q_proj, self.k_proj, self.v_proj)
        del self.q_proj, self.k_proj, self.v_proj

    def _qk_norm_args(self) -> dict:
        if not self.qk_norm:
            return {}
        return dict(q_norm_weight=self.q_norm.weight, k_norm_weight=self.k_norm.weight, eps=self.q_norm.eps)

    def forward(self, positions, x, kv_cache, meta: AttentionMetadata, cos_sin_cache):
        t = x.shape[0]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.reshape(t, self.num_heads, self.head_dim)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        k_cache, v_cache = kv_cache
        # q/k norm (Qwen3), rotary and the cache write in one launch on the kernel path; q may be
        # overwritten in place (it is a view of this step's qkv output), so only the returned q is used
        q = kernels.qk_norm_rotary_store(positions, q, k, v, k_cache, v_cache, meta.slot_mapping, cos_sin_cache,
                                         **self._qk_norm_args(), k_scale=self.k_scale, v_scale=self.v_scale)
        o = kernels.paged_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                                    self.scale, meta.max_query_len, meta.split_decodes, self.k_scale, self.v_scale)
        return parallel.all_reduce(self.o_proj(o.reshape(t, -1)))   # row-parallel: sum the ranks' parts


class MLP(nn.Module):
    def __init__(self, a: LlamaArgs):
        super().__init__()
        self.gate_proj = UnquantizedLinear(a.hidden_size, a.intermediate_size, bias=False)
        self.up_proj = UnquantizedLinear(a.hidden_size, a.intermediate_size, bias=False)
        self.down_proj = UnquantizedLinear(a.intermediate_size, a.hidden_size, bias=False)

    def fuse_weights(self):
        self.gate_up_proj = fuse_linears(self.gate_proj, self.up_proj)
        del self.gate_proj, self.up_proj

    def forward(self, x):
        h = self.gate_up_proj(x)
        if isinstance(self.down_proj, Fp8Linear) and self.down_proj.quantizes_input(h):
            h = Fp8Activation(*kernels.silu_and_mul_quant_fp8(h))   # activation and quantization, one launch
        else:
            h = kernels.silu_and_mul(h)
        return parallel.all_reduce(self.down_proj(h))


class DecoderLayer(nn.Module):
    def __init__(self, a: LlamaArgs):
        super().__init__()
        self.self_attn = Attention(a)
        self.mlp = MLP(a)
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)

    def forward(self, positions, x, residual, kv_cache, meta, cos_sin_cache):
        qkv, gate_up = self.self_attn.qkv_proj, self.mlp.gate_up_proj
        if residual is None:
            residual, x = x, self.input_layernorm(x, quantize_for=qkv)
        else:
            x, residual = self.input_layernorm(x, residual, quantize_for=qkv)
        x = self.self_attn(positions, x, kv_cache, meta, cos_sin_cache)
        x, residual = self.post_attention_layernorm(x, residual, quantize_for=gate_up)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, a: LlamaArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(a) for _ in range(a.num_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, a: LlamaArgs):
        super().__init__()
        self.args = a
        self.model = LlamaModel(a)
        self.lm_head = UnquantizedLinear(a.hidden_size, a.vocab_size, bias=False)   # decode: the weight stream
        if a.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("cos_sin_cache", rope_cos_sin_cache(a, a.max_position), persistent=False)

    def embed(self, input_ids):
        a = self.args
        if a.tp_size == 1:
            return self.model.embed_tokens(input_ids)
        # Vocabulary-parallel: each rank looks up the ids in its slice, the others contribute zeros.
        start = a.tp_rank * a.vocab_size
        local = input_ids - start
        mine = (local >= 0) & (local < a.vocab_size)
        x = self.model.embed_tokens(local.clamp(0, a.vocab_size - 1)) * mine.unsqueeze(-1)
        return parallel.all_reduce(x)

    def forward(self, input_ids, positions, kv_caches, meta: AttentionMetadata):
        """Hidden states of the packed new tokens; kv_caches[i] = (k_cache, v_cache) of layer i."""
        x, residual = self.embed(input_ids), None
        for layer, kv_cache in zip(self.model.layers, kv_caches):
            x, residual = layer(positions, x, residual, kv_cache, meta, self.cos_sin_cache)
        x, _ = self.model.norm(x, residual)
        return x

    def fuse_weights(self):
        for layer in self.model.layers:
            layer.self_attn.fuse_weights()
            layer.mlp.fuse_weights()

    def compute_logits(self, hidden):
        """In the model's dtype: the sampler makes the fp32 copy only for steps that read the values."""
        return parallel.all_gather_last_dim(self.lm_head(hidden))
