"""quantization: fp8 (W8A8) and kv_cache_dtype: fp8 on CPU (torch._scaled_mm runs there; attention through
the torch references): the FP8 linear against its dequantized fp32 reference, FP8 checkpoints loading
like our own quantization, KV-cache scales, and the engine's next-token distributions against the
unquantized engine's (mean KL, with bounds that a missing scale breaks by orders of magnitude: removing
the weight scale, the activation scale, the cache's dequantization scale, or storing with a wrong scale
each gave a mean KL of 0.27 to 0.40 and top-1 agreement under 0.05, against bounds of 0.001 to 0.008)."""
import json
import os

import pytest
import torch
from torch import nn

from backend.loader import load_model
from backend.quantization import Fp8Linear
from tests.checkpoints import make_fp8_block_checkpoint, make_fp8_checkpoint, set_quantization_config
from tests.helpers import engine_config, greedy, make_engine, prompt_set

FP8 = torch.float8_e4m3fn
K_SCALE, V_SCALE = 0.02, 0.01   # the tiny model's k/v reach ~5: these use most of e4m3's range (448)


def dequantized_reference(x, layer: Fp8Linear):
    """fp32 math on exactly the values the FP8 GEMM multiplies: x quantized per token (independently
    written: amax / 448), weight times its per-channel scale."""
    x_scale = x.float().abs().amax(dim=-1, keepdim=True) / 448.0
    x_fp8 = (x.float() / x_scale).clamp(-448, 448).to(FP8)
    w = layer.weight.float() * layer.weight_scale[:, None]
    y = (x_fp8.float() * x_scale) @ w.t()
    return y + layer.bias.float() if layer.bias is not None else y


def abs_layer(layer: Fp8Linear) -> Fp8Linear:
    copy = Fp8Linear(layer.in_features, layer.out_features, layer.bias is not None, layer.out_dtype)
    copy.weight.data, copy.weight_scale.data = layer.weight.abs(), layer.weight_scale
    if layer.bias is not None:
        copy.bias.data = layer.bias.abs()
    return copy


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("m", [1, 5, 64])
def test_fp8_linear_equals_dequantized_fp32_reference(bias, m):
    g = torch.Generator().manual_seed(m)
    linear = nn.Linear(96, 48, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(48, 96, generator=g) * torch.rand(48, 1, generator=g))  # channels differ
        if bias:
            linear.bias.copy_(torch.randn(48, generator=g))
    layer = Fp8Linear.from_linear(linear)
    # per-channel weight scales: each output row's largest |value| maps to 448, bits as torch casts them
    scale = linear.weight.abs().amax(dim=1) / 448.0
    assert torch.equal(layer.weight_scale, scale)
    assert torch.equal(layer.weight.view(torch.uint8),
                       (linear.weight / scale[:, None]).clamp(-448, 448).to(FP8).view(torch.uint8))
    x = torch.randn(m, 96, generator=g) * torch.logspace(-2, 2, m)[:, None]   # tokens of very different size
    y = layer(x)
    assert y.dtype == torch.float32 and y.shape == (m, 48)
    # exact up to fp32 accumulation order: the error bound of a K-term fp32 sum is ~K * 2^-24 * sum |a_i b_i|
    ref, magnitude = dequantized_reference(x, layer), dequantized_reference(x.abs(), abs_layer(layer))
    assert ((y - ref).abs() <= 1e-5 * magnitude + 1e-6).all(), (y - ref).abs().max()
    # and near the unquantized layer: e4m3 keeps ~2^-4 relative per element; sums of 96 terms average it out
    exact = linear(x).detach()
    rel = (y - exact).norm(dim=-1) / exact.norm(dim=-1)
    assert rel.max() < 0.06, rel


@pytest.mark.parametrize("m", [5, 64])
def test_torch_path_weight_only_switch(monkeypatch, m):
    """TORCH_PATH_WEIGHT_ONLY (bench/fp8_quality.py --weight-only): off the Triton path every row count gets
    the W8A16 kernel's math (kernels.fp8_gemm.fp8_weight_gemm_ref: x as it is), exactly; off, the per-token
    W8A8 math, which rounds x too and so differs."""
    import backend.quantization as quantization
    from kernels.fp8_gemm import fp8_weight_gemm_ref
    g = torch.Generator().manual_seed(3)
    layer = Fp8Linear.from_linear(nn.Linear(96, 48, bias=True))
    x = torch.randn(m, 96, generator=g)
    w8a8 = layer(x)
    monkeypatch.setattr(quantization, "TORCH_PATH_WEIGHT_ONLY", True)
    weight_only = layer(x)
    assert torch.equal(weight_only, fp8_weight_gemm_ref(x, layer.weight, layer.weight_scale, layer.bias))
    assert not torch.equal(weight_only, w8a8)


def test_per_token_scales_make_rows_independent_of_the_batch():
    """A token's output does not depend on its batch: a huge row (or a zero padding row) beside it
    changes nothing, as per-token scales promise (a per-tensor scale would crush the small row)."""
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(64, 32, bias=False)
    layer = Fp8Linear.from_linear(linear)
    x = torch.randn(1, 64, generator=g)
    alone = layer(x)
    batch = torch.cat([x, 1e4 * torch.randn(1, 64, generator=g), torch.zeros(1, 64)])
    out = layer(batch)
    assert torch.equal(out[:1], alone) and torch.equal(out[2], torch.zeros(32))


def test_fused_projections_keep_per_channel_scales(tiny_checkpoints):
    """quantization fp8 on a fp32 checkpoint: q/k/v and gate/up fused then quantized; each channel's
    scale is that of its own row (what quantizing q, k, v separately gives)."""
    config = engine_config(tiny_checkpoints["qwen2"], quantization="fp8").resolve()
    model = load_model(config)
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.qkv_proj, Fp8Linear) and isinstance(model.model.layers[1].mlp.down_proj, Fp8Linear)
    assert isinstance(model.lm_head, nn.Linear) and attn.qkv_proj.bias.dtype == torch.float32   # qwen2 qkv bias
    from safetensors.torch import load_file
    w = load_file(os.path.join(tiny_checkpoints["qwen2"], "model.safetensors"))
    k = w["model.layers.0.self_attn.k_proj.weight"]
    q_rows = w["model.layers.0.self_attn.q_proj.weight"].shape[0]
    k_scale = attn.qkv_proj.weight_scale[q_rows:q_rows + k.shape[0]]
    assert torch.equal(k_scale, k.abs().amax(dim=1) / 448.0)


@pytest.fixture(scope="module")
def fp8_checkpoints(tiny_checkpoints, tmp_path_factory):
    base = tmp_path_factory.mktemp("fp8")
    src = tiny_checkpoints["llama"]
    return dict(
        src=src,
        per_channel=make_fp8_checkpoint(src, str(base / "per_channel"), kv_scales=(K_SCALE, V_SCALE)),
        per_tensor=make_fp8_checkpoint(src, str(base / "per_tensor"), per_tensor=True),
        kv_scales_only=make_fp8_checkpoint(src, str(base / "kv"), kv_scales=(K_SCALE, V_SCALE),
                                           quantize_weights=False))


def fp8_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, Fp8Linear)}


def test_fp8_checkpoint_loads_as_quantization_fp8(fp8_checkpoints):
    """The HF FP8 layout (per-channel scales [N, 1], input_scale) loads into the same FP8 weights and
    scales, bit for bit, as our quantization of the fp32 checkpoint: the same logits (exactly), the same tokens.
    The checkpoint's quantization_config turns fp8 on by itself, as in vLLM."""
    loaded_config = engine_config(fp8_checkpoints["per_channel"]).resolve()
    assert loaded_config.quantization == "fp8"
    loaded = fp8_layers(load_model(loaded_config))
    ours = fp8_layers(load_model(engine_config(fp8_checkpoints["src"], quantization="fp8").resolve()))
    assert loaded.keys() == ours.keys() and len(loaded) == 2 * 4     # qkv, o, gate_up, down per layer
    for name in loaded:
        assert torch.equal(loaded[name].weight.view(torch.uint8), ours[name].weight.view(torch.uint8)), name
        assert torch.equal(loaded[name].weight_scale, ours[name].weight_scale), name
    assert torch.equal(teacher_forced_logprobs(fp8_checkpoints["per_channel"]),
                       teacher_forced_logprobs(fp8_checkpoints["src"], quantization="fp8"))
    prompts = prompt_set(4)
    a = make_engine(fp8_checkpoints["per_channel"]).generate(prompts, greedy(8))
    b = make_engine(fp8_checkpoints["src"], quantization="fp8").generate(prompts, greedy(8))
    assert [o.token_ids for o in a] == [o.token_ids for o in b]


def test_per_tensor_scales_expand_to_channels_exactly(fp8_checkpoints):
    """q, k and v with three different per-tensor scales fuse into one projection whose per-channel scales
    give back each part's dequantized weight exactly."""
    from safetensors.torch import load_file
    ckpt = load_file(os.path.join(fp8_checkpoints["per_tensor"], "model.safetensors"))
    model = load_model(engine_config(fp8_checkpoints["per_tensor"]).resolve())
    fused = model.model.layers[1].self_attn.qkv_proj
    prefix = "model.layers.1.self_attn"
    parts = [ckpt[f"{prefix}.{p}_proj.weight"].float() * ckpt[f"{prefix}.{p}_proj.weight_scale"] for p in "qkv"]
    assert len({float(ckpt[f"model.layers.1.self_attn.{p}_proj.weight_scale"]) for p in "qkv"}) == 3
    assert torch.equal(fused.weight.float() * fused.weight_scale[:, None], torch.cat(parts))


def test_kv_scales_load_only_for_an_fp8_cache(fp8_checkpoints):
    path = fp8_checkpoints["kv_scales_only"]
    attn = load_model(engine_config(path, kv_cache_dtype="fp8").resolve()).model.layers[1].self_attn
    assert torch.equal(torch.cat([attn.k_scale, attn.v_scale]), torch.tensor([K_SCALE, V_SCALE]))   # fp32
    attn = load_model(engine_config(path).resolve()).model.layers[1].self_attn
    assert (attn.k_scale.item(), attn.v_scale.item()) == (1.0, 1.0)


def test_fp8_cache_has_the_blocks_of_its_bytes(fp8_checkpoints):
    """Same cpu_kvcache_space_gb: an FP8 cache holds 4x the blocks of fp32 (2x of bf16): 1 byte an element."""
    from backend.model_runner import ModelRunner
    path = fp8_checkpoints["src"]
    runners = {kv: ModelRunner(engine_config(path, kv_cache_dtype=kv, cpu_kvcache_space_gb=2 ** -10, dtype=dtype))
               for kv, dtype in (("auto", "float32"), ("fp8", "float32"))}
    bf16 = ModelRunner(engine_config(path, cpu_kvcache_space_gb=2 ** -10, dtype="bfloat16"))
    assert runners["fp8"].kv_cache.dtype == FP8
    assert runners["fp8"].kv_block_bytes() * 4 == runners["auto"].kv_block_bytes()
    assert runners["fp8"].num_blocks == 4 * runners["auto"].num_blocks == 2 * bf16.num_blocks
    runners["fp8"].copy_blocks([(1, 3)])     # copy-on-write works on FP8 pools


# ---------------- the engine: next-token distributions against the unquantized engine ----------------


def teacher_forced_logprobs(path, num_decodes=6, **params):
    """Log-probabilities of the next token at each step: a prefill of 8 prompts, then num_decodes decode
    steps that feed fixed tokens (the same for every configuration), so positions line up; [steps * 8, V]."""
    from backend.model_runner import ModelRunner
    from backend.sampling_params import SamplingParams
    from backend.scheduler import SchedulerOutput
    from backend.sequence import Sequence
    runner = ModelRunner(engine_config(path, num_gpu_blocks_override=64, max_num_seqs=8, max_num_batched_tokens=512,
                                       **params))
    prompts = prompt_set(8, seed=1)
    seqs = []
    for i, p in enumerate(prompts):
        s = Sequence(f"r{i}", list(p), len(p), SamplingParams())
        s.block_table = list(range(8 * i, 8 * i + 8))
        seqs.append(s)
    rows, new = [], [len(p) for p in prompts]
    g = torch.Generator().manual_seed(2)
    with torch.inference_mode():
        for _ in range(num_decodes + 1):
            rows.append(runner._forward(SchedulerOutput(seqs=seqs, num_new_tokens=new), None).log_softmax(-1))
            for s, n in zip(seqs, new):
                s.num_computed_tokens += n
                s.token_ids.append(int(torch.randint(2, 300, (1,), generator=g)))
            new = [1] * len(seqs)
    return torch.cat(rows)


def mean_kl(ref, other):
    return (ref.exp() * (ref - other)).sum(-1).mean().item()


# Measured on this tiny model (fp32 engine, CPU, 56 positions): fp8 weights 1.4e-3 (top-1 agreement 0.89),
# fp8 KV cache 1.9e-4 (0.93), both 1.7e-3 (0.88). The bounds sit ~5x above; a dropped scale gives far more
# (measured by removing each in turn: see the module's docstring).
KL_BOUNDS = {"quantization": 0.007, "kv_cache_dtype": 0.001, "both": 0.008}


@pytest.fixture(scope="module")
def unquantized_logprobs(fp8_checkpoints):
    return teacher_forced_logprobs(fp8_checkpoints["kv_scales_only"])


@pytest.mark.parametrize("which", ["quantization", "kv_cache_dtype", "both"])
def test_engine_next_token_kl_against_unquantized(fp8_checkpoints, unquantized_logprobs, which):
    """Same checkpoint (fp32 weights and k/v scales 0.02/0.01), fp8 weights and/or an fp8 KV cache."""
    params = {"quantization": dict(quantization="fp8"), "kv_cache_dtype": dict(kv_cache_dtype="fp8"),
              "both": dict(quantization="fp8", kv_cache_dtype="fp8")}[which]
    ours = teacher_forced_logprobs(fp8_checkpoints["kv_scales_only"], **params)
    kl = mean_kl(unquantized_logprobs, ours)
    agree = (ours.argmax(-1) == unquantized_logprobs.argmax(-1)).float().mean().item()
    print(f"{which}: mean KL {kl:.2e}, top-1 agreement {agree:.2f}")
    assert 0 < kl < KL_BOUNDS[which]
    assert agree >= 0.75


def test_engine_generates_with_both(fp8_checkpoints):
    """Through the engine's scheduler (chunked prefill, prefix caching, copy-on-write): runs and agrees with
    the unquantized engine on the first greedy tokens of most prompts."""
    path = fp8_checkpoints["kv_scales_only"]
    prompts = prompt_set(8)
    ours = make_engine(path, quantization="fp8", kv_cache_dtype="fp8", max_num_batched_tokens=32,
                       max_num_seqs=4).generate(prompts, greedy(4))
    ref = make_engine(path).generate(prompts, greedy(4))
    first = sum(a.token_ids[0] == b.token_ids[0] for a, b in zip(ours, ref))
    assert first >= 6, [(a.token_ids, b.token_ids) for a, b in zip(ours, ref)]


def test_config_json_other_quant_methods_are_refused(tmp_path, tiny_checkpoints):
    import shutil
    path = str(tmp_path / "awq")
    shutil.copytree(tiny_checkpoints["llama"], path)
    for qc, message in [({"quant_method": "awq"}, "quant_method 'awq'.*supported: fp8"),
                        ({"quant_method": "fp8", "weight_block_size": [128]}, "weight_block_size"),
                        ({"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": {
                            "type": "int", "num_bits": 8, "strategy": "channel"}}}}, "not FP8 per tensor"),
                        ({"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": {
                            "type": "float", "num_bits": 8, "strategy": "block"}}}}, "not FP8 per tensor"),
                        ({"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": {
                            "type": "float", "num_bits": 8, "strategy": "channel"}}},
                          "ignore": ["lm_head", "model.layers.0.mlp.down_proj"]}, "unquantized")]:
        set_quantization_config(path, qc)
        with pytest.raises(ValueError, match=message):
            engine_config(path).resolve()


def test_block_scaled_fp8_checkpoint_loads_as_its_dequantized_weights(tmp_path, tiny_checkpoints):
    """A DeepSeek-V3-style checkpoint (weight_scale_inv per 16x16 block here) is dequantized at load and
    quantized per channel: the same FP8 weights, scales and logits as quantization fp8 on the
    dequantized fp32 weights (a checkpoint written independently of the engine's code)."""
    blocks, plain = make_fp8_block_checkpoint(tiny_checkpoints["llama"], str(tmp_path / "block"))
    config = engine_config(blocks).resolve()
    assert config.quantization == "fp8"
    loaded, ours = fp8_layers(load_model(config)), fp8_layers(load_model(engine_config(plain, quantization="fp8")
                                                                         .resolve()))
    assert loaded.keys() == ours.keys() and len(loaded) == 2 * 4
    for name in loaded:
        assert torch.equal(loaded[name].weight.view(torch.uint8), ours[name].weight.view(torch.uint8)), name
        assert torch.equal(loaded[name].weight_scale, ours[name].weight_scale), name
    assert torch.equal(teacher_forced_logprobs(blocks), teacher_forced_logprobs(plain, quantization="fp8"))
    # and the dequantization is the checkpoint's: close to the original weights, not to something else
    kl = mean_kl(teacher_forced_logprobs(tiny_checkpoints["llama"]), teacher_forced_logprobs(blocks))
    assert 0 < kl < KL_BOUNDS["quantization"]


@pytest.mark.parametrize("qc", [
    {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
     "config_groups": {"group_0": {"targets": ["Linear"], "weights": {"type": "float", "num_bits": 8,
                                                                      "strategy": "channel", "dynamic": False},
                                   "input_activations": {"type": "float", "num_bits": 8, "strategy": "token",
                                                         "dynamic": True}}}},
    {"quant_method": "fbgemm_fp8", "modules_to_not_convert": ["lm_head"], "activation_scale_ub": 1200.0}])
def test_compressed_tensors_and_fbgemm_fp8_checkpoints_load_like_fp8(tmp_path, fp8_checkpoints, qc):
    """The same per-channel tensors (weight, weight_scale [N, 1], input_scale) described as compressed-tensors
    (RedHat/Neural Magic FP8 checkpoints) or fbgemm_fp8 (Meta's) load exactly as quant_method fp8."""
    import shutil
    path = str(tmp_path / qc["quant_method"])
    shutil.copytree(fp8_checkpoints["per_channel"], path)
    set_quantization_config(path, qc)
    assert engine_config(path).resolve().quantization == "fp8"
    assert torch.equal(teacher_forced_logprobs(path), teacher_forced_logprobs(fp8_checkpoints["per_channel"]))


@pytest.mark.parametrize("layout", ["per_channel", "per_tensor"])
def test_tensor_parallel_ranks_load_their_shard_of_the_scales(fp8_checkpoints, layout, monkeypatch):
    """Under 2 ranks each loads its shard of an FP8 checkpoint: the column-parallel projections (qkv,
    gate_up) their rows' weights and scales, the row-parallel ones (o, down) their columns with every
    row's scale. (Rank state faked: load_model asks backend.parallel for the rank.)"""
    from backend import parallel
    path = fp8_checkpoints[layout]
    whole = fp8_layers(load_model(engine_config(path).resolve()))
    monkeypatch.setattr(parallel, "tp_size", lambda: 2)
    for rank in (0, 1):
        monkeypatch.setattr(parallel, "tp_rank", lambda: rank)
        shard = fp8_layers(load_model(engine_config(path).resolve()))
        for name, layer in shard.items():
            w, s = whole[name].weight.view(torch.uint8), whole[name].weight_scale
            if name.endswith(("qkv_proj", "gate_up_proj")):   # fused: each part's rows split, then concatenated
                parts = [2, 1, 1] if name.endswith("qkv_proj") else [1, 1]
                rows = [t.chunk(2)[rank] for t in torch.split(torch.arange(w.shape[0]), [w.shape[0] * p // sum(parts)
                                                                                           for p in parts])]
                rows = torch.cat(rows)
                assert torch.equal(layer.weight.view(torch.uint8), w[rows]) and torch.equal(layer.weight_scale, s[rows])
            else:
                assert torch.equal(layer.weight.view(torch.uint8), w.chunk(2, dim=1)[rank])
                assert torch.equal(layer.weight_scale, s)


def test_fp8_quality_bench_runs_on_the_default_model():
    """bench/fp8_quality.py (issue 14's quality check), short: every configuration gives an agreement
    in [0, 1], a positive KL (FP8 changes something) and a teacher-forced top-1 above chance."""
    from bench import fp8_quality
    rows = fp8_quality.main(["--prompts", "4", "--tokens", "4", "--yardstick", "bfloat16"])
    assert [r["config"] for r in rows] == [*fp8_quality.CONFIGS, "bfloat16 (yardstick)"]
    for r in rows:
        assert 0 <= r["greedy_agreement"] <= 1 and r["mean_kl"] > 0 and r["teacher_forced_top1"] > 0.5, r


def test_fp8_bound_counts_projections_at_one_byte():
    """bench/bound.py: bf16 reads 2 bytes a parameter (unchanged); FP8 weights read the decoder
    projections at 1 byte and the rest (embedding, LM head) at 2; an FP8 cache halves KV bytes."""
    from bench.bound import bound_seconds, weight_bytes
    from bench.shapes import SHAPES, params_of
    c = SHAPES["llama3-8b"]
    embed = c["vocab_size"] * c["hidden_size"] * 2          # parameters of the embedding and the (untied) LM head
    assert weight_bytes("llama3-8b") == 2 * params_of("llama3-8b")
    assert weight_bytes("llama3-8b", fp8_weights=True) == params_of("llama3-8b") - embed + 2 * embed
    decode_only = dict(num_seqs=256, input_len=512, output_len=256, copy_bw=3e12, flops=float("inf"))
    bf16, kv8 = bound_seconds("llama3-8b", **decode_only), bound_seconds("llama3-8b", fp8_kv=True, **decode_only)
    both = bound_seconds("llama3-8b", fp8_weights=True, fp8_kv=True, **decode_only)
    # half of everything, but the embedding and LM head (embed parameters) still read at 2 bytes
    assert both == pytest.approx(bf16 / 2 + 256 * embed / 3e12) and bf16 > kv8 > both
