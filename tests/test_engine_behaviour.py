"""Engine behaviour beyond greedy equality: batch invariance, seeds, stops, streaming text, threads."""
import dataclasses
import threading

import pytest

from backend.detokenizer import decode_delta, new_state
from backend.sampling_params import CUMULATIVE, DELTA, FINAL_ONLY, SamplingParams
from tests.helpers import greedy, make_engine, prompt_set


@pytest.fixture(scope="module")
def engine(tiny_checkpoints):
    return make_engine(tiny_checkpoints["llama"])


def outputs_alone_and_batched(engine, target, params, others):
    alone = engine.generate([target], params)[0]
    batched = engine.generate([*others[:3], target, *others[3:]], [greedy(20)] * 3 + [params] + [greedy(7)] * 5)
    return alone, batched[3]


def test_batch_invariance_greedy(engine):
    prompts = prompt_set(9, seed=5)
    alone, batched = outputs_alone_and_batched(engine, prompts[4], greedy(16), prompts[:4] + prompts[5:])
    assert alone.token_ids == batched.token_ids


def test_seeded_sampling_reproducible_and_batch_invariant(engine):
    prompts = prompt_set(9, seed=6)
    params = SamplingParams(temperature=0.9, top_k=50, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    alone, batched = outputs_alone_and_batched(engine, prompts[4], params, prompts[:4] + prompts[5:])
    assert alone.token_ids == batched.token_ids
    other_seed = engine.generate([prompts[4]], SamplingParams(temperature=0.9, seed=99, max_tokens=16,
                                                              ignore_eos=True))[0]
    assert other_seed.token_ids != alone.token_ids


def test_top_k_1_is_greedy(engine):
    p = prompt_set(1, seed=7)
    sampled = engine.generate(p, SamplingParams(temperature=1.5, top_k=1, max_tokens=10, ignore_eos=True))[0]
    assert sampled.token_ids == engine.generate(p, greedy(10))[0].token_ids


def test_max_tokens_and_length_reason(engine):
    o = engine.generate(prompt_set(1), greedy(5))[0]
    assert len(o.token_ids) == 5 and o.finish_reason == "length"


def test_eos_stops_unless_ignored(engine):
    prompt = prompt_set(1, seed=8)[0]
    free_run = engine.generate([prompt], greedy(8))[0].token_ids
    eos = free_run[3]   # pretend the 4th generated token is an end-of-sequence id
    o = engine.generate([prompt], greedy(8, stop_token_ids=[eos]))[0]
    assert o.finish_reason == "stop" and o.token_ids == free_run[:free_run.index(eos) + 1]
    o = engine.generate([prompt], greedy(8, stop_token_ids=[eos], min_tokens=8))[0]
    assert len(o.token_ids) == 8 and eos not in o.token_ids


def test_stop_string_truncates_text(engine):
    prompt = "To be, or not"
    full = engine.generate([prompt], greedy(24))[0]
    assert len(full.text) > 6
    stop = full.text[3:6]
    o = engine.generate([prompt], greedy(24, stop=[stop]))[0]
    assert o.finish_reason == "stop" and o.text == full.text[:full.text.index(stop)]
    o = engine.generate([prompt], greedy(24, stop=[stop], include_stop_str_in_output=True))[0]
    assert o.text == full.text[:full.text.index(stop) + len(stop)]


def byte_token_ids(tokenizer, text):
    """One token per UTF-8 byte, so every multi-byte character arrives split across tokens."""
    vocab = tokenizer.get_vocab()
    return [vocab[BYTE_TO_CHAR[b]] for b in text.encode()]


def _byte_level_alphabet():
    """GPT-2's byte-level map: printable bytes stand for themselves, the rest shift to 256 and up."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = (b for b in range(256) if b not in keep)
    mapping = {b: chr(b) for b in keep}
    mapping.update({b: chr(256 + i) for i, b in enumerate(shifted)})
    return mapping


BYTE_TO_CHAR = _byte_level_alphabet()


def test_detokenizer_never_splits_a_character(engine):
    text = "日本語 🙂 héllo ça"
    prompt = engine.tokenizer.encode("To be")
    ids = byte_token_ids(engine.tokenizer, text)
    state, deltas, tokens = new_state(len(prompt)), [], list(prompt)
    for t in ids:
        tokens.append(t)
        deltas.append(decode_delta(engine.processor.decode, tokens, state))
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert sum(1 for d in deltas if d) == len(text)   # one whole character at a time


def test_streamed_deltas_concatenate_and_never_split_characters(engine):
    """Sampled text (random bytes may be invalid UTF-8 for good): deltas add up to the full decode."""
    deltas = {}
    prompts = ["日本語のテキスト", "Héllo wörld 🙂", "ça va?", "To be"]
    for i, prompt in enumerate(prompts):
        engine.add_request(f"d{i}", prompt, SamplingParams(temperature=1.0, seed=i, max_tokens=40, ignore_eos=True))
    final = {}
    while engine.has_unfinished():
        for o in engine.step():
            deltas.setdefault(o.request_id, []).append(o.new_text)
            if o.finished:
                final[o.request_id] = o
    for rid, o in final.items():
        assert "".join(deltas[rid]) == o.text
        assert o.text == engine.tokenizer.decode(o.token_ids, skip_special_tokens=True).rstrip("\ufffd")


def run_with_output_kind(engine, requests, kind):
    """Every output of each request (engine.step() with no filter), the params' output_kind set."""
    seen = {}
    for rid, prompt, params in requests:
        engine.add_request(rid, prompt, dataclasses.replace(params, output_kind=kind))
    while engine.has_unfinished():
        for o in engine.step():
            seen.setdefault(o.request_id, []).append(o)
    return seen


def test_output_kinds_carry_the_same_outputs(engine):
    """DELTA outputs add up to CUMULATIVE's final one (text held back for stop strings included), and
    FINAL_ONLY gives that final one alone."""
    free = engine.generate(["Once upon"], SamplingParams(temperature=1.0, seed=3, max_tokens=30, ignore_eos=True))[0]
    stop = free.text[7:11]
    requests = [("stopped", "Once upon", SamplingParams(temperature=1.0, seed=3, max_tokens=30, ignore_eos=True,
                                                         stop=[stop, "never there"], logprobs=2)),
                ("kept", "Once upon", SamplingParams(temperature=1.0, seed=3, max_tokens=30, ignore_eos=True,
                                                      stop=[stop], include_stop_str_in_output=True)),
                ("samples", "To be", SamplingParams(temperature=1.0, seed=5, n=2, max_tokens=12, ignore_eos=True,
                                                     logprobs=1)),
                ("beams", "To be", SamplingParams(temperature=0.0, use_beam_search=True, n=2, max_tokens=6))]
    cumulative = run_with_output_kind(engine, requests, CUMULATIVE)
    delta = run_with_output_kind(engine, requests, DELTA)
    final_only = run_with_output_kind(engine, requests, FINAL_ONLY)
    assert cumulative["stopped"][-1].finish_reason == "stop" and cumulative["stopped"][-1].text == free.text[:7]
    for rid, outputs in cumulative.items():
        final = outputs[-1]
        assert [o.finished for o in final_only[rid]] == [True]
        everything = [dataclasses.replace(s, new_text=s.text) for s in final.samples]   # its one output is all new
        assert final_only[rid][0].samples == everything
        for s in final.samples:
            parts = [p for o in delta[rid] for p in o.samples if p.index == s.index]
            assert all(p.text == p.new_text for p in parts)
            assert "".join(p.text for p in parts) == s.text
            assert [t for p in parts for t in p.token_ids] == s.token_ids
            assert [p.num_tokens for p in parts] == [sum(len(q.token_ids) for q in parts[:i + 1]) for i in range(len(parts))]
            if s.logprobs is not None:
                assert [m for p in parts for m in p.logprobs] == s.logprobs
            assert (parts[-1].finish_reason, parts[-1].cumulative_logprob) == (s.finish_reason, s.cumulative_logprob)


def test_prompt_too_long_is_refused(tiny_checkpoints):
    engine = make_engine(tiny_checkpoints["llama"], max_model_len=32)
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request("x", "", greedy(4), prompt_token_ids=list(range(2, 40)))
    o = engine.generate([list(range(2, 20))], greedy(100))[0]
    assert o.finish_reason == "length" and 18 + len(o.token_ids) == 32


def test_request_bigger_than_pool_is_refused(tiny_checkpoints):
    engine = make_engine(tiny_checkpoints["llama"], num_gpu_blocks_override=2, block_size=16)
    with pytest.raises(ValueError, match="max_tokens"):
        engine.add_request("x", "", greedy(40), prompt_token_ids=list(range(2, 20)))


def test_thread_loop_callbacks_abort_and_shutdown(tiny_checkpoints):
    engine = make_engine(tiny_checkpoints["llama"])
    engine.start()
    done = {rid: threading.Event() for rid in ("a", "b", "c")}
    finals = {}

    def on_output(o):
        if o.finished:
            finals[o.request_id] = o
            done[o.request_id].set()

    engine.add_request("a", "To be", greedy(8), on_output)
    engine.add_request("b", "To be", greedy(100_000 // 1000 * 3), on_output)
    assert done["a"].wait(30) and finals["a"].finish_reason == "length"
    engine.abort("b")
    assert done["b"].wait(30) and finals["b"].finish_reason == "abort"
    engine.add_request("c", "To be", SamplingParams(max_tokens=200, ignore_eos=True, temperature=0), on_output)
    engine.shutdown()
    assert done["c"].is_set() and finals["c"].finish_reason in ("abort", "length")
    assert engine.core.block_manager.num_free_blocks == engine.core.block_manager.num_blocks
    with pytest.raises(RuntimeError):
        engine.add_request("d", "To be", greedy(4), on_output)


def test_request_id_unique_while_in_flight(tiny_checkpoints):
    engine = make_engine(tiny_checkpoints["llama"])
    engine.add_request("same", "To be", greedy(3))
    with pytest.raises(ValueError, match="already in flight"):
        engine.add_request("same", "To be", greedy(3))
    while engine.has_unfinished():
        engine.step()
    engine.add_request("same", "To be", greedy(3))   # finished: the id is free again
    while engine.has_unfinished():
        engine.step()


def metaspace_tokenizer():
    """A Llama-2-style tokenizer (SentencePiece's metaspace, byte fallback), trained in a moment."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>", *bytes_])
    tok.train_from_iterator(["To be or not to be, that is the question: héllo ça 日本語 " * 20], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("kind", ["byte-level", "metaspace"])
def test_stream_decoder_gives_decode_delta_text(engine, kind):
    """The engine's per-token text (HF tokenizers' DecodeStream) adds up to what the windowed
    decode_delta gives, never splits a character, on random ids including special tokens."""
    import random
    from backend.detokenizer import fast_decoder, stream_decoder
    tokenizer = engine.tokenizer if kind == "byte-level" else metaspace_tokenizer()
    decode, vocab = fast_decoder(tokenizer), len(tokenizer)
    rng = random.Random(kind)
    for _ in range(30):
        context = [rng.randrange(vocab) for _ in range(rng.randint(0, 5))]
        ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
        step = stream_decoder(tokenizer, context, skip_special_tokens=True)
        if decode(context).endswith("\ufffd"):   # the context ends inside a character: decode_delta's rule
            assert step is None
            continue
        streamed = [step(t) for t in ids]
        state, tokens, windowed = new_state(len(context)), list(context), []
        for t in ids:
            tokens.append(t)
            windowed.append(decode_delta(decode, tokens, state))
        assert "".join(streamed) == "".join(windowed)
        assert all(not piece.endswith("\ufffd") for piece in streamed)
    assert stream_decoder(tokenizer, [], skip_special_tokens=False) is None   # spacing of special tokens: ours
