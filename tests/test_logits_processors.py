"""Penalties, logit_bias, allowed_token_ids, bad_words (backend/logits_processors.py) against
brute-force references of vLLM's formulas; the engine with them against HF transformers; the
request fields that come with them (max_tokens null, truncate_prompt_tokens, empty prompts,
spaces_between_special_tokens)."""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend.engine import tokenize_bad_words
from backend.logits_processors import apply_logits_processors
from backend.sampling_params import SamplingParams
from backend.sequence import Sequence
from tests.helpers import greedy, hf_model, make_engine, prompt_set, run_staggered

F32 = np.float32


# ------------------------------------------------------------------ brute force on the logits

def reference(logits: np.ndarray, seqs: list[Sequence]) -> np.ndarray:
    """vLLM's logits processors, one row and one vocabulary entry at a time, in fp32 (vLLM v1's
    order: allowed ids, bad words, logit bias, penalties)."""
    out = logits.copy()
    vocab = out.shape[1]
    for i, seq in enumerate(seqs):
        p = seq.params
        prompt, output = seq.token_ids[:seq.num_prompt_tokens], seq.token_ids[seq.num_prompt_tokens:]
        row = out[i]
        if p.allowed_token_ids is not None:
            for t in range(vocab):
                if t not in p.allowed_token_ids:
                    row[t] = -np.inf
        for word in p.bad_words_token_ids:
            prefix = word[:-1]
            if len(prefix) <= len(output) and output[len(output) - len(prefix):] == prefix:
                row[word[-1]] = -np.inf
        for t, b in p.logit_bias.items():
            row[t] = row[t] + F32(b)
        for t in range(vocab):
            count = output.count(t)
            if count or t in prompt:
                row[t] = row[t] / F32(p.repetition_penalty) if row[t] > 0 else row[t] * F32(p.repetition_penalty)
            row[t] = row[t] - F32(p.frequency_penalty) * F32(count)
            row[t] = row[t] - F32(p.presence_penalty) * F32(count > 0)
    return out


@st.composite
def batches(draw):
    vocab = draw(st.integers(2, 40))
    token = st.integers(0, vocab - 1)
    seqs = []
    for i in range(draw(st.integers(1, 6))):
        prompt = draw(st.lists(token, min_size=1, max_size=12))
        # outputs that repeat themselves, so that multi-token bad words match now and then
        output = draw(st.lists(st.sampled_from(prompt) | token, max_size=12))
        kw = {}
        if draw(st.booleans()):
            kw["presence_penalty"] = draw(st.sampled_from([0.0, 0.5, -1.25, 2.0]))
            kw["frequency_penalty"] = draw(st.sampled_from([0.0, 0.3, -0.7, 2.0]))
            kw["repetition_penalty"] = draw(st.sampled_from([1.0, 1.3, 0.6, 2.0]))
        if draw(st.booleans()):
            kw["logit_bias"] = draw(st.dictionaries(token, st.floats(-100, 100, width=32), max_size=4))
        if draw(st.integers(0, 3)) == 0:
            kw["allowed_token_ids"] = draw(st.lists(token, min_size=1, max_size=5))
        if draw(st.booleans()):
            tails = [output[-k:] for k in range(1, 3) if len(output) >= k]
            words = st.lists(token, min_size=1, max_size=3) | st.sampled_from(tails or [[0]]).flatmap(
                lambda tail: token.map(lambda t: tail + [t]))
            kw["bad_words_token_ids"] = draw(st.lists(words, max_size=3))
        seqs.append(Sequence(f"r{i}", prompt + output, len(prompt), SamplingParams(**kw)))
    seed = draw(st.integers(0, 2**31))
    logits = torch.randn(len(seqs), vocab, generator=torch.Generator().manual_seed(seed)) * 4
    return logits, seqs


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches())
def test_batched_equals_brute_force(batch):
    logits, seqs = batch
    expected = reference(logits.numpy(), seqs)
    got = apply_logits_processors(logits.clone(), seqs).numpy()
    np.testing.assert_array_equal(got, expected)   # the same fp32 operations, element for element
    for i, seq in enumerate(seqs):
        if not seq.params.processes_logits:
            assert got[i].tobytes() == logits[i].numpy().tobytes()   # bit-identical


def test_rows_that_ask_nothing_cost_nothing():
    logits = torch.randn(3, 10)
    seqs = [Sequence(f"r{i}", [1, 2, 3], 2, SamplingParams(temperature=0.5)) for i in range(3)]
    before = logits.clone()
    assert apply_logits_processors(logits, seqs) is logits and torch.equal(logits, before)


def test_each_processor_alone():
    logits = torch.tensor([[1.0, -1.0, 2.0, 0.5, -3.0]])
    seq = lambda **kw: [Sequence("r", [2, 1, 3, 3, 0], 2, SamplingParams(**kw))]   # prompt [2, 1], output [3, 3, 0]
    out = lambda **kw: apply_logits_processors(logits.clone(), seq(**kw))[0].tolist()
    assert out(presence_penalty=0.5) == [0.5, -1.0, 2.0, 0.0, -3.0]
    assert out(frequency_penalty=0.5) == [0.5, -1.0, 2.0, -0.5, -3.0]
    assert out(repetition_penalty=2.0) == [0.5, -2.0, 1.0, 0.25, -3.0]   # prompt and output ids
    assert out(logit_bias={4: 100.0}) == [1.0, -1.0, 2.0, 0.5, 97.0]
    assert out(allowed_token_ids=[1, 4]) == [-np.inf, -1.0, -np.inf, -np.inf, -3.0]
    # [3, 0, 4]: the output ends with 3, 0 -> 4 is forbidden; [0, 2] ends with 0 -> 2; [1, 2] does not match
    assert out(bad_words_token_ids=[[3, 0, 4], [0, 2], [1, 2], [1]]) == [1.0, -np.inf, -np.inf, 0.5, -np.inf]


# ------------------------------------------------------------------ the engine against HF

def hf_penalized_greedy(path, prompt, max_new, rep=1.0, freq=0.0, pres=0.0):
    """Greedy on HF transformers' logits with vLLM's penalty formula applied (independently of ours)."""
    model, ids = hf_model(path), list(prompt)
    for _ in range(max_new):
        with torch.no_grad():
            x = model(torch.tensor([ids])).logits[0, -1].float()
        out = ids[len(prompt):]
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=x.shape[0]).float()
        seen = torch.zeros_like(x, dtype=torch.bool)
        seen[torch.tensor(ids)] = True
        x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
        x = x - freq * counts - pres * (counts > 0).float()
        ids.append(int(x.argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("penalties", [dict(rep=1.8), dict(freq=1.5), dict(pres=1.0, freq=0.5, rep=1.3)])
def test_greedy_with_penalties_equals_hf(tiny_checkpoints, arch, penalties):
    path = tiny_checkpoints[arch]
    engine = make_engine(path)
    prompts = prompt_set(4, seed=3)
    params = greedy(14, repetition_penalty=penalties.get("rep", 1.0), frequency_penalty=penalties.get("freq", 0.0),
                    presence_penalty=penalties.get("pres", 0.0))
    outs = engine.generate(prompts, params)
    refs = [hf_penalized_greedy(path, p, 14, **penalties) for p in prompts]
    assert [o.token_ids for o in outs] == refs
    plain = [o.token_ids for o in engine.generate(prompts, greedy(14))]
    assert plain != refs   # the penalties did change the outputs


def test_allowed_token_ids_only(tiny_checkpoints):
    engine = make_engine(tiny_checkpoints["llama"])
    allowed = [5, 17, 42, 99, 200]
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=20, ignore_eos=True, allowed_token_ids=allowed)
              for s in range(3)] + [greedy(20, allowed_token_ids=allowed)]
    outs = engine.generate(prompt_set(4, seed=5), params)
    assert all(set(o.token_ids) <= set(allowed) for o in outs)
    assert len({t for o in outs for t in o.token_ids}) > 1


def test_logit_bias_forces_and_forbids(tiny_checkpoints):
    engine = make_engine(tiny_checkpoints["llama"])
    prompts = prompt_set(3, seed=6)
    forced = engine.generate(prompts, [greedy(8, logit_bias={123: 100.0}),
                                       SamplingParams(temperature=1.0, seed=1, max_tokens=8, ignore_eos=True,
                                                      logit_bias={123: 100.0}), greedy(8)])
    assert forced[0].token_ids == forced[1].token_ids == [123] * 8
    first = forced[2].token_ids[0]
    assert engine.generate([prompts[2]], greedy(8, logit_bias={first: -100.0}))[0].token_ids[0] != first


def occurrences(tokens, word):
    return [j for j in range(len(word) - 1, len(tokens)) if tokens[j - len(word) + 1:j + 1] == word]


def test_bad_words_never_complete(tiny_checkpoints):
    engine = make_engine(tiny_checkpoints["llama"])
    tok = engine.tokenizer
    prompts = prompt_set(6, seed=8)
    free = engine.generate(prompts, greedy(30))
    # a two-token word that the free run generates, and a one-token word
    candidates = [(o, o.token_ids[j:j + 2]) for o in free for j in range(len(o.token_ids) - 1)]
    word, pair = next((tok.decode(pair), pair) for o, pair in candidates
                      if pair in tokenize_bad_words([tok.decode(pair)], tok) and tok.decode(pair).strip())
    single = tok.decode([free[0].token_ids[0]])
    params = greedy(30, bad_words=[word, single])
    sequences = tokenize_bad_words([word, single], tok)
    assert pair in sequences
    outs = engine.generate(prompts, params)
    assert any(occurrences(o.token_ids, pair) for o in free)
    for o in outs:
        for w in sequences:
            assert not occurrences(o.token_ids, w), (w, o.token_ids)


def test_tokenize_bad_words_like_vllm(tiny_checkpoints):
    """Each word as it reads at the start of a text; with a leading space too only where that gives a
    different first token and the same number of tokens (vLLM's rule)."""
    tok = make_engine(tiny_checkpoints["llama"]).tokenizer
    enc = lambda text: tok.encode(text, add_special_tokens=False)
    words = ["  be", "king", "thee", "question"]
    expected = []
    for w in ("be", "king", "thee", "question"):
        expected.append(enc(w))
        if len(enc(" " + w)) == len(enc(w)) and enc(" " + w)[0] != enc(w)[0]:
            expected.append(enc(" " + w))
    assert tokenize_bad_words(words, tok) == expected
    assert enc(" king") in expected and enc(" be") not in expected      # both cases occur here
    assert all(0 not in s for s in expected)                           # no BOS


def test_async_equals_sync_with_processors(tiny_checkpoints):
    path = tiny_checkpoints["llama"]
    prompts = prompt_set(6, seed=9)
    params = [greedy(12, repetition_penalty=1.5), greedy(10),
              SamplingParams(temperature=0.9, seed=3, max_tokens=12, ignore_eos=True, frequency_penalty=1.0,
                             presence_penalty=0.5),
              greedy(14, bad_words=["the", "e"]), greedy(9, logit_bias={7: 3.0}),
              SamplingParams(temperature=1.0, seed=4, max_tokens=11, allowed_token_ids=[3, 4, 5, 1], min_tokens=4)]
    ref = [(o.token_ids, o.text, o.finish_reason)
           for o in run_staggered(make_engine(path, async_scheduling="false"), prompts, params)]
    eng = make_engine(path, async_scheduling="true")
    assert eng.core.async_scheduling
    got = [(o.token_ids, o.text, o.finish_reason) for o in run_staggered(eng, prompts, params)]
    assert got == ref
    assert eng.core.num_stepping_synchronously == 0
    bm = eng.core.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_history_requests_step_synchronously(tiny_checkpoints):
    """While a penalized request runs no step leaves a token in flight (the host must know them all)."""
    engine = make_engine(tiny_checkpoints["llama"], async_scheduling="true")
    engine.add_request("plain", "", greedy(20), prompt_token_ids=[5, 6, 7])
    engine.step()
    engine.add_request("pen", "", greedy(6, frequency_penalty=1.0), prompt_token_ids=[5, 6, 7])
    seen_async = False
    while engine.has_unfinished():
        engine.step()
        running = "pen" in engine.core.requests
        assert not (running and engine.core.in_flight is not None)
        seen_async |= not running and engine.core.in_flight is not None
    assert seen_async   # async again once it is gone


# ------------------------------------------------------------------ request fields

def test_max_tokens_null_runs_to_max_model_len(tiny_checkpoints):
    engine = make_engine(tiny_checkpoints["llama"], max_model_len=40)
    params = SamplingParams.from_dict({"max_tokens": None, "temperature": 0, "ignore_eos": True})
    out = engine.generate([list(range(5, 15))], params)[0]
    assert len(out.token_ids) == 30 and out.finish_reason == "length"
    default = engine.generate([list(range(5, 15))], SamplingParams.from_dict({"temperature": 0, "ignore_eos": True}))
    assert len(default[0].token_ids) == 16


def test_truncate_prompt_tokens_keeps_the_last_k(tiny_checkpoints):
    engine = make_engine(tiny_checkpoints["llama"], max_model_len=40)
    prompt = list(range(5, 65))   # longer than max_model_len: fits once truncated
    out = engine.generate([prompt], greedy(8, truncate_prompt_tokens=7))[0]
    ref = engine.generate([prompt[-7:]], greedy(8))[0]
    assert out.token_ids == ref.token_ids and out.num_prompt_tokens == 7
    text = "To be, or not to be, that is the question. " * 3
    ids = engine.tokenizer.encode(text)
    out = engine.generate([text], greedy(5, truncate_prompt_tokens=4))[0]
    assert out.token_ids == engine.generate([ids[-4:]], greedy(5))[0].token_ids
    assert engine.generate([[5, 6]], greedy(3, truncate_prompt_tokens=10))[0].num_prompt_tokens == 2


def test_add_special_tokens_false_leaves_out_the_tokenizers_bos(tiny_checkpoints):
    """As vLLM tokenizes a chat template's output: the tiny tokenizer prepends <s> (id 0) unless told not to."""
    engine = make_engine(tiny_checkpoints["llama"])
    text = "<s>ROMEO: speak"
    with_bos = engine.generate([text], greedy(4))[0]
    without = engine.generate([text], greedy(4, add_special_tokens=False))[0]
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    assert ids[0] == 0 and engine.tokenizer.encode(text)[:2] == [0, 0]   # the template's <s>, then the tokenizer's
    assert without.num_prompt_tokens == len(ids) == with_bos.num_prompt_tokens - 1
    assert without.token_ids == engine.generate([ids], greedy(4))[0].token_ids


def test_empty_prompt_is_refused(tiny_checkpoints):
    from backend import serving
    engine = make_engine(tiny_checkpoints["llama"])
    with pytest.raises(ValueError, match="'text_input' is empty") as e:
        engine.add_request("a", "", greedy(3))
    assert serving.submit_error(e.value).error == serving.ErrorKind.INVALID_ARG
    with pytest.raises(ValueError, match="'prompt_token_ids' is empty"):
        engine.add_request("b", "", greedy(3), prompt_token_ids=[])
    assert not engine.has_unfinished()


def test_token_ids_of_the_new_fields_are_checked(tiny_checkpoints):
    engine = make_engine(tiny_checkpoints["llama"])
    vocab = engine.vocab_size
    for field, params in (("logit_bias", greedy(3, logit_bias={vocab: 1.0})),
                          ("allowed_token_ids", greedy(3, allowed_token_ids=[1, -1]))):
        with pytest.raises(ValueError, match=f"'{field}'"):
            engine.add_request("a", "To be", params)


# ------------------------------------------------------------------ spaces_between_special_tokens

def slow_decode(hf_tok, ids, spaces_between_special_tokens):
    """transformers 4.x's PreTrainedTokenizer._decode with skip_special_tokens=False (the path vLLM
    follows): runs of ordinary tokens through convert_tokens_to_string, each added token alone,
    joined with a space or nothing. (transformers 5 dropped the flag: built from its parts.)"""
    added = hf_tok.get_added_vocab()
    pieces, run = [], []
    for token in hf_tok.convert_ids_to_tokens(ids):
        if token in added:
            if run:
                pieces.append(hf_tok.convert_tokens_to_string(run))
                run = []
            pieces.append(token)
        else:
            run.append(token)
    if run:
        pieces.append(hf_tok.convert_tokens_to_string(run))
    return (" " if spaces_between_special_tokens else "").join(pieces)


@pytest.mark.parametrize("spaces", [True, False])
def test_spaces_between_special_tokens(tiny_checkpoints, spaces):
    from transformers import AutoTokenizer

    from backend.detokenizer import fast_decoder
    path = tiny_checkpoints["llama"]
    hf_tok = AutoTokenizer.from_pretrained(path)
    engine = make_engine(path)
    decode = fast_decoder(engine.tokenizer)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        ids = torch.randint(0, 40, (12,), generator=g).tolist()   # ids 0, 1 are <s>, </s>; the rest ASCII
        assert decode(ids, skip_special_tokens=False, spaces_between_special_tokens=spaces) == \
            slow_decode(hf_tok, ids, spaces)
        assert decode(ids, skip_special_tokens=True, spaces_between_special_tokens=spaces) == \
            hf_tok.decode(ids, skip_special_tokens=True)
    # through the engine: special tokens forced into the output by logit_bias, decoded incrementally
    prompt = [5, 30, 31, 32, 33, 34, 35]
    params = SamplingParams(temperature=1.0, seed=2, max_tokens=16, ignore_eos=True, skip_special_tokens=False,
                            spaces_between_special_tokens=spaces, allowed_token_ids=[0, 1, 36, 37, 38])
    out = engine.generate([prompt], params)[0]
    assert {0, 1} & set(out.token_ids) and {36, 37, 38} & set(out.token_ids)
    context = prompt[-5:]
    assert out.text == slow_decode(hf_tok, context + out.token_ids, spaces)[len(slow_decode(hf_tok, context, spaces)):]
