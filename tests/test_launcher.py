"""tools/serve.py's command line and tools/supervisor.py's exit and restart rules, without a real
server (tests/e2e/test_reliability.py runs them against tritonserver)."""
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import processes  # noqa: E402
import serve  # noqa: E402


def test_admin_apis_restricted_by_default_with_a_random_key(monkeypatch):
    monkeypatch.delenv("LLM_ADMIN_KEY", raising=False)
    key = serve.admin_key()
    assert len(key) >= 32 and key != serve.admin_key()
    args = serve.security_args(serve.ADMIN_APIS, key, extra=[])
    assert args == [f"--http-restricted-api=shared-memory,model-repository,logging,trace:llm-admin-key={key}",
                    f"--grpc-restricted-protocol=shared-memory,model-repository,logging,trace:llm-admin-key={key}"]


def test_admin_key_from_the_environment(monkeypatch):
    monkeypatch.setenv("LLM_ADMIN_KEY", "a-long-enough-key-123")
    assert serve.admin_key() == "a-long-enough-key-123"
    for bad in ("short", "has:colon-in-it-0123", "has=equals-in-it-0123", "has,comma-in-it-0123"):
        monkeypatch.setenv("LLM_ADMIN_KEY", bad)
        with pytest.raises(SystemExit, match="LLM_ADMIN_KEY"):
            serve.admin_key()


def test_callers_own_restrictions_replace_ours():
    assert serve.security_args("none", "k" * 20, []) == []
    args = serve.security_args(serve.ADMIN_APIS, "k" * 20, ["--http-restricted-api=logging:x=y"])
    assert len(args) == 1 and args[0].startswith("--grpc-restricted-protocol=")


def test_shm_prefix_is_the_launchers_own():
    args, prefix = serve.shm_args([])
    assert prefix.startswith(f"llm_serve_{os.getpid()}_") and args[-1].endswith(prefix)
    assert serve.shm_args(["--backend-config=python,shm-region-prefix-name=mine"]) == ([], None)
    assert processes.remove_shm_regions("") == []     # never "every region"


def test_ready_url_reaches_wildcard_addresses_through_loopback():
    def url(address):
        return serve.ready_url(type("Args", (), {"address": address, "http_port": 9})())
    assert url("0.0.0.0") == "http://127.0.0.1:9/v2/health/ready"
    assert url("::") == "http://[::1]:9/v2/health/ready"
    assert url("10.1.2.3") == "http://10.1.2.3:9/v2/health/ready"


def test_a_server_image_with_its_stub_in_place_is_linked_not_copied_and_gets_our_vllm(tmp_path):
    backends = tmp_path / "root" / "backends"
    python = backends / "python"
    python.mkdir(parents=True)
    (python / "triton_python_backend_stub").write_text("")
    (python / "libtriton_python.so").write_text("")
    (backends / "onnxruntime").mkdir()
    (backends / "vllm").mkdir()            # an image's own vLLM backend: ours takes its place
    (backends / "vllm" / "model.py").write_text("theirs")
    dest = serve.prepare_backends(str(tmp_path / "root"), str(tmp_path / "work"))
    assert dest.startswith(str(tmp_path / "work"))
    assert os.path.realpath(os.path.join(dest, "python")) == str(python)
    assert os.path.realpath(os.path.join(dest, "onnxruntime")) == str(backends / "onnxruntime")
    assert not os.path.islink(os.path.join(dest, "vllm"))
    assert open(os.path.join(dest, "vllm", "model.py")).read() == open(serve.VLLM_BACKEND).read()
    assert (backends / "vllm" / "model.py").read_text() == "theirs"      # the image is left as it is
    assert serve.prepare_backends(str(tmp_path / "root"), str(tmp_path / "work")) == dest   # reused


def test_the_wheels_backends_are_copied_with_the_stub_and_our_vllm(tmp_path):
    root = tmp_path / "root"
    (root / "backends" / "python").mkdir(parents=True)
    (root / "backends" / "python" / "libtriton_python.so").write_text("lib")
    stubs = root / "python_backend_stubs" / serve.PYVER
    stubs.mkdir(parents=True)
    (stubs / "triton_python_backend_stub").write_text("stub")
    dest = serve.prepare_backends(str(root), str(tmp_path / "work"))
    assert open(os.path.join(dest, "python", "triton_python_backend_stub")).read() == "stub"
    vllm = os.path.join(dest, "vllm", "model.py")
    assert open(vllm).read() == open(serve.VLLM_BACKEND).read()
    with open(vllm, "w") as f:             # an older copy is brought up to date at the next launch
        f.write("old")
    assert serve.prepare_backends(str(root), str(tmp_path / "work")) == dest
    assert open(vllm).read() == open(serve.VLLM_BACKEND).read()


def test_process_helpers_see_a_child():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert child.pid in processes.children_of(os.getpid())
        comm, state, ppid = processes.read_stat(child.pid)
        assert ppid == os.getpid() and state in "RSD"
    finally:
        child.kill()
        child.wait()
    assert processes.read_stat(child.pid) is None


def run_supervisor(server_code, max_restarts=2):
    """Supervise `python -c server_code` in a separate process (the supervisor reaps every child of
    its process and installs signal handlers: not in pytest's). Returns (exit code, stderr)."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.join(ROOT, "tools")!r})
        import supervisor
        supervisor.RESTART_PAUSE_S = 0.1
        cmd = [sys.executable, "-c", {server_code!r}]
        sys.exit(supervisor.Supervisor(cmd, None, "http://127.0.0.1:9/v2/health/ready", None,
                                       max_restarts={max_restarts}, poll_s=0.05).run())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    return done.returncode, done.stderr


def test_a_server_that_fails_to_start_is_not_restarted():
    rc, err = run_supervisor("import sys; sys.exit(3)")
    assert rc == 3 and "restarting" not in err, err


def test_a_server_that_exits_cleanly_ends_the_launcher():
    rc, err = run_supervisor("pass")
    assert rc == 0 and "restarting" not in err, err


def test_a_crashing_server_is_restarted_until_the_budget_is_spent():
    rc, err = run_supervisor("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", max_restarts=2)
    assert rc == 1, err
    assert err.count("restarting tritonserver") == 2 and "giving up" in err, err
