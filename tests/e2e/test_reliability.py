"""The launcher's safe defaults and recovery, against a real tritonserver (tools/serve.py).

Admin APIs need the key; a killed Python-backend stub fails the requests in flight at once and
the server comes back by itself; stopping (or killing) the launcher leaves no process and no
shared-memory region behind. LLM_SOAK=1 also runs the long variant (repeated kills under load).
"""
import json
import os
import signal
import threading
import time

import numpy as np
import pytest
import requests

from tools import processes

from .harness import MODEL_NAME, Server, make_model_repository

ADMIN_KEY = "e2e-admin-key-0123456789abcdef"
HEADER = {"llm-admin-key": ADMIN_KEY}
GRPC_HEADER = {"triton-grpc-protocol-llm-admin-key": ADMIN_KEY}   # Triton's prefix for gRPC metadata
soak = pytest.mark.skipif(not os.environ.get("LLM_SOAK"), reason="long variant: set LLM_SOAK=1")


def start_server(tmp_path, tiny_model, **parameters):
    repo = make_model_repository(str(tmp_path / "model_repository"), tiny_model, num_gpu_blocks_override="2048",
                                 **parameters)
    srv = Server(repo, str(tmp_path / "tritonserver.log"), env={"LLM_ADMIN_KEY": ADMIN_KEY}).start().wait_ready()
    deadline = time.monotonic() + 10
    while "tritonserver is ready" not in srv.log() and time.monotonic() < deadline:
        time.sleep(0.1)   # the launcher has seen it ready too (it polls twice a second)
    return srv


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model):
    srv = start_server(tmp_path_factory.mktemp("reliability"), tiny_model)
    try:
        yield srv
    finally:
        srv.stop()


def tritonserver_pid(srv):
    kids = [pid for pid in processes.children_of(srv.proc.pid) if processes.read_stat(pid)[0] == "tritonserver"]
    assert len(kids) == 1, kids
    return kids[0]


def live_stubs(srv):
    return [pid for pid, state in processes.stubs_of(tritonserver_pid(srv)).items() if state != "Z"]


def shm_regions(srv):
    """The shared-memory regions of this launcher's servers (their names carry the launcher's pid)."""
    return [n for n in os.listdir(processes.SHM_DIR) if n.startswith(f"llm_serve_{srv.proc.pid}_")]


def is_ready(srv):
    try:
        return requests.get(f"{srv.http_url}/v2/health/ready", timeout=1).status_code == 200
    except requests.RequestException:
        return False


def generate_ok(srv):
    try:
        r = requests.post(f"{srv.http_url}/v2/models/{MODEL_NAME}/generate", timeout=10,
                          json={"text_input": "ROMEO:", "max_tokens": 4, "temperature": 0})
        return r.status_code == 200
    except requests.RequestException:
        return False


# ------------------------------------------------------------------------------ admin APIs

ADMIN_CALLS = [("POST", "/v2/logging", {"log_verbose_level": 1}),
               ("POST", "/v2/systemsharedmemory/region/x/register", {"key": "/x", "offset": 0, "byte_size": 8}),
               ("POST", "/v2/systemsharedmemory/unregister", None),
               ("POST", "/v2/repository/index", None),
               ("GET", "/v2/trace/setting", None)]


@pytest.mark.parametrize("method, path, body", ADMIN_CALLS)
def test_admin_apis_need_the_key(server, method, path, body):
    url = server.http_url + path
    for headers in ({}, {"llm-admin-key": "wrong"}):
        r = requests.request(method, url, json=body, headers=headers, timeout=10)
        assert r.status_code == 403 and "restricted" in r.text, (r.status_code, r.text)
    r = requests.request(method, url, json=body, headers=HEADER, timeout=10)
    assert "restricted" not in r.text, r.text
    # (registering /x fails once allowed: no such region; what matters is that it got that far)
    assert r.status_code == 200 or "Unable to open shared memory region" in r.text, (r.status_code, r.text)


def test_admin_apis_need_the_key_over_grpc(server):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException
    client = grpcclient.InferenceServerClient(server.grpc_url)
    with pytest.raises(InferenceServerException, match="restricted"):
        client.get_log_settings()
    with pytest.raises(InferenceServerException, match="restricted"):
        client.unregister_system_shared_memory()
    with pytest.raises(InferenceServerException, match="restricted"):
        client.get_log_settings(headers=HEADER)
    assert client.get_log_settings(headers=GRPC_HEADER, as_json=True)["settings"]
    assert client.is_server_ready() and client.get_model_metadata(MODEL_NAME).name == MODEL_NAME


def test_open_apis_stay_open(server):
    for path in ("/v2/health/live", "/v2/health/ready", "/v2", f"/v2/models/{MODEL_NAME}",
                 f"/v2/models/{MODEL_NAME}/config", f"/v2/models/{MODEL_NAME}/stats"):
        assert requests.get(server.http_url + path, timeout=10).status_code == 200, path
    assert generate_ok(server)


# ------------------------------------------------------------------------------ recovery

def stream_until_error(srv, results, i):
    """Run a long stream; record (time of its end, error text or None)."""
    body = {"text_input": "ROMEO:", "stream": True, "parameters": {"max_tokens": 4000, "ignore_eos": True}}
    error = None
    try:
        with requests.post(f"{srv.http_url}/v2/models/{MODEL_NAME}/generate_stream", json=body, stream=True,
                           timeout=30) as r:
            for line in r.iter_lines():
                if line.startswith(b"data:") and "error" in json.loads(line[5:]):
                    error = json.loads(line[5:])["error"]
            error = error or ("" if r.status_code == 200 else f"HTTP {r.status_code}")
    except requests.RequestException as e:
        error = f"{type(e).__name__}: {e}"
    results[i] = (time.monotonic(), error)


def grpc_stream_until_error(srv, results, i):
    """The same over a gRPC stream (tritonclient)."""
    import tritonclient.grpc as grpcclient
    client = grpcclient.InferenceServerClient(srv.grpc_url)
    done = threading.Event()
    errors = []

    def callback(result, error):   # tritonclient passes error= by name
        if error is not None or result.get_response().parameters["triton_final_response"].bool_param:
            errors.append(str(error) if error is not None else "")
            done.set()
    inputs = []
    for name, value, dtype in [("text_input", np.array([b"ROMEO:"], dtype=np.object_), "BYTES"),
                               ("stream", np.array([True]), "BOOL"),
                               ("sampling_parameters", np.array([json.dumps(
                                   {"max_tokens": 4000, "ignore_eos": True}).encode()], dtype=np.object_), "BYTES")]:
        tensor = grpcclient.InferInput(name, list(value.shape), dtype)
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    client.start_stream(callback=callback)
    client.async_stream_infer(MODEL_NAME, inputs, enable_empty_final_response=True)
    done.wait(timeout=30)
    results[i] = (time.monotonic(), errors[0] if errors else None)
    client.stop_stream(cancel_requests=True)
    client.close()


def wait_recovered(srv, since, limit_s=60):
    """Wait (up to limit_s after `since`) for the server to go not-ready and come back serving;
    returns whether it was seen not ready."""
    saw_not_ready = False
    while time.monotonic() - since < limit_s:
        ready = is_ready(srv)
        saw_not_ready |= not ready
        if saw_not_ready and ready and generate_ok(srv):
            break
        time.sleep(0.2)
    return saw_not_ready


def kill_stub_under_load(srv, streams=4):
    """kill -9 the stub with `streams` streams in flight (the last one over gRPC); returns what the
    test checks."""
    results = {}
    threads = [threading.Thread(target=stream_until_error if i < streams - 1 else grpc_stream_until_error,
                                args=(srv, results, i)) for i in range(streams)]
    for t in threads:
        t.start()
    time.sleep(1.5)   # the streams are generating
    assert not results, results
    regions_before = shm_regions(srv)
    server = tritonserver_pid(srv)
    [stub] = live_stubs(srv)
    os.kill(stub, signal.SIGKILL)
    killed_at = time.monotonic()
    saw_not_ready = wait_recovered(srv, killed_at)
    recovered_s = time.monotonic() - killed_at
    for t in threads:
        t.join(timeout=30)
    return {"results": results, "killed_at": killed_at, "saw_not_ready": saw_not_ready,
            "recovered_s": recovered_s, "old_stub": stub, "old_server": server, "regions_before": regions_before}


def check_recovery(srv, outcome, streams=4):
    results, killed_at = outcome["results"], outcome["killed_at"]
    assert len(results) == streams
    for ended_at, error in results.values():   # every client in flight: an error, within 10 s
        assert error, "a stream in flight ended without an error"
        assert ended_at - killed_at < 10, ended_at - killed_at
    assert outcome["saw_not_ready"], "readiness stayed true while the model was gone"
    assert outcome["recovered_s"] < 60 and generate_ok(srv), outcome["recovered_s"]
    assert processes.read_stat(outcome["old_stub"]) is None, "the dead stub was not reaped"
    assert not set(outcome["regions_before"]) & set(shm_regions(srv)), "the dead server's shm regions remain"
    return recovered_by(srv, outcome)


def recovered_by(srv, outcome):
    """Who brought the model back, each path asserted exactly: the launcher restarted tritonserver (a new
    tritonserver, and the launcher's log says why: it saw the killed stub a zombie for its grace, 1 s, or
    tritonserver itself exited after its stub died, which CI saw), or Triton's Python backend started a
    new stub in the same server (locally, Triton left a dead stub alone for 30 s)."""
    launcher = [line for line in srv.log().splitlines() if line.startswith("serve.py: ")]
    restarts = [line for line in launcher if line.endswith(": restarting tritonserver")]
    if restarts:
        assert tritonserver_pid(srv) != outcome["old_server"]
        stub_died = f"the Python-backend stub (pid {outcome['old_stub']}) died: restarting tritonserver"
        assert len(restarts) == 1 and (restarts[0].endswith(stub_died) or " tritonserver exited with " in
                                       restarts[0]), restarts
        return "the launcher: " + restarts[0].removeprefix("serve.py: ").removesuffix(": restarting tritonserver")
    stubs = live_stubs(srv)
    assert tritonserver_pid(srv) == outcome["old_server"] and stubs and outcome["old_stub"] not in stubs, \
        f"neither the launcher nor Triton restarted the stub; the launcher said: {launcher}"
    return "Triton"


def test_killed_stub_fails_requests_in_flight_and_recovers(tmp_path, tiny_model):
    srv = start_server(tmp_path, tiny_model)
    try:
        outcome = kill_stub_under_load(srv)
        by = check_recovery(srv, outcome)
        print(f"recovered by {by} {outcome['recovered_s']:.1f} s after the kill; streams ended "
              f"{max(t for t, _ in outcome['results'].values()) - outcome['killed_at']:.1f} s after it")
    finally:
        srv.stop()


def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def test_killed_engine_core_process_fails_requests_in_flight_and_recovers(tmp_path, tiny_model):
    """engine_core_process: kill -9 the core's process under load; every stream in flight ends with an
    error, the stub exits (a model without its core cannot serve) and the launcher brings it back."""
    srv = start_server(tmp_path, tiny_model, engine_core_process="true")
    try:
        [stub] = live_stubs(srv)
        [core] = [pid for pid in processes.children_of(stub) if b"spawn_main" in cmdline(pid)]   # not the resource tracker
        results = {}
        threads = [threading.Thread(target=stream_until_error, args=(srv, results, i)) for i in range(3)]
        for t in threads:
            t.start()
        time.sleep(1.5)   # the streams are generating
        assert not results, results
        os.kill(core, signal.SIGKILL)
        killed_at = time.monotonic()
        for t in threads:
            t.join(timeout=30)
        assert len(results) == 3
        for ended_at, error in results.values():
            assert error and ended_at - killed_at < 10, (error, ended_at - killed_at)
        assert wait_recovered(srv, killed_at) and generate_ok(srv), "the server did not come back after its core died"
        assert stub not in live_stubs(srv) and "the engine core process exited" in srv.log()
    finally:
        srv.stop()


def test_crashed_tritonserver_is_restarted_without_orphans(tmp_path, tiny_model):
    srv = start_server(tmp_path, tiny_model)
    try:
        old_server, old_stubs = tritonserver_pid(srv), live_stubs(srv)
        os.kill(old_server, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (is_ready(srv) and generate_ok(srv)):
            time.sleep(0.25)
        assert generate_ok(srv)
        assert all(processes.read_stat(pid) is None for pid in [old_server, *old_stubs]), "orphans remain"
        assert tritonserver_pid(srv) != old_server
    finally:
        srv.stop()


# ------------------------------------------------------------------------------ nothing left behind

def group_members(pgid):
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == pgid:
                    members.append(int(entry))
            except ProcessLookupError:
                pass
    return members


def wait_gone(pids, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(processes.read_stat(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if processes.read_stat(p)]


def test_stop_leaves_nothing_behind(tmp_path, tiny_model):
    srv = start_server(tmp_path, tiny_model)
    server_pid, stubs = tritonserver_pid(srv), live_stubs(srv)
    assert stubs and shm_regions(srv)
    launcher = srv.proc.pid
    assert srv.stop() == 0
    assert wait_gone([server_pid, *stubs], 5) == [] and group_members(server_pid) == []
    assert [n for n in os.listdir(processes.SHM_DIR) if n.startswith(f"llm_serve_{launcher}_")] == []


def test_killed_launcher_takes_the_server_with_it(tmp_path, tiny_model):
    srv = start_server(tmp_path, tiny_model)
    server_pid, stubs = tritonserver_pid(srv), live_stubs(srv)
    regions = shm_regions(srv)
    os.kill(srv.proc.pid, signal.SIGKILL)   # no chance to clean up: the server gets SIGTERM from the kernel
    try:
        assert wait_gone([server_pid, *stubs], 30) == []
        assert not set(regions) & set(os.listdir(processes.SHM_DIR)), "the server's shm regions remain"
    finally:
        srv.stop()


# ------------------------------------------------------------------------------ soak

@soak
def test_repeated_stub_kills_under_load(tmp_path, tiny_model):
    srv = start_server(tmp_path, tiny_model)
    try:
        for _ in range(5):
            check_recovery(srv, kill_stub_under_load(srv, streams=8), streams=8)
    finally:
        srv.stop()
