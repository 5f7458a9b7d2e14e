"""backend.quantization.TRITON_BF16_GEMV_MAX_M: with the switch set, the unquantized projections of the Llama
family (UnquantizedLinear) run the Triton weight-streaming kernel (kernels.fp8_gemm.weight_gemm_triton) for
flattened M <= the switch on the Triton path, torch's GEMM above it and with the switch at 0; both give the
same outputs within fp32 rounding (the tests set the switch; it ships at 16). On CPU under the Triton interpreter (tests/kernels), fp32 weights."""
import json
import os

import pytest
import torch

import backend.quantization as quantization
import kernels.fp8_gemm as fp8_gemm
from backend.model_runner import ModelRunner
from backend.models.llama import fuse_linears
from backend.quantization import UnquantizedLinear
from backend.sampling_params import SamplingParams
from backend.scheduler import SchedulerOutput
from backend.sequence import Sequence
from tests.helpers import engine_config, prompt_set
from tests.kernels.kernel_testing import DEVICE
from tests.kernels.test_fp8_gemm import assert_within_fp32_sum_error


@pytest.fixture
def launches(monkeypatch):
    """The (M, K, N) of each weight_gemm_triton launch."""
    shapes = []
    kernel = fp8_gemm.weight_gemm_triton

    def counted(x, weight, bias=None, **knobs):
        shapes.append((x.shape[0], x.shape[1], weight.shape[0]))
        return kernel(x, weight, bias, **knobs)

    monkeypatch.setattr(fp8_gemm, "weight_gemm_triton", counted)
    return shapes


@pytest.mark.parametrize("bias", [False, True])
def test_switch_routes_small_m_to_the_kernel(monkeypatch, launches, bias):
    g = torch.Generator().manual_seed(0)
    parts = [UnquantizedLinear(200, n, bias=bias) for n in (48, 24)]
    for p in parts:
        with torch.no_grad():
            p.weight.copy_(torch.randn(p.weight.shape, generator=g))
            if bias:
                p.bias.copy_(torch.randn(p.bias.shape, generator=g))
    layer = fuse_linears(*parts).to(DEVICE)   # the fused projections are UnquantizedLinear too
    assert isinstance(layer, UnquantizedLinear)
    x = torch.randn(2, 2, 200, generator=g).to(DEVICE)   # flattened M = 4
    monkeypatch.setattr(quantization, "TRITON_BF16_GEMV_MAX_M", 0)
    torch_path = layer(x)
    assert launches == []                                 # the switch at 0: torch's GEMM
    monkeypatch.setattr(quantization, "TRITON_BF16_GEMV_MAX_M", 4)
    y = layer(x)
    assert launches == [(4, 200, 72)] and y.shape == (2, 2, 72)
    assert_within_fp32_sum_error(y.reshape(4, 72), x.reshape(4, 200), layer.weight, None, layer.bias)
    torch.testing.assert_close(y, torch_path, rtol=1e-4, atol=1e-4)   # both fp32 sums, in other orders
    layer(torch.randn(5, 200, generator=g).to(DEVICE))   # M = 5 > the switch: torch's GEMM
    assert launches == [(4, 200, 72)]


def forward_logits(path, launches, steps=3, **config):
    """Logits of a prefill of 3 prompts, then decode steps of the three (M = 3) feeding fixed tokens; eager
    (on a GPU too: each launch is counted). config: more engine parameters."""
    runner = ModelRunner(engine_config(path, num_gpu_blocks_override=32, max_num_seqs=4, max_num_batched_tokens=64,
                                       dtype="float32", device=DEVICE.type, enforce_eager="true", **config))
    launches.clear()   # those of the runner's start (on CUDA its warm-up runs forwards)
    seqs = []
    for i, p in enumerate(prompt_set(3, seed=2)):
        s = Sequence(f"r{i}", list(p), len(p), SamplingParams())
        s.block_table = list(range(8 * i, 8 * i + 8))
        seqs.append(s)
    new, rows = [len(s.token_ids) for s in seqs], []
    with torch.inference_mode():
        for step in range(steps):
            rows.append(runner._forward(SchedulerOutput(seqs=seqs, num_new_tokens=new), None))
            for s, n in zip(seqs, new):
                s.num_computed_tokens += n
                s.token_ids.append(7 + step)
            new = [1] * len(seqs)
    return torch.cat(rows)


def test_model_with_the_switch_gives_torch_logits(monkeypatch, launches, tiny_checkpoints):
    """Qwen2 (q/k/v with bias): every projection of both layers and the LM head go through the kernel at
    prefill and decode sizes, and the logits match torch's GEMM's."""
    path = tiny_checkpoints["qwen2"]
    monkeypatch.setattr(quantization, "TRITON_BF16_GEMV_MAX_M", 0)
    torch_logits = forward_logits(path, launches)
    assert launches == []
    monkeypatch.setattr(quantization, "TRITON_BF16_GEMV_MAX_M", 64)
    kernel_logits = forward_logits(path, launches)
    prefill = sorted({m for m, _, _ in launches})
    assert prefill == [3, sum(len(p) for p in prompt_set(3, seed=2))]
    # steps x (layers x (qkv, o, gate_up, down) + the LM head, on the last token of each sequence: M = 3)
    assert len(launches) == 3 * (2 * 4 + 1)
    with open(os.path.join(path, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    assert sum(1 for m, _, n in launches if n == vocab) == 3 and all(m == 3 for m, _, n in launches if n == vocab)
    torch.testing.assert_close(kernel_logits, torch_logits, rtol=1e-4, atol=1e-4)
