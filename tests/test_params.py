"""Request options and engine parameters: strings accepted, bad values named in the error."""
import pytest

from backend.config import EngineConfig
from backend.sampling_params import SamplingParams


def test_sampling_params_from_strings():
    p = SamplingParams.from_dict({"max_tokens": "10", "temperature": "0.7", "top_k": "5", "ignore_eos": "true",
                                  "stop": "\n", "n": 1, "use_beam_search": False, "min_tokens": "2",
                                  "unrelated": {"x": 1}})
    assert (p.max_tokens, p.temperature, p.top_k, p.ignore_eos, p.stop, p.min_tokens) == (10, 0.7, 5, True, ["\n"], 2)
    assert SamplingParams.from_dict({"stop": ["a", "b"], "stop_token_ids": "[3, 4]"}).stop_token_ids == [3, 4]


@pytest.mark.parametrize("bad, field", [
    ({"temperature": "abc"}, "temperature"), ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": "1.5"}, "max_tokens"),
    ({"top_p": 0}, "top_p"), ({"n": 0}, "n"), ({"n": "65"}, "n"), ({"n": 2, "best_of": 3}, "best_of"),
    ({"use_beam_search": True, "stop": "x"}, "stop"), ({"use_beam_search": "yes"}, "use_beam_search"),
    ({"ignore_eos": "maybe"}, "ignore_eos"), ({"stop": [1]}, "stop"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"presence_penalty": "-2.01"}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"), ({"frequency_penalty": "x"}, "frequency_penalty"),
    ({"repetition_penalty": -1}, "repetition_penalty"), ({"repetition_penalty": 1e-300}, "repetition_penalty"),
    ({"repetition_penalty": 1e300}, "repetition_penalty"), ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"x": 1}}, "logit_bias"), ({"logit_bias": {"1.5": 1}}, "logit_bias"), ({"logit_bias": [1]}, "logit_bias"),
    ({"logit_bias": {"5": "abc"}}, "logit_bias"), ({"logit_bias": {str(i): 1 for i in range(1025)}}, "logit_bias"),
    ({"allowed_token_ids": []}, "allowed_token_ids"), ({"allowed_token_ids": ["a"]}, "allowed_token_ids"),
    ({"allowed_token_ids": list(range(1025))}, "allowed_token_ids"), ({"bad_words": [1]}, "bad_words"),
    ({"bad_words": [""]}, "bad_words"), ({"bad_words": ["  "]}, "bad_words"), ({"bad_words": ["x"] * 129}, "bad_words"),
    ({"bad_words": ["x" * 257]}, "bad_words"), ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ({"truncate_prompt_tokens": "1.5"}, "truncate_prompt_tokens"), ({"spaces_between_special_tokens": "no"},
                                                                      "spaces_between_special_tokens"),
    ({"use_beam_search": True, "n": 2, "repetition_penalty": 1.2}, "repetition_penalty"),
    ({"use_beam_search": True, "n": 2, "logit_bias": {"3": 1}}, "logit_bias"),
    ({"use_beam_search": True, "n": 2, "bad_words": ["x"]}, "bad_words"),
    ({"use_beam_search": True, "n": 2, "allowed_token_ids": [3]}, "allowed_token_ids"),
])
def test_sampling_params_errors_name_the_field(bad, field):
    with pytest.raises(ValueError, match=f"'{field}'"):
        SamplingParams.from_dict(bad)


def test_new_sampling_params_from_json():
    p = SamplingParams.from_dict({"presence_penalty": "0.5", "frequency_penalty": -1, "repetition_penalty": "1.2",
                                  "logit_bias": {"5": 100, "7": "-1.5"}, "allowed_token_ids": "[1, 2]",
                                  "bad_words": "foo", "truncate_prompt_tokens": "3",
                                  "spaces_between_special_tokens": "false"})
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -1.0, 1.2)
    assert p.logit_bias == {5: 100.0, 7: -1.5} and p.allowed_token_ids == [1, 2] and p.bad_words == ["foo"]
    assert p.truncate_prompt_tokens == 3 and not p.spaces_between_special_tokens
    assert p.needs_output_history and p.processes_logits
    assert SamplingParams.from_dict({"logit_bias": '{"3": 2}'}).logit_bias == {3: 2.0}   # a JSON string
    plain = SamplingParams.from_dict({"presence_penalty": 0, "repetition_penalty": 1, "allowed_token_ids": None})
    assert not plain.needs_output_history and not plain.processes_logits
    only_bias = SamplingParams.from_dict({"logit_bias": {"3": 2}})
    assert only_bias.processes_logits and not only_bias.needs_output_history


def test_max_tokens_null_means_until_max_model_len():
    from backend.sampling_params import UNTIL_MAX_MODEL_LEN
    assert SamplingParams.from_dict({}).max_tokens == 16
    assert SamplingParams.from_dict({"max_tokens": None}).max_tokens == UNTIL_MAX_MODEL_LEN
    assert SamplingParams.from_dict({"max_tokens": None, "min_tokens": 100}).min_tokens == 100


def test_engine_config_from_triton_parameters(tiny_checkpoints, tmp_path):
    path = tiny_checkpoints["llama"]
    c = EngineConfig.from_parameters({"model": {"string_value": path}, "block_size": {"string_value": "32"},
                                      "max_model_len": {"string_value": ""}, "gpu_memory_utilization": "0.5"})
    assert (c.block_size, c.max_model_len, c.gpu_memory_utilization) == (32, 0, 0.5)


@pytest.mark.parametrize("key, value", [("block_size", "abc"), ("block_size", "12"), ("max_num_seqs", "0"),
                                        ("gpu_memory_utilization", "1.5"), ("dtype", "int8"), ("model", "/nonexistent"),
                                        ("max_num_batched_tokens", "-1"), ("max_num_batched_tokens", "100"),
                                        ("no_such_knob", "1")])
def test_engine_config_errors_name_the_parameter(tiny_checkpoints, key, value):
    params = {"model": tiny_checkpoints["llama"], key: value}
    with pytest.raises(ValueError, match=f"'{key}'"):
        EngineConfig.from_parameters(params)


# ------------------------------------------------------------------------------ exact numbers

def _case_id(value):
    from backend.sampling_params import _show
    return _show(value)[:24]


@pytest.mark.parametrize("value, expected", [
    (12, 12), ("12", 12), (" 12 ", 12), ("+12", 12), (12.0, 12), ("12.0", 12), ("1e3", 1000), ("1.5e1", 15),
    (2**53 + 1, 2**53 + 1), (str(2**53 + 1), 2**53 + 1),
])
def test_integers_are_exact(value, expected):
    p = SamplingParams.from_dict({"max_tokens": value})
    assert p.max_tokens == expected and type(p.max_tokens) is int


@pytest.mark.parametrize("key", ["max_tokens", "n", "seed", "top_k", "min_tokens", "priority", "best_of"])
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "Infinity", float("inf"), float("nan"), "1e400", 1e400,
                                   "1e999999999", "1_0", "0x10", "12abc", "", " ", [1], {"a": 1}, True, 1.5, "1.5",
                                   10**5000, "9" * 10000], ids=lambda v: _case_id(v))
def test_bad_integers_name_the_field(key, value):
    with pytest.raises(ValueError, match=f"'{key}'"):
        SamplingParams.from_dict({key: value})


@pytest.mark.parametrize("key", ["temperature", "top_p", "min_p", "length_penalty", "presence_penalty"])
@pytest.mark.parametrize("value", ["inf", "nan", "-inf", float("nan"), float("inf"), "1e400", 10**400, "abc",
                                   [0.5], True], ids=lambda v: _case_id(v))
def test_bad_floats_name_the_field(key, value):
    with pytest.raises(ValueError, match=f"'{key}'"):
        SamplingParams.from_dict({key: value})


def test_seeds_are_exact_and_in_vllms_range():
    big = 2**62 + 1
    assert SamplingParams.from_dict({"seed": big}).seed == big
    assert SamplingParams.from_dict({"seed": str(big)}).seed != SamplingParams.from_dict({"seed": big + 1}).seed
    assert SamplingParams.from_dict({"seed": 2**63 - 1}).seed == 2**63 - 1
    assert SamplingParams.from_dict({"seed": -2**63}).seed == -2**63
    assert SamplingParams.from_dict({"seed": -1}).seed is None          # vLLM: -1 means no seed
    for bad in (2**63, 2**64, -2**63 - 1, "18446744073709551616"):
        with pytest.raises(ValueError, match="'seed'"):
            SamplingParams.from_dict({"seed": bad})


@pytest.mark.parametrize("t", [0, 1e-40, "1e-40", 9.9e-6, "0.0"])
def test_tiny_temperature_is_greedy(t):
    p = SamplingParams.from_dict({"temperature": t})
    assert p.greedy and p.temperature == 0.0
    assert not SamplingParams.from_dict({"temperature": 1e-5}).greedy


@pytest.mark.parametrize("extra, field", [({"top_k": 5}, "top_k"), ({"top_p": 0.5}, "top_p"),
                                          ({"min_p": 0.1}, "min_p"), ({"best_of": 65}, "best_of")])
def test_beam_search_refuses_sampling_filters(extra, field):
    with pytest.raises(ValueError, match=f"'{field}'"):
        SamplingParams.from_dict({"use_beam_search": True, "n": 2, **extra})
    # temperature is accepted (the project's seed request sends 0.7 with use_beam_search)
    assert SamplingParams.from_dict({"use_beam_search": True, "n": 2, "temperature": 0.7}).beam_width == 2


def test_stop_caps():
    from backend.sampling_params import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS
    assert len(SamplingParams.from_dict({"stop": ["x"] * MAX_STOP_STRINGS}).stop) == MAX_STOP_STRINGS
    for stop in (["x"] * 100_000, ["x"] * (MAX_STOP_STRINGS + 1), ["y" * (MAX_STOP_STRING_CHARS + 1)], [""]):
        with pytest.raises(ValueError, match="'stop'") as e:
            SamplingParams.from_dict({"stop": stop})
        assert len(str(e.value)) < 300          # the message does not echo the whole list
    with pytest.raises(ValueError, match="'stop_token_ids'"):
        SamplingParams.from_dict({"stop_token_ids": list(range(MAX_STOP_TOKEN_IDS + 1))})


def test_check_token_ids():
    from backend.sampling_params import check_token_ids
    check_token_ids(SamplingParams.from_dict({"stop_token_ids": [0, 99]}), vocab_size=100)
    for ids in ([100], [-1], [10**30], [5, 999999]):
        with pytest.raises(ValueError, match="'stop_token_ids'"):
            check_token_ids(SamplingParams.from_dict({"stop_token_ids": ids}), vocab_size=100)


# ------------------------------------------------------------------------------ any JSON value

def _json_values():
    from hypothesis import strategies as st
    numbers_as_text = st.sampled_from(["12", "1e3", "1.5", "-1", "0", "inf", "nan", "1e400", "-0.0", " 7 ", "1_0",
                                       "true", "false", "[1, 2]", "[\"a\"]", "18446744073709551616", "1e-40"])
    edge_integers = st.sampled_from([10**400, -10**400, 2**53 + 1, 2**63, 2**64, -2**63 - 1, -1, 0, 65])
    scalars = (st.none() | st.booleans() | st.integers() | edge_integers
               | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20) | numbers_as_text)
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)


def _known_keys():
    from backend.sampling_params import _CONVERTERS
    return sorted(_CONVERTERS)


def _assert_valid(p):
    import math
    assert isinstance(p, SamplingParams)
    for name in ("n", "top_k", "max_tokens", "min_tokens", "priority"):
        assert type(getattr(p, name)) is int, name
    for name in ("temperature", "top_p", "min_p", "length_penalty"):
        assert isinstance(getattr(p, name), (int, float)) and math.isfinite(getattr(p, name)), name
    assert p.seed is None or (type(p.seed) is int and -2**63 <= p.seed < 2**63)
    assert 1 <= p.n <= 64 and 1 <= p.max_tokens and 0 <= p.min_tokens <= p.max_tokens
    assert all(type(t) is int for t in p.stop_token_ids) and all(isinstance(s, str) and s for s in p.stop)
    assert p.greedy == (p.temperature == 0)


def test_any_json_values_give_params_or_a_named_error():
    """Random JSON values for every known key: a valid SamplingParams, or a ValueError naming one of
    the keys given (never another exception type, never an unnamed error)."""
    from hypothesis import given, settings, HealthCheck
    from hypothesis import strategies as st

    @settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.dictionaries(st.sampled_from(_known_keys()), _json_values(), max_size=6))
    def run(d):
        try:
            p = SamplingParams.from_dict(d)
        except ValueError as e:
            assert any(f"'{k}'" in str(e) for k in d), (d, str(e))
        else:
            _assert_valid(p)

    run()


def test_any_json_value_for_one_key_names_that_key():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=400, deadline=None)
    @given(st.sampled_from(_known_keys()), _json_values())
    def run(key, value):
        try:
            _assert_valid(SamplingParams.from_dict({key: value}))
        except ValueError as e:
            assert f"'{key}'" in str(e), (key, value, str(e))

    run()
