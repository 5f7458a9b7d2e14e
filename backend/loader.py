"""Hugging Face checkpoint directory -> our model, weights straight onto the target device."""
import contextlib
import json
import math
import os

import torch
from safetensors import safe_open

from backend import parallel, quantization
from backend.config import EngineConfig
from backend.models.llama import LlamaArgs, LlamaForCausalLM, rope_cos_sin_cache, shard_for_rank


@contextlib.contextmanager
def _default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def safetensors_files(model_dir: str) -> list[str]:
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(model_dir, n) for n in names]
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.exists(single):
        return [single]
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")


def load_model(config: EngineConfig) -> LlamaForCausalLM:
    """config: resolved (EngineConfig.resolve); this rank's shard under tensor parallelism."""
    args = shard_for_rank(LlamaArgs.from_hf(config.hf), parallel.tp_size(), parallel.tp_rank())
    device = config.torch_device
    with torch.device(device), _default_dtype(config.torch_dtype):
        model = LlamaForCausalLM(args)
    qc = config.hf.get("quantization_config")
    layout = quantization.checkpoint_fp8_layout(qc) if config.load_format != "dummy" else None
    if layout == quantization.FP8_CHANNEL:
        quantization.fp8_linears(model)
    if config.load_format == "dummy":
        _init_dummy(model, config.seed)
    else:
        _load_safetensors(model, config.model, device, kv_scales=config.kv_cache_dtype == "fp8",
                          weight_block=qc.get("weight_block_size") if layout == quantization.FP8_BLOCK else None)
    model.fuse_weights()
    if config.quantization == "fp8" and layout != quantization.FP8_CHANNEL:
        quantization.quantize_linears(model)
    # RoPE angles stay fp32 whatever the weights' dtype.
    model.cos_sin_cache = rope_cos_sin_cache(args, max(config.max_model_len, args.max_position)).to(device)
    return model.eval().requires_grad_(False)


# Per-tensor FP8 KV-cache scales of vLLM checkpoints (kv_scale: one for both, older checkpoints).
KV_SCALE_NAMES = {"self_attn.k_scale": ("k_scale",), "self_attn.v_scale": ("v_scale",),
                  "self_attn.kv_scale": ("k_scale", "v_scale")}


def _load_kv_scale(model, name, f, kv_scales):
    """True if `name` is a KV-cache scale: loaded when the cache is FP8, else not needed."""
    suffix = next((s for s in KV_SCALE_NAMES if name.endswith(s)), None)
    if suffix is None:
        return False
    if kv_scales:
        attn = model.get_submodule(name[:-len(suffix)] + "self_attn")
        for buffer in KV_SCALE_NAMES[suffix]:
            getattr(attn, buffer).copy_(f.get_tensor(name).float().reshape(1))
    return True


def _load_safetensors(model, model_dir, device, kv_scales=False, weight_block=None):
    """weight_block [bn, bk]: a block-scaled FP8 checkpoint, whose weights are dequantized here."""
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = set()
    for path in safetensors_files(model_dir):
        with safe_open(path, framework="pt", device=str(device)) as f:
            names = set(f.keys())
            for name in names:
                if name.endswith((".input_scale", ".weight_scale_inv")) or _load_kv_scale(model, name, f, kv_scales):
                    continue   # static activation scales: quantization uses dynamic per-token ones
                if name not in params:
                    if "rotary_emb" in name:
                        continue
                    raise ValueError(f"checkpoint tensor {name!r} has no place in the model")
                param = params[name]
                if name.endswith(".weight_scale"):
                    tensor = _load_weight_scale(f, name, param.shape[0], model.args.tp_rank)
                elif weight_block and name + "_scale_inv" in names:
                    full = quantization.dequantize_blocks(f.get_tensor(name), f.get_tensor(name + "_scale_inv"),
                                                          weight_block)
                    tensor = full[_shard_index(full.shape, param.shape, model.args.tp_rank)]
                else:
                    tensor = _load_shard(f, name, param.shape, model.args.tp_rank)
                if tensor.shape != param.shape:
                    raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                                     f"the model expects {tuple(param.shape)}")
                param.data.copy_(tensor)
                loaded.add(name)
    if model.args.tie_word_embeddings:
        loaded.add("lm_head.weight")
    missing = set(params) - loaded
    if missing:
        raise ValueError(f"checkpoint lacks {sorted(missing)[:5]}{' ...' if len(missing) > 5 else ''}")


def _load_shard(f, name, shape, rank):
    """The tensor, or this rank's slice of it where the parameter holds only a shard (the one dim
    whose size differs: rows of column-parallel and vocabulary-parallel weights, columns of
    row-parallel ones)."""
    part = f.get_slice(name)
    return part[_shard_index(part.get_shape(), shape, rank)]


def _shard_index(full, shape, rank) -> tuple:
    split = [d for d, (n, m) in enumerate(zip(full, shape)) if n != m]
    index = [slice(None)] * len(full)
    if split:
        d = split[0]
        index[d] = slice(rank * shape[d], (rank + 1) * shape[d])
    return tuple(index)


def _load_weight_scale(f, name, channels, rank):
    """An FP8 weight's scales as [channels] (this rank's, when its output channels are sharded)."""
    full = f.get_slice(name).get_shape()
    if math.prod(full) in (1, channels):
        return quantization.checkpoint_scale(f.get_tensor(name), channels)
    return quantization.checkpoint_scale(_load_shard(f, name, (channels, *full[1:]), rank), channels)


def _init_dummy(model, seed):
    gen = torch.Generator(device=model.lm_head.weight.device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.data.fill_(1.0)
        else:
            p.data.uniform_(-0.02, 0.02, generator=gen)
