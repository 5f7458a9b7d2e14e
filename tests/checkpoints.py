"""Tiny random-weight Hugging Face checkpoints for tests (no hub: everything is built locally)."""
import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast,
                          Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

CORPUS = os.path.join(os.path.dirname(__file__), "..", "tools", "data", "tinyshakespeare.txt")
FALLBACK = "To be, or not to be, that is the question. Héllo wörld, ça va? 日本語のテキスト 🙂 " * 50

ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM, dict(tie_word_embeddings=False)),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(tie_word_embeddings=True, head_dim=16)),
}


def train_tokenizer(vocab_size=384):
    """A byte-level BPE tokenizer with <s> (bos, prepended) and </s> (eos), trained in a second."""
    text = open(CORPUS).read()[:200_000] if os.path.exists(CORPUS) else ""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text, FALLBACK], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


# A ChatML-style template (system turn, role markers, raise_exception), as many chat models carry.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' ~ message['role']) }}{% endif %}"
    "{{ '<|im_start|>' ~ message['role'] ~ '\\n' ~ message['content'] ~ '<|im_end|>' ~ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def make_tiny_checkpoint(path, arch="llama", seed=0, chat_template=None, **overrides):
    """Write config.json, model.safetensors, tokenizer files (with `chat_template`, if given) and
    generation_config.json to path."""
    cfg_cls, model_cls, extra = ARCHS[arch]
    tokenizer = train_tokenizer()
    if chat_template:
        tokenizer.chat_template = chat_template
    kw = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              bos_token_id=0, eos_token_id=1, rope_theta=10000.0)
    kw.update(extra)
    kw.update(overrides)
    if arch == "qwen2":
        kw.setdefault("use_sliding_window", False)
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**kw)).eval()
    with torch.no_grad():  # random init is too flat to tell bugs apart: widen it
        for p in model.parameters():
            if p.dim() >= 1:
                p.normal_(0, 0.08)
    for name, module in model.named_modules():
        if name.endswith("norm") or name.endswith("layernorm"):
            with torch.no_grad():
                module.weight.uniform_(0.5, 1.5)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    GenerationConfig(bos_token_id=0, eos_token_id=1).save_pretrained(path)
    return path


FP8_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_fp8_checkpoint(src, dst, per_tensor=False, kv_scales=None, quantize_weights=True):
    """A copy of checkpoint `src` in Hugging Face's FP8 layout (as vLLM's Fp8LinearMethod reads it): each
    decoder projection's weight as float8_e4m3fn with `weight_scale` (per_tensor: one scale per tensor,
    else one per output channel, shape [N, 1]) and an `input_scale` (static activation scale, which this
    engine does not use), config.json's quantization_config quant_method fp8. kv_scales (k, v): per-layer
    `self_attn.k_scale` / `self_attn.v_scale` tensors as vLLM's FP8-KV checkpoints carry (written even
    with quantize_weights=False). Scales are amax / 448, computed here independently of the engine."""
    import json
    import shutil
    from safetensors.torch import load_file, save_file

    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        if name != "model.safetensors":
            shutil.copy(os.path.join(src, name), dst)
    tensors, out = load_file(os.path.join(src, "model.safetensors")), {}
    for name, w in tensors.items():
        module = name.rsplit(".", 2)[-2] if name.endswith(".weight") else ""
        if not (quantize_weights and module in FP8_PROJECTIONS):
            out[name] = w
            continue
        amax = w.float().abs().amax() if per_tensor else w.float().abs().amax(dim=1, keepdim=True)
        scale = amax / 448.0
        out[name] = (w.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
        out[name[:-len("weight")] + "weight_scale"] = scale.reshape(()) if per_tensor else scale
        out[name[:-len("weight")] + "input_scale"] = torch.tensor(0.125)
    if kv_scales is not None:
        layers = {n.split(".")[2] for n in tensors if n.startswith("model.layers.")}
        for i in layers:
            out[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor(kv_scales[0])
            out[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor(kv_scales[1])
    save_file(out, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    if quantize_weights:
        with open(os.path.join(dst, "config.json")) as f:
            config = json.load(f)
        config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "static"}
        with open(os.path.join(dst, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
    return dst


def make_fp8_block_checkpoint(src, dst, block=(16, 16)):
    """A copy of checkpoint `src` with its decoder projections in the block-scaled FP8 layout (DeepSeek-V3
    style, as Qwen3's FP8 checkpoints): float8_e4m3fn `weight` and `weight_scale_inv` [ceil(N/bn),
    ceil(K/bk)] (a multiplier: weight ~ fp8 * scale_inv per block), quantization_config quant_method fp8
    with weight_block_size. Also writes dst + "-dequantized": the same weights dequantized to fp32 in
    the ordinary layout (what the block checkpoint stands for)."""
    import json
    import shutil
    from safetensors.torch import load_file, save_file

    bn, bk = block
    plain = dst + "-dequantized"
    for folder in (dst, plain):
        os.makedirs(folder, exist_ok=True)
        for name in os.listdir(src):
            if name != "model.safetensors":
                shutil.copy(os.path.join(src, name), folder)
    tensors, out, dequantized = load_file(os.path.join(src, "model.safetensors")), {}, {}
    for name, w in tensors.items():
        module = name.rsplit(".", 2)[-2] if name.endswith(".weight") else ""
        if module not in FP8_PROJECTIONS:
            out[name] = dequantized[name] = w
            continue
        n, k = w.shape
        blocks = w.float().reshape(-(-n // bn), bn, -(-k // bk), bk) if n % bn == 0 and k % bk == 0 else None
        assert blocks is not None, "the test's block size divides the tiny model's dims"
        scale = blocks.abs().amax(dim=(1, 3)) / 448.0                       # [N/bn, K/bk]
        fp8 = (blocks / scale[:, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
        out[name] = fp8.reshape(n, k)
        out[name + "_scale_inv"] = scale
        dequantized[name] = (fp8.float() * scale[:, None, :, None]).reshape(n, k)
    save_file(out, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    save_file(dequantized, os.path.join(plain, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(dst, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                     "weight_block_size": [bn, bk]}
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return dst, plain


def set_quantization_config(path, quantization_config):
    """Rewrite a checkpoint's config.json quantization_config (same tensors, another description)."""
    import json
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = quantization_config
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return path
