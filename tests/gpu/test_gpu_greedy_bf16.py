"""On a CUDA machine: greedy steps take the argmax of the bf16 logits (no fp32 copy) and draw exactly
the tokens of the fp32 way, ties included, with CUDA graphs and async scheduling. Skipped without a GPU."""
import pytest
import torch

from backend.sampler import Sampler
from backend.sampling_params import SamplingParams
from tests.conftest import DEFAULT_MODEL
from tests.gpu.test_gpu_engine import gpu, ids
from tests.helpers import greedy, prompt_set
from tests.test_greedy_logits_dtype import batch_of, record_sampled_dtypes

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def test_cuda_bf16_argmax_takes_the_first_of_tied_maxima():
    """A Qwen3-wide vocabulary: ties far apart land in different blocks of the CUDA reduction."""
    rows, vocab = 256, 151_936
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, vocab, generator=g).bfloat16()
    for r in range(rows):
        tied = torch.randperm(vocab, generator=g)[:2 + r % 4]
        logits[r, tied] = logits[r].max() + 1
    first_maxima = [int((row == row.max()).nonzero()[0]) for row in logits.float()]
    sampler = Sampler(torch.device("cuda"))
    tokens = sampler.sample_step(logits.cuda(), batch_of([greedy()] * rows)).host_token_ids()
    assert tokens == first_maxima


@pytest.mark.parametrize("path", ["default", "tied"])
def test_bf16_engine_greedy_tokens_equal_the_fp32_way(tiny_checkpoints, monkeypatch, path):
    """CUDA graphs on; "tied": an untied lm_head whose second half repeats its first (every argmax a tie)."""
    engine = gpu(DEFAULT_MODEL if path == "default" else tiny_checkpoints["llama"], dtype="bfloat16", max_num_seqs=64)
    assert engine.core.runner.graphs is not None
    if path == "tied":
        weight = engine.core.runner.model.lm_head.weight
        with torch.no_grad():
            weight[weight.shape[0] // 2:2 * (weight.shape[0] // 2)] = weight[:weight.shape[0] // 2]
    prompts = prompt_set(24, seed=6)
    seen = record_sampled_dtypes(monkeypatch)
    fast = ids(engine.generate(prompts, greedy(32)))
    assert set(seen) == {torch.bfloat16}
    monkeypatch.setattr(SamplingParams, "needs_fp32_logits", property(lambda self: True))
    seen.clear()
    assert ids(engine.generate(prompts, greedy(32))) == fast
    assert set(seen) == {torch.float32}
    engine.shutdown()
