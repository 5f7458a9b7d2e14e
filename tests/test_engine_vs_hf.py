"""The engine's greedy tokens equal HF transformers' in fp32, however requests are batched."""
import os

import pytest

from tests.conftest import DEFAULT_MODEL
from tests.helpers import greedy, hf_greedy, make_engine, prompt_set, run_staggered

ARCHS = ["llama", "qwen2", "qwen3"]
MAX_NEW = 12


def check_vs_hf(path, prompts, outputs):
    for p, o in zip(prompts, outputs):
        assert o.token_ids == hf_greedy(path, p, MAX_NEW), f"prompt of {len(p)} tokens"


@pytest.mark.parametrize("arch", ARCHS)
def test_together(tiny_checkpoints, arch):
    path = tiny_checkpoints[arch]
    engine = make_engine(path)
    prompts = prompt_set()
    outputs = engine.generate(prompts, greedy(MAX_NEW))
    check_vs_hf(path, prompts, outputs)
    assert engine.core.block_manager.num_free_blocks == engine.core.block_manager.num_blocks


@pytest.mark.parametrize("arch", ARCHS)
def test_staggered(tiny_checkpoints, arch):
    path = tiny_checkpoints[arch]
    engine = make_engine(path)
    prompts = prompt_set(seed=1)
    check_vs_hf(path, prompts, run_staggered(engine, prompts, greedy(MAX_NEW), every=3))


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_chunked_prefill_budget_8(tiny_checkpoints, arch):
    path = tiny_checkpoints[arch]
    engine = make_engine(path, max_num_batched_tokens=8, max_num_seqs=8)
    prompts = prompt_set(seed=2)
    check_vs_hf(path, prompts, engine.generate(prompts, greedy(MAX_NEW)))


def test_small_pool_preempts_and_completes(tiny_checkpoints):
    """A pool far too small for all requests at once: they wait or get preempted, never fail."""
    path = tiny_checkpoints["llama"]
    engine = make_engine(path, num_gpu_blocks_override=8, block_size=16)
    prompts = prompt_set(seed=3)
    outputs = engine.generate(prompts, greedy(MAX_NEW))
    check_vs_hf(path, prompts, outputs)
    assert engine.core.scheduler.num_preemptions > 0
    bm = engine.core.block_manager
    assert bm.num_free_blocks == bm.num_blocks and all(c == 0 for c in bm.ref_counts)


@pytest.mark.skipif(not os.path.isdir(DEFAULT_MODEL), reason="default checkpoint not trained yet")
def test_default_model(tmp_path):
    engine = make_engine(DEFAULT_MODEL)
    prompts = [engine.tokenizer.encode(t) for t in [
        "To be or not to be, that is", "ROMEO:", "First Citizen:\nBefore we proceed any further, hear me speak.",
        "O", "KING HENRY", "My lord, ", "What light through yonder window", "\n\nJULIET:\n"]]
    check_vs_hf(DEFAULT_MODEL, prompts, engine.generate(prompts, greedy(MAX_NEW)))
