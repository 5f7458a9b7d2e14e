"""Log-probabilities as vLLM reports them, against HF transformers: the sampled token's log-prob and
rank among the whole vocabulary and the k most likely tokens, from the raw distribution (before
temperature and top-k/top-p); cumulative_logprob for every sequence; nothing computed when not asked."""
import math

import pytest
import torch

from backend.logprobs import compute, unpack
from backend.sampling_params import SamplingParams
from tests.helpers import hf_model, make_engine, prompt_set


def hf_logprobs(path, prompt, output):
    """[len(output), vocab] log-softmax of HF's logits at each output position (teacher forcing)."""
    ids = torch.tensor([prompt + output])
    with torch.no_grad():
        logits = hf_model(path)(ids, attention_mask=torch.ones_like(ids)).logits[0].float()
    return torch.log_softmax(logits[len(prompt) - 1:len(prompt) + len(output) - 1], dim=-1)


def check_against_hf(path, out, prompt, k, tokenizer_decode):
    sample = out.samples[0]
    ref = hf_logprobs(path, prompt, sample.token_ids)
    assert len(sample.logprobs) == len(sample.token_ids)
    total = 0.0
    for pos, (token, entry) in enumerate(zip(sample.token_ids, sample.logprobs)):
        row = ref[pos]
        assert entry[token]["logprob"] == pytest.approx(row[token].item(), abs=1e-4)
        assert entry[token]["rank"] == int((row > row[token]).sum()) + 1
        assert entry[token]["decoded_token"] == tokenizer_decode(token)
        top = row.topk(k).indices.tolist()
        assert set(top) <= set(entry) and len(entry) in (k, k + 1)
        for rank, t in enumerate(top, start=1):
            if t != token:
                assert entry[t]["rank"] == rank and entry[t]["logprob"] == pytest.approx(row[t].item(), abs=1e-4)
        total += row[token].item()
    assert sample.cumulative_logprob == pytest.approx(total, abs=1e-3)


def decoder(engine):
    return lambda t: engine.tokenizer.decode([t], skip_special_tokens=False)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_logprobs_match_hf_raw_distribution(tiny_checkpoints, temperature):
    """Greedy and sampled (seeded, top_p): the log-probs are the model's, before temperature/top-p."""
    path = tiny_checkpoints["llama"]
    engine = make_engine(path)
    prompts = prompt_set(4, seed=11)
    params = SamplingParams(temperature=temperature, top_p=0.9, seed=3, max_tokens=8, ignore_eos=True, logprobs=3)
    for prompt, out in zip(prompts, engine.generate(prompts, params)):
        check_against_hf(path, out, prompt, 3, decoder(engine))
        if temperature == 0:
            assert all(entry[t]["rank"] == 1 for t, entry in zip(out.samples[0].token_ids, out.samples[0].logprobs))


def test_cumulative_logprob_for_every_sample_and_nothing_when_not_asked(tiny_checkpoints):
    path = tiny_checkpoints["qwen3"]
    engine = make_engine(path)
    prompt = prompt_set(1, seed=12)[0]
    asked = SamplingParams(temperature=1.0, n=3, seed=5, max_tokens=6, ignore_eos=True, logprobs=0)
    out = engine.generate([prompt], asked)[0]
    assert len(out.samples) == 3
    for sample in out.samples:
        ref = hf_logprobs(path, prompt, sample.token_ids)
        expected = sum(ref[i, t].item() for i, t in enumerate(sample.token_ids))
        assert sample.cumulative_logprob == pytest.approx(expected, abs=1e-3)
        assert all(len(m) == 1 for m in sample.logprobs)   # logprobs 0: the sampled token only
    only_sum = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, cumulative_logprob=True)
    out = engine.generate([prompt], only_sum)[0]
    assert out.samples[0].logprobs is None and math.isfinite(out.samples[0].cumulative_logprob)
    plain = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))[0]
    assert plain.samples[0].logprobs is None and plain.samples[0].cumulative_logprob is None
    assert plain.samples[0].token_ids == out.samples[0].token_ids


def test_logprobs_same_with_async_scheduling(tiny_checkpoints):
    path = tiny_checkpoints["llama"]
    prompts = prompt_set(6, seed=13)
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=2)
    runs = [[(o.samples[0].token_ids, o.samples[0].logprobs, o.samples[0].cumulative_logprob)
             for o in make_engine(path, async_scheduling=mode).generate(prompts, params)] for mode in ("false", "true")]
    assert runs[0] == runs[1]


def test_packed_rows_round_trip():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    tokens = torch.tensor([4, 0, 49])
    packed = compute(logits, tokens, 5)
    lp = torch.log_softmax(logits, -1)
    for i, row in enumerate(packed.tolist()):
        entry = unpack(row, tokens[i].item(), 5, 2)
        assert entry.logprob == pytest.approx(lp[i, tokens[i]].item(), abs=1e-6)
        assert entry.rank == int((lp[i] > lp[i, tokens[i]]).sum()) + 1
        assert [t for t, _ in entry.top] == lp[i].topk(2).indices.tolist()


def test_logprobs_parameter_checked():
    with pytest.raises(ValueError, match="'logprobs' must be in"):
        SamplingParams.from_dict({"logprobs": 21})
    with pytest.raises(ValueError, match="'logprobs' is not supported with use_beam_search"):
        SamplingParams.from_dict({"logprobs": 1, "use_beam_search": True, "n": 2, "temperature": 0})
    assert SamplingParams.from_dict({"logprobs": "2"}).logprobs == 2


@pytest.mark.parametrize("budget", [2048, 16])   # whole prompts, and prompts chunked across steps
def test_prompt_logprobs_match_hf(tiny_checkpoints, budget):
    """Each prompt token's log-prob given the tokens before it (None for the first), its rank and
    the k most likely, as HF computes them; the same with a cached prefix around (no cache hit)."""
    path = tiny_checkpoints["llama"]
    engine = make_engine(path, max_num_batched_tokens=budget, max_num_seqs=8)
    prompts = [p for p in prompt_set(6, seed=16) if len(p) > 1]
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True, prompt_logprobs=2)
    engine.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=2))   # its prefix is cached now
    decode = decoder(engine)
    for prompt, out in zip(prompts, engine.generate(prompts, params)):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            ref = torch.log_softmax(hf_model(path)(ids, attention_mask=torch.ones_like(ids)).logits[0].float(), -1)
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
        for position, entry in enumerate(out.prompt_logprobs[1:], start=1):
            row, token = ref[position - 1], prompt[position]
            assert entry[token]["logprob"] == pytest.approx(row[token].item(), abs=1e-4)
            assert entry[token]["rank"] == int((row > row[token]).sum()) + 1
            assert entry[token]["decoded_token"] == decode(token)
            assert set(row.topk(2).indices.tolist()) <= set(entry)
    plain = engine.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=2))[0]
    assert plain.prompt_logprobs is None
