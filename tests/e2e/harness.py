"""A real tritonserver started through tools/serve.py on free ports, for the end-to-end tests.

The session server (conftest.py) serves a temporary model repository: the repository's config.pbtxt and
1/model.py with `model` pointing at a tiny random Llama checkpoint (tests/checkpoints.py).
model.py imports the engine package from this checkout: serve.py puts it first on PYTHONPATH.
"""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

MODEL_NAME = "llm"
READY_TIMEOUT_S = float(os.environ.get("E2E_READY_TIMEOUT_S", "120"))


def grpc_input(name, value, dtype):
    """A tritonclient gRPC input holding the numpy array `value` (dtype: Triton's name, e.g. "BYTES")."""
    import tritonclient.grpc as grpcclient
    tensor = grpcclient.InferInput(name, list(value.shape), dtype)
    tensor.set_data_from_numpy(value)
    return tensor


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model_repository(dest, model_path, **parameters):
    """Copy model_repository/llm into dest/llm with `model` (and other parameters) replaced."""
    src = os.path.join(REPO, "model_repository", MODEL_NAME)
    os.makedirs(os.path.join(dest, MODEL_NAME, "1"), exist_ok=True)
    shutil.copy(os.path.join(src, "1", "model.py"), os.path.join(dest, MODEL_NAME, "1", "model.py"))
    config = open(os.path.join(src, "config.pbtxt")).read()
    for key, value in {"model": model_path, **parameters}.items():
        pattern = r'(\{\s*key:\s*"%s"\s*,\s*value:\s*\{\s*string_value:\s*)"[^"]*"' % re.escape(key)
        config, n = re.subn(pattern, lambda m: m.group(1) + '"%s"' % value, config)
        assert n == 1, f"parameter {key!r} not found in config.pbtxt"
    with open(os.path.join(dest, MODEL_NAME, "config.pbtxt"), "w") as f:
        f.write(config)
    return dest


class Server:
    """tritonserver via tools/serve.py; its output goes to log_path."""

    def __init__(self, model_repository, log_path, extra_args=(), env=None, cwd=None):
        self.model_repository = model_repository
        self.log_path = log_path
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        self.openai_port = free_port()
        self.http_url = f"http://127.0.0.1:{self.http_port}"
        self.openai_url = f"http://127.0.0.1:{self.openai_port}"
        self.grpc_url = f"127.0.0.1:{self.grpc_port}"
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.cwd = cwd    # the launcher's working directory (default: this process's)
        self.proc = None

    def start(self):
        cmd = [sys.executable, os.path.join(REPO, "tools", "serve.py"),
               "--model-repository", str(self.model_repository),
               "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
               "--metrics-port", str(self.metrics_port), "--openai-port", str(self.openai_port),
               "--exit-timeout-secs", "10", *self.extra_args]
        env = dict(os.environ, **self.env)
        self._log = open(self.log_path, "w")
        # A session of its own for the launcher. (The launcher runs tritonserver in a process group
        # of its own; that server gets SIGTERM when the launcher dies, even by SIGKILL.)
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=self.cwd,
                                     start_new_session=True)
        return self

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def wait_ready(self, timeout=READY_TIMEOUT_S, model=MODEL_NAME):
        deadline = time.monotonic() + timeout
        url = f"{self.http_url}/v2/models/{model}/ready"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"tritonserver exited with {self.proc.returncode} before the model was ready; "
                            f"log:\n{self.log()[-20000:]}")
            try:
                if requests.get(url, timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.25)
        self.stop()
        pytest.fail(f"the model was not ready after {timeout:.0f} s; log:\n{self.log()[-20000:]}")

    def wait_exit(self, timeout):
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout=30):
        """SIGTERM (graceful: Triton unloads the model, finalize() runs), then SIGKILL. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            if self.wait_exit(timeout) is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()
        else:  # the server is gone; its stub should be too, but make sure
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._log.close()
        return self.proc.returncode


