"""A model repository written for Triton's vLLM backend (config.pbtxt `backend: "vllm"` and nothing but
an instance_group; 1/model.json of vLLM engine arguments) loads unchanged under tools/serve.py, which
installs our Python-based backend `vllm`. One server for the module: a good model and one whose
model.json has a key we do not support (--exit-on-error=false keeps the server up), started from a
directory whose own `backend` package must not be the one served."""
import json
import os
import queue

import numpy as np
import pytest
import requests

from .harness import Server, grpc_input

GOOD, BAD = "vllm_model", "vllm_bad"
CONFIG_PBTXT = 'backend: "vllm"\ninstance_group [{ kind: KIND_MODEL }]\n'


def vllm_model(repo, name, engine_args, checkpoint):
    version = os.path.join(repo, name, "1")
    os.makedirs(version)
    with open(os.path.join(repo, name, "config.pbtxt"), "w") as f:
        f.write(CONFIG_PBTXT)
    # A checkpoint beside model.json, named by a relative path.
    os.symlink(checkpoint, os.path.join(version, "tiny"))
    with open(os.path.join(version, "model.json"), "w") as f:
        json.dump({"model": "tiny", **engine_args}, f)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model):
    base = tmp_path_factory.mktemp("vllm-repo")
    repo = str(base / "model_repository")
    vllm_model(repo, GOOD, {"gpu_memory_utilization": 0.5, "enforce_eager": True, "disable_log_requests": True,
                            "num_gpu_blocks_override": 256, "max_num_seqs": 8}, tiny_model)
    vllm_model(repo, BAD, {"enforce_eager": True, "speculative_model": "draft"}, tiny_model)
    # Started from a directory holding other `backend` and `triton_glue` packages (as another
    # checkout would): the stub must still run the engine of the checkout that launched it.
    decoy = base / "elsewhere"
    for package in ("backend", "triton_glue"):
        (decoy / package).mkdir(parents=True)
        (decoy / package / "__init__.py").write_text(f"raise ImportError('the {package} of another checkout')\n")
    srv = Server(repo, str(base / "tritonserver.log"), extra_args=["--exit-on-error=false"], cwd=str(decoy)).start()
    try:
        srv.wait_ready(model=GOOD)
        yield srv
    finally:
        srv.stop()


def test_generate_over_http(server):
    url = f"{server.http_url}/v2/models/{GOOD}/generate"
    body = {"text_input": "The capital of France is", "exclude_input_in_output": True,
            "parameters": {"temperature": 0, "max_tokens": 8}}
    with requests.post(url, json=body, timeout=60) as r:
        assert r.status_code == 200, r.text
        assert r.json()["model_name"] == GOOD and r.json()["text_output"]
    with requests.post(url, json={"prompt": "Hello", "parameters": {"max_tokens": 4}}, timeout=60) as r:
        assert r.status_code == 200 and r.json()["text_output"].startswith("Hello"), r.text


def test_config_is_completed(server):
    with requests.get(f"{server.http_url}/v2/models/{GOOD}/config", timeout=10) as r:
        config = r.json()
    assert config["backend"] == "vllm" and config["model_transaction_policy"]["decoupled"]
    assert {"text_input", "stream", "sampling_parameters", "return_num_output_tokens"} <= {t["name"] for t in config["input"]}
    assert {"text_output", "finish_reason", "num_output_tokens"} <= {t["name"] for t in config["output"]}


def test_grpc_streaming(server):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc_url)
    results = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))

    tensor = grpc_input
    inputs = [tensor("text_input", np.array([b"Once upon a time"], dtype=np.object_), "BYTES"),
              tensor("stream", np.array([True]), "BOOL"),
              tensor("return_num_output_tokens", np.array([True]), "BOOL"),
              tensor("sampling_parameters", np.array([json.dumps({"temperature": 0, "max_tokens": 12,
                                                                  "ignore_eos": True}).encode()], dtype=np.object_),
                     "BYTES")]
    deltas, tokens = [], 0
    try:
        client.async_stream_infer(GOOD, inputs, request_id="1", enable_empty_final_response=True)
        while True:
            result, error = results.get(timeout=60)
            assert error is None, error
            if result.as_numpy("text_output") is not None:
                deltas.extend(x.decode() for x in result.as_numpy("text_output").reshape(-1))
                tokens += int(result.as_numpy("num_output_tokens").sum())
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
    finally:
        client.stop_stream()
        client.close()
    assert len(deltas) > 1 and "".join(deltas) and tokens == 12


def test_an_unsupported_engine_argument_fails_the_load_naming_it(server):
    with requests.get(f"{server.http_url}/v2/models/{BAD}/ready", timeout=10) as r:
        assert r.status_code != 200
    log = server.log()
    assert "failed to load 'vllm_bad'" in log and "unsupported engine argument 'speculative_model'" in log, log[-5000:]
    assert "engine arguments ignored (they change nothing here): disable_log_requests" in log
