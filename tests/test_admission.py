"""Overload and deadlines: max_queue_size refuses at once, queue_timeout_s and a request's own
timeout end it with an UNAVAILABLE-kind error, and a prompt too long to fit is refused before it
is tokenized."""
import time

import pytest

from backend.errors import UNAVAILABLE, EngineUnavailable
from tests.helpers import greedy, make_engine


def run(engine, until=None):
    finals = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                finals[o.request_id] = o
        if until is not None and until(finals):
            break
    return finals


def test_max_queue_size_counts_only_what_must_wait_for_a_seat(tiny_checkpoints):
    """2 seats + 3 queued are accepted from a burst (before any step runs: the first two will start at
    once, they do not queue); the 6th is refused and counted; a finished request makes room."""
    engine = make_engine(tiny_checkpoints["llama"], max_num_seqs=2, max_queue_size=3)
    for i in range(5):
        engine.add_request(f"q{i}", "To be", greedy(4 if i == 0 else 12))
    with pytest.raises(EngineUnavailable, match="max_queue_size"):
        engine.add_request("q5", "To be", greedy(4))
    engine.step()   # two start; three still wait for a seat
    with pytest.raises(EngineUnavailable, match="max_queue_size"):
        engine.add_request("q6", "To be", greedy(4))
    assert engine.stats()["request_rejected_total"] == 2
    run(engine, lambda finals: "q0" in finals)   # a seat frees: the queue has room again
    engine.add_request("q7", "To be", greedy(4))
    finals = run(engine)
    assert sorted(finals) == ["q1", "q2", "q3", "q4", "q7"] and all(o.error is None for o in finals.values())


def test_queue_timeout_fails_only_what_never_started(tiny_checkpoints):
    engine = make_engine(tiny_checkpoints["llama"], max_num_seqs=1, max_num_batched_tokens=64, queue_timeout_s=0.3)
    engine.add_request("first", "To be", greedy(40))
    engine.add_request("second", "To be", greedy(4))
    engine.step()   # "first" starts; "second" waits for its seat

    def slow_step(finals):
        time.sleep(0.02)
        return False
    finals = run(engine, slow_step)
    assert finals["first"].error is None and len(finals["first"].token_ids) == 40
    assert "queue_timeout_s" in finals["second"].error and finals["second"].error_kind == UNAVAILABLE


def test_request_timeout_ends_it_with_an_error(tiny_checkpoints):
    engine = make_engine(tiny_checkpoints["llama"])
    engine.add_request("slow", "To be", greedy(400), timeout_s=0.2)
    engine.add_request("other", "To be", greedy(8))
    t0 = time.monotonic()
    finals = run(engine, lambda f: time.sleep(0.01))
    assert finals["slow"].error == "the request's timeout expired" and finals["slow"].error_kind == UNAVAILABLE
    assert time.monotonic() - t0 < 5 and len(finals["slow"].token_ids) < 400
    assert finals["other"].error is None and len(finals["other"].token_ids) == 8
    bm = engine.core.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_a_prompt_too_long_to_fit_is_refused_from_its_head(tiny_checkpoints):
    engine = make_engine(tiny_checkpoints["llama"])
    huge = "To be or not to be " * 500_000   # 9.5 MB
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"'text_input' has more than \d+ tokens \(9500000 characters\)"):
        engine.add_request("huge", huge, greedy(4))
    assert time.perf_counter() - t0 < 0.5, "the head only is tokenized"
    assert engine.max_prompt_chars < len(huge) // 100


def test_many_characters_in_few_tokens_are_not_refused(tiny_checkpoints, tmp_path):
    """A tokenizer that drops whitespace packs many characters into few tokens: such a prompt fits
    and is served (a cap on characters alone would refuse it)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = Tokenizer(models.WordLevel({"[UNK]": 0, "To": 1, "be": 2, "or": 3, "not": 4}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words.save(str(tmp_path / "tokenizer.json"))
    engine = make_engine(tiny_checkpoints["llama"], max_model_len=256, tokenizer=str(tmp_path))
    spaced = "To" + " " * (engine.max_prompt_chars + 10) + "be or not"
    assert engine.tokenizer.encode(spaced) == [1, 2, 3, 4]
    engine.add_request("spaced", spaced, greedy(3))
    assert run(engine)["spaced"].error is None
