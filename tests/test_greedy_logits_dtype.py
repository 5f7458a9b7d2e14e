"""A step of greedy rows alone takes the argmax of the model's own logits (bf16), without an fp32 copy:
the same tokens as through fp32, ties included (both argmaxes pick the first maximum). Any step that
reads the logits' values (sampling, log-probs, processors, beams) still gets them in fp32."""
import pytest
import torch

from backend.sampler import Sampler, SamplingBatch
from backend.sampling_params import SamplingParams
from backend.sequence import Sequence
from tests.helpers import greedy, make_engine, prompt_set

VOCAB = 300


def batch_of(params_per_row: list[SamplingParams]) -> SamplingBatch:
    batch = SamplingBatch()
    for row, params in enumerate(params_per_row):
        batch.add(Sequence(f"r{row}", [1, 2, 3], 3, params), row, set())
    return batch


def record_sampled_dtypes(monkeypatch, sampler_class=Sampler) -> list:
    """The dtype of the logits that each Sampler.sample call gets."""
    seen, sample = [], sampler_class.sample

    def recorded(self, logits, seqs, masked_ids):
        seen.append(logits.dtype)
        return sample(self, logits, seqs, masked_ids)
    monkeypatch.setattr(sampler_class, "sample", recorded)
    return seen


def logits_with_ties(rows: int, seed: int = 0) -> torch.Tensor:
    """bf16 logits whose every row has its maximum at two or more ids (ties)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, VOCAB, generator=g).bfloat16()
    for r in range(rows):
        ids = torch.randperm(VOCAB, generator=g)[:2 + r % 3]
        logits[r, ids] = logits[r].max() + 1
    return logits


def test_greedy_rows_take_the_first_maximum_in_bf16(monkeypatch):
    seen = record_sampled_dtypes(monkeypatch)
    logits = logits_with_ties(16)
    tokens = Sampler(torch.device("cpu")).sample_step(logits.clone(), batch_of([greedy()] * 16)).host_token_ids()
    assert seen == [torch.bfloat16]
    first_maxima = [int((row == row.max()).nonzero()[0]) for row in logits.float()]
    assert tokens == first_maxima == logits.float().argmax(-1).tolist()


def test_min_tokens_masks_apply_in_bf16():
    logits = logits_with_ties(2)
    batch = SamplingBatch()
    top = logits[0].float().argmax().item()
    batch.add(Sequence("masked", [1], 1, greedy()), 0, {top})
    batch.add(Sequence("free", [1], 1, greedy()), 1, set())
    tokens = Sampler(torch.device("cpu")).sample_step(logits.clone(), batch).host_token_ids()
    masked = logits.float()
    masked[0, top] = float("-inf")
    assert tokens == masked.argmax(-1).tolist()


@pytest.mark.parametrize("other", [
    SamplingParams(temperature=0.8, seed=1),                         # a sampled row among greedy ones
    SamplingParams(temperature=0.0, logprobs=2),                     # log-probs
    SamplingParams(temperature=0.0, cumulative_logprob=True),        # the running log-prob only
    SamplingParams(temperature=0.0, logit_bias={5: 3.0}),          # a logits processor
    SamplingParams(temperature=0.0, repetition_penalty=1.2),
], ids=["sampled", "logprobs", "cumulative", "logit_bias", "penalty"])
def test_a_step_that_reads_the_values_goes_fp32(monkeypatch, other):
    seen = record_sampled_dtypes(monkeypatch)
    Sampler(torch.device("cpu")).sample_step(logits_with_ties(4), batch_of([greedy()] * 3 + [other]))
    assert seen == [torch.float32]


def test_beams_go_fp32():
    batch = SamplingBatch()
    batch.beam_seqs.append(Sequence("beam", [1], 1, SamplingParams(use_beam_search=True, n=2, temperature=0.0)))
    batch.beam_rows.append(0)
    result = Sampler(torch.device("cpu")).sample_step(logits_with_ties(1), batch)
    assert result.beam_logprobs.dtype == torch.float32


def run_greedy(engine, prompts, max_tokens=12) -> list[list[int]]:
    for i, p in enumerate(prompts):
        engine.add_request(f"g{i}", "", greedy(max_tokens), prompt_token_ids=p)
    final = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                final[o.request_id] = o.token_ids
    return [final[f"g{i}"] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def bf16_engine_with_tied_logits(tiny_checkpoints):
    """A bf16 engine whose lm_head repeats its first half: every logit appears twice, so every
    argmax is a tie (between an id and the same id + half)."""
    engine = make_engine(tiny_checkpoints["llama"], dtype="bfloat16")
    weight = engine.core.runner.model.lm_head.weight
    half = weight.shape[0] // 2
    with torch.no_grad():
        weight[half:2 * half] = weight[:half]
    yield engine, half
    engine.shutdown()


def test_bf16_engine_greedy_tokens_with_and_without_the_fp32_copy(bf16_engine_with_tied_logits, monkeypatch):
    engine, half = bf16_engine_with_tied_logits
    prompts = prompt_set(6, seed=5)
    seen = record_sampled_dtypes(monkeypatch, type(engine.core.runner.sampler))
    fast = run_greedy(engine, prompts)
    assert set(seen) == {torch.bfloat16}
    monkeypatch.setattr(SamplingParams, "needs_fp32_logits", property(lambda self: True))
    seen.clear()
    through_fp32 = run_greedy(engine, prompts)
    assert set(seen) == {torch.float32}
    assert fast == through_fp32
    assert all(t < half for tokens in fast for t in tokens)   # the first of the two maxima, every time
