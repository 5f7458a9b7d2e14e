"""model.json (vLLM engine arguments, as Triton's vLLM backend reads them) -> EngineConfig, and which
file a Triton model's settings come from (backend/config.py), without Triton."""
import json
import os

import pytest
import torch

from backend.config import (IGNORED_ENGINE_ARGS, EngineConfig, engine_config_for_model)


@pytest.fixture
def checkpoint(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return str(folder)


def test_typed_values_map_to_the_engine_config(checkpoint, tmp_path):
    config = EngineConfig.from_engine_args(
        {"model": checkpoint, "gpu_memory_utilization": 0.5, "enforce_eager": True, "max_num_seqs": 8,
         "max_num_batched_tokens": 512.0, "block_size": 32, "max_model_len": None, "dtype": "half",
         "enable_prefix_caching": False, "seed": 7, "tensor_parallel_size": 1, "scheduling_policy": "priority",
         "async_scheduling": False, "load_format": "safetensors", "tokenizer": None},
        str(tmp_path))
    assert (config.model, config.gpu_memory_utilization, config.enforce_eager, config.max_num_seqs) == \
        (checkpoint, 0.5, True, 8)
    assert config.max_num_batched_tokens == 512 and isinstance(config.max_num_batched_tokens, int)
    assert (config.block_size, config.max_model_len, config.dtype, config.enable_prefix_caching) == (32, 0, "float16", False)
    assert (config.seed, config.scheduling_policy, config.async_scheduling, config.load_format) == \
        (7, "priority", "false", "auto")
    assert config.tokenizer == ""


def test_strings_are_read_as_in_config_pbtxt(checkpoint, tmp_path):
    config = EngineConfig.from_engine_args({"model": checkpoint, "enforce_eager": "true", "max_num_seqs": "4",
                                            "gpu_memory_utilization": "0.25"}, str(tmp_path))
    assert (config.enforce_eager, config.max_num_seqs, config.gpu_memory_utilization) == (True, 4, 0.25)


@pytest.mark.parametrize("key, value", [("max_num_seqs", True), ("max_num_seqs", 2.5), ("enforce_eager", 1),
                                        ("gpu_memory_utilization", [0.5]), ("dtype", 16), ("max_num_seqs", "many")])
def test_a_value_of_the_wrong_type_is_refused_with_its_key(checkpoint, tmp_path, key, value):
    with pytest.raises(ValueError, match=f"'{key}'"):
        EngineConfig.from_engine_args({"model": checkpoint, key: value}, str(tmp_path))


def test_an_unknown_key_is_refused_with_its_name(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="unsupported engine argument 'speculative_config'"):
        EngineConfig.from_engine_args({"model": checkpoint, "speculative_config": {"num_speculative_tokens": 2}},
                                      str(tmp_path))


def test_keys_that_change_nothing_are_ignored_with_a_warning(checkpoint, tmp_path):
    warnings = []
    config = EngineConfig.from_engine_args(
        {"model": checkpoint, "disable_log_requests": True, "disable_log_stats": False, "served_model_name": "x",
         "trust_remote_code": True, "pipeline_parallel_size": 1, "enable_lora": False},
        str(tmp_path), warn=warnings.append)
    assert config.model == checkpoint
    assert len(warnings) == 1
    for key in ("disable_log_requests", "disable_log_stats", "served_model_name", "trust_remote_code",
                "pipeline_parallel_size", "enable_lora"):
        assert key in warnings[0]
    assert set(IGNORED_ENGINE_ARGS) >= {"disable_log_requests", "disable_log_stats", "max_log_len"}


@pytest.mark.parametrize("key, value", [("pipeline_parallel_size", 2), ("enable_lora", True)])
def test_keys_accepted_only_where_they_change_nothing(checkpoint, tmp_path, key, value):
    with pytest.raises(ValueError, match=f"'{key}'"):
        EngineConfig.from_engine_args({"model": checkpoint, key: value}, str(tmp_path))


@pytest.mark.parametrize("args, quantization, kv_cache_dtype", [
    ({}, "", "auto"), ({"quantization": None, "kv_cache_dtype": None}, "", "auto"),
    ({"quantization": "fp8"}, "fp8", "auto"), ({"kv_cache_dtype": "fp8"}, "", "fp8"),
    ({"kv_cache_dtype": "fp8_e4m3", "quantization": "fp8"}, "fp8", "fp8"), ({"kv_cache_dtype": "auto"}, "", "auto")])
def test_quantization_and_kv_cache_dtype(checkpoint, tmp_path, args, quantization, kv_cache_dtype):
    config = EngineConfig.from_engine_args({"model": checkpoint, **args}, str(tmp_path))
    assert (config.quantization, config.kv_cache_dtype) == (quantization, kv_cache_dtype)


@pytest.mark.parametrize("key, value, supported", [("quantization", "awq", "fp8"), ("quantization", "fp8_e5m2", "fp8"),
                                                   ("kv_cache_dtype", "fp8_e5m2", "fp8_e4m3"),
                                                   ("kv_cache_dtype", "int8", "fp8")])
def test_unsupported_quantization_values_name_the_field_and_the_choices(checkpoint, tmp_path, key, value, supported):
    for build in (lambda: EngineConfig.from_engine_args({"model": checkpoint, key: value}, str(tmp_path)),
                  lambda: EngineConfig.from_parameters({"model": checkpoint, key: value})):
        with pytest.raises(ValueError, match=f"parameter '{key}' .*{supported}.*{value}"):
            build()


def test_quantization_parameters_in_config_pbtxt(checkpoint, tmp_path):
    """config.pbtxt string parameters reach the same fields (engine_config_for_model without a model.json)."""
    params = {"model": {"string_value": checkpoint}, "quantization": {"string_value": "fp8"},
              "kv_cache_dtype": {"string_value": "fp8_e4m3"}}
    config = engine_config_for_model({"parameters": params}, str(tmp_path), 1)
    assert (config.quantization, config.kv_cache_dtype) == ("fp8", "fp8")
    empty = engine_config_for_model({"parameters": {"model": {"string_value": checkpoint},
                                                    "quantization": {"string_value": ""}}}, str(tmp_path), 1)
    assert (empty.quantization, empty.kv_cache_dtype) == ("", "auto")


def test_bad_values_are_refused_by_validation(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        EngineConfig.from_engine_args({"model": checkpoint, "gpu_memory_utilization": 1.5}, str(tmp_path))
    with pytest.raises(ValueError, match="must be a JSON object"):
        EngineConfig.from_engine_args(["model", checkpoint], str(tmp_path))


@pytest.mark.parametrize("value, device, expected", [
    ("auto", "cpu", False), ("auto", "cuda", True), ("True", "cpu", True), (False, "cuda", False), (True, "cpu", True)])
def test_engine_core_process_auto_means_on_cuda(checkpoint, tmp_path, monkeypatch, value, device, expected):
    config = EngineConfig.from_engine_args({"model": checkpoint, "engine_core_process": value}, str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: device == "cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert config.resolve().torch_device.type == device and config.uses_core_process is expected


def test_engine_core_process_refuses_other_values(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="'engine_core_process' must be auto, true or false, got 'sometimes'"):
        EngineConfig.from_engine_args({"model": checkpoint, "engine_core_process": "sometimes"}, str(tmp_path))


def test_relative_paths_look_in_the_working_directory_then_beside_model_json(tmp_path):
    cwd, version_dir = tmp_path / "cwd", tmp_path / "repo" / "m" / "1"
    for folder in (cwd / "shared", version_dir / "local", version_dir / "shared"):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
    # The working directory first (where vLLM looks, as Triton's vLLM backend passes the path on)...
    config = EngineConfig.from_engine_args({"model": "shared", "tokenizer": "local"}, str(version_dir), cwd=str(cwd))
    assert config.model == str(cwd / "shared") and config.tokenizer == str(version_dir / "local")
    # ... an absolute path as it is ...
    assert EngineConfig.from_engine_args({"model": str(version_dir / "local")}, "/nowhere").model == \
        str(version_dir / "local")
    # ... and a name found nowhere (a Hugging Face Hub id) is refused, naming the key.
    with pytest.raises(ValueError, match="'model': no directory 'facebook/opt-125m'.*Hugging Face"):
        EngineConfig.from_engine_args({"model": "facebook/opt-125m"}, str(version_dir), cwd=str(cwd))


def write_model(tmp_path, config_pbtxt_backend, engine_args=None, parameters=None):
    model_dir = tmp_path / "repo" / "vllm_model"
    (model_dir / "1").mkdir(parents=True)
    if engine_args is not None:
        (model_dir / "1" / "model.json").write_text(json.dumps(engine_args))
    model_config = {"name": "vllm_model", "backend": config_pbtxt_backend,
                    "parameters": {k: {"string_value": v} for k, v in (parameters or {}).items()}}
    return model_config, str(model_dir)


def test_a_model_json_holds_the_engine_settings(checkpoint, tmp_path):
    model_config, model_dir = write_model(tmp_path, "vllm", {"model": checkpoint, "max_num_seqs": 3},
                                          {"REPORT_CUSTOM_METRICS": "true"})
    warnings = []
    config = engine_config_for_model(model_config, model_dir, "1", warn=warnings.append)
    assert (config.model, config.max_num_seqs) == (checkpoint, 3)
    assert any("REPORT_CUSTOM_METRICS" in w for w in warnings)


def test_model_json_errors_name_the_file_and_the_key(checkpoint, tmp_path):
    model_config, model_dir = write_model(tmp_path, "vllm", {"model": checkpoint, "no_such_arg": 1})
    with pytest.raises(ValueError, match=r"model\.json: unsupported engine argument 'no_such_arg'"):
        engine_config_for_model(model_config, model_dir, 1)
    with open(os.path.join(model_dir, "1", "model.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="not readable as JSON"):
        engine_config_for_model(model_config, model_dir, 1)


def test_engine_parameters_beside_a_model_json_are_refused(checkpoint, tmp_path):
    model_config, model_dir = write_model(tmp_path, "vllm", {"model": checkpoint}, {"max_num_seqs": "4"})
    with pytest.raises(ValueError, match="parameter 'max_num_seqs'"):
        engine_config_for_model(model_config, model_dir, 1)


def test_the_vllm_backend_needs_a_model_json(tmp_path):
    model_config, model_dir = write_model(tmp_path, "vllm")
    with pytest.raises(ValueError, match="model.json is missing"):
        engine_config_for_model(model_config, model_dir, 1)


def test_without_model_json_the_parameters_are_used_as_before(checkpoint, tmp_path):
    model_config, model_dir = write_model(tmp_path, "python", parameters={"model": checkpoint, "max_num_seqs": "5",
                                                                          "block_size": ""})
    config = engine_config_for_model(model_config, model_dir, 1)
    assert (config.model, config.max_num_seqs, config.block_size) == (checkpoint, 5, 16)
    model_config["parameters"]["typo"] = {"string_value": "1"}
    with pytest.raises(ValueError, match="unknown parameter 'typo'"):
        engine_config_for_model(model_config, model_dir, 1)
