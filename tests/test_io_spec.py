"""One list of tensors (backend/io_spec.py): model_repository/llm/config.pbtxt declares exactly it, and
the glue's auto_complete_config declares it for a bare `backend: "vllm"` config.pbtxt."""
import importlib
import json
import os
import sys

import numpy as np
import pytest

from backend import io_spec, serving
from backend.outputs import RequestOutput, SampleOutput

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def llm_config_pbtxt():
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as pb
    with open(os.path.join(ROOT, "model_repository", "llm", "config.pbtxt")) as f:
        return text_format.Parse(f.read(), pb.ModelConfig()), pb


def test_config_pbtxt_declares_exactly_the_table():
    config, pb = llm_config_pbtxt()
    inputs = [(t.name, pb.DataType.Name(t.data_type), tuple(t.dims), t.optional) for t in config.input]
    outputs = [(t.name, pb.DataType.Name(t.data_type), tuple(t.dims)) for t in config.output]
    assert inputs == [(*t, True) for t in io_spec.INPUTS]
    assert outputs == list(io_spec.OUTPUTS)
    assert config.model_transaction_policy.decoupled and config.max_batch_size == 0


def test_every_return_input_adds_its_declared_output():
    """return_X asks for output X: each such input names a declared output, and response_outputs
    fills exactly the outputs asked for."""
    outputs = {name for name, _, _ in io_spec.OUTPUTS}
    assert serving.OPTIONAL_OUTPUTS and {name.removeprefix("return_") for name in serving.OPTIONAL_OUTPUTS} <= outputs
    for name in serving.OPTIONAL_OUTPUTS:
        request = serving.parse_request({"text_input": np.array([b"x"], dtype=np.object_), name: np.array([True])})
        state = serving.RequestState("r", None, request)
        sample = SampleOutput(0, "a", "a", [1], "stop", num_tokens=1)
        filled = serving.response_outputs(state, ["a"], RequestOutput("r", "x", 1, [sample], True))
        assert set(filled) == {"text_output", name.removeprefix("return_")}


@pytest.fixture
def glue():
    """triton_glue.model with the pure-Python part of Triton's pb_utils (from the nvidia-pytriton wheel)."""
    pytriton = pytest.importorskip("pytriton")
    utils_dir = os.path.join(os.path.dirname(pytriton.__file__), "tritonserver", "backends", "python")
    if not os.path.isfile(os.path.join(utils_dir, "triton_python_backend_utils.py")):
        pytest.skip("no triton_python_backend_utils.py in the nvidia-pytriton wheel")
    sys.path.insert(0, utils_dir)
    try:
        yield importlib.import_module("triton_glue.model"), importlib.import_module("triton_python_backend_utils")
    finally:
        sys.path.remove(utils_dir)
        sys.modules.pop("triton_glue.model", None)
        sys.modules.pop("triton_python_backend_utils", None)


def bare_config(**extra):
    # What Triton hands auto_complete_config for `backend: "vllm"` + instance_group, and nothing else.
    return json.dumps({"name": "vllm_model", "backend": "vllm", "max_batch_size": 0, "input": [], "output": [],
                       "instance_group": [{"kind": "KIND_MODEL", "count": 1}], **extra})


def test_auto_complete_declares_the_table_and_the_decoupled_policy(glue):
    model, pb_utils = glue
    done = model.TritonPythonModel.auto_complete_config(pb_utils.ModelConfig(bare_config())).as_dict()
    assert done["input"] == io_spec.input_configs() and done["output"] == io_spec.output_configs()
    assert all(t["optional"] for t in done["input"])
    assert done["model_transaction_policy"] == {"decoupled": True} and done["max_batch_size"] == 0


def test_auto_complete_keeps_what_the_config_declares(glue):
    model, pb_utils = glue
    # An older vLLM-backend sample: stream declared and required, text_output only.
    declared = {"input": [{"name": "stream", "data_type": "TYPE_BOOL", "dims": [1], "optional": False}],
                "output": [{"name": "text_output", "data_type": "TYPE_STRING", "dims": [-1]}],
                "model_transaction_policy": {"decoupled": True}}
    done = model.TritonPythonModel.auto_complete_config(pb_utils.ModelConfig(bare_config(**declared))).as_dict()
    assert [t["name"] for t in done["input"]] == ["stream"] + [n for n, _, _ in io_spec.INPUTS if n != "stream"]
    assert done["input"][0]["optional"] is False
    assert [t["name"] for t in done["output"]] == [n for n, _, _ in io_spec.OUTPUTS]


def test_auto_complete_refuses_a_non_decoupled_config(glue):
    model, pb_utils = glue
    with pytest.raises(ValueError, match="decoupled"):
        model.TritonPythonModel.auto_complete_config(
            pb_utils.ModelConfig(bare_config(model_transaction_policy={"decoupled": False})))


def test_auto_complete_leaves_the_llm_config_as_it_is(glue):
    model, pb_utils = glue
    from google.protobuf import json_format
    config, _ = llm_config_pbtxt()
    as_dict = json_format.MessageToDict(config, preserving_proto_field_name=True)
    as_dict.setdefault("max_batch_size", 0)
    done = model.TritonPythonModel.auto_complete_config(pb_utils.ModelConfig(json.dumps(as_dict))).as_dict()
    assert done["input"] == as_dict["input"] and done["output"] == as_dict["output"]
