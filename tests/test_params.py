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
    ({"ignore_eos": "maybe"}, "ignore_eos"), ({"stop": [1]}, "stop"), ({"repetition_penalty": 1.3}, "repetition_penalty"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
])
def test_sampling_params_errors_name_the_field(bad, field):
    with pytest.raises(ValueError, match=f"'{field}'"):
        SamplingParams.from_dict(bad)


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
