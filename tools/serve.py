#!/usr/bin/env python3
"""Launch Triton Inference Server on this repository's model repository, and keep it serving.

The server binary, its Python backend and the backend stubs come from the `nvidia-pytriton`
wheel (``pytriton/tritonserver``) installed in the running interpreter's environment, or from
``$TRITONSERVER_ROOT`` (bin/tritonserver, backends/python, python_backend_stubs/3.X), which
the GPU bundle exports. The stub for the running Python is copied next to the Python backend
in a writable folder (``.triton/`` in the repository), and the running interpreter's bin
folder is put first on PATH: the stub runs the model in the environment of the first
``python3`` on PATH.

    python tools/serve.py                                  # HTTP 8000, gRPC 8001, metrics 8002, OpenAI 9000
    python tools/serve.py --http-port 9000 --model-repository /tmp/repo -- --log-verbose=1

Unknown arguments are passed through to tritonserver.

Safe defaults: the server listens on 127.0.0.1; the shared-memory, model-repository, logging and
trace APIs need the header `llm-admin-key: $LLM_ADMIN_KEY` (without the variable, a random key
that nobody knows). tritonserver runs as a child that supervisor.py restarts when its
Python-backend stub dies or it crashes; stopping the launcher stops it and leaves nothing behind.

Beside the server runs the OpenAI-compatible front (entrypoints/api_server.py: /v1/completions,
/v1/chat/completions, /v1/models, /health and vLLM's /generate) on --openai-port (0: none), which
sends each request to the served model over gRPC; it is restarted on its own if it dies.

The backend directory also gets a Python-based backend `vllm` (model_repository/llm/1/model.py, which serves both): a model
repository written for Triton's vLLM backend (config.pbtxt `backend: "vllm"`, 1/model.json of vLLM
engine arguments) loads unchanged, served by this engine.
"""
import argparse
import glob
import hashlib
import os
import re
import secrets
import shutil
import sys
import sysconfig
import tempfile

from supervisor import Companion, Supervisor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYVER = f"{sys.version_info.major}.{sys.version_info.minor}"
ADMIN_HEADER = "llm-admin-key"
ADMIN_KEY_ENV = "LLM_ADMIN_KEY"
API_KEY_ENV = "VLLM_API_KEY"     # the OpenAI front's key for clients, as vLLM's server reads it
# Endpoints a client must not reach: shared-memory registration makes the server read and write
# memory a client names; the repository API loads and unloads models; logging and trace settings
# change what the server writes to disk. Inference, health, metadata, model config and statistics
# stay open (perf_analyzer and genai-perf read the last two).
ADMIN_APIS = "shared-memory,model-repository,logging,trace"
# Our Python-based backend for repositories written for Triton's vLLM backend (backend: "vllm").
VLLM_BACKEND_NAME = "vllm"
VLLM_BACKEND = os.path.join(REPO, "model_repository", "llm", "1", "model.py")   # serves both


def find_server_root():
    """Return (server_root, [library folders]) for the Triton server to run."""
    root = os.environ.get("TRITONSERVER_ROOT")
    if root:
        root = os.path.abspath(root)
        if not os.path.isfile(os.path.join(root, "bin", "tritonserver")):
            sys.exit(f"serve.py: TRITONSERVER_ROOT={root} has no bin/tritonserver")
    else:
        try:
            import pytriton
        except ImportError:
            sys.exit("serve.py: no tritonserver: install nvidia-pytriton (make install) "
                     "or set TRITONSERVER_ROOT")
        root = os.path.join(os.path.dirname(os.path.abspath(pytriton.__file__)), "tritonserver")
        if not os.path.isfile(os.path.join(root, "bin", "tritonserver")):
            sys.exit(f"serve.py: {root} has no bin/tritonserver")
    libs = []
    # The wheel keeps the server's shared libraries in site-packages/nvidia_pytriton.libs.
    cand = os.path.normpath(os.path.join(root, "..", "..", "nvidia_pytriton.libs"))
    if os.path.isdir(cand):
        libs.append(cand)
    # The stub links libpython3.X.so: prefer the one of the running interpreter.
    libdir = sysconfig.get_config_var("LIBDIR")
    if (sysconfig.get_config_var("Py_ENABLE_SHARED") and libdir
            and glob.glob(os.path.join(libdir, f"libpython{PYVER}*.so*"))):
        libs.append(libdir)
    return root, libs


def _tree_signature(path):
    st = os.stat(path)
    return f"{path}:{st.st_size}:{int(st.st_mtime)}"


def prepare_backends(root, work_dir):
    """A backend directory for tritonserver under work_dir: root/backends with the stub of this
    Python in backends/python (copied), or, for a server image that already carries its stub,
    links to root/backends' folders; in both, our Python-based backend `vllm` (VLLM_BACKEND)."""
    stub = os.path.join(root, "python_backend_stubs", PYVER, "triton_python_backend_stub")
    existing = os.path.join(root, "backends", "python", "triton_python_backend_stub")
    if not os.path.isfile(stub):
        if os.path.isfile(existing):
            dest = _linked_backends(root, work_dir)  # a server image that already carries its stub
            install_vllm_backend(dest)
            return dest
        sys.exit(f"serve.py: no Python backend stub for Python {PYVER} under {root}")
    signature = "\n".join([_tree_signature(os.path.join(root, "backends", "python", "libtriton_python.so")),
                           _tree_signature(stub)])
    dest = os.path.join(work_dir, f"backends-py{PYVER}")
    stamp = os.path.join(dest, ".source")
    if not (os.path.isfile(stamp) and open(stamp).read() == signature):
        os.makedirs(work_dir, exist_ok=True)
        # Build beside the target and rename into place, so that two launches at once don't clash.
        tmp = tempfile.mkdtemp(prefix=".backends-", dir=work_dir)
        shutil.copytree(os.path.join(root, "backends"), os.path.join(tmp, "b"), symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
        target_stub = os.path.join(tmp, "b", "python", "triton_python_backend_stub")
        if os.path.abspath(stub) != os.path.abspath(existing):
            shutil.copy2(stub, target_stub)
        os.chmod(target_stub, 0o755)
        with open(os.path.join(tmp, "b", ".source"), "w") as f:
            f.write(signature)
        _publish(os.path.join(tmp, "b"), dest, work_dir)
        shutil.rmtree(tmp, ignore_errors=True)
    install_vllm_backend(dest)
    return dest


def _linked_backends(root, work_dir):
    """work_dir/backends-linked-<root>: a link to each backend of root/backends (the image's own
    `vllm`, if any, left out: install_vllm_backend puts ours in its place)."""
    source = os.path.join(root, "backends")
    signature = "\n".join([os.path.abspath(source)] + sorted(os.listdir(source)))
    dest = os.path.join(work_dir, "backends-linked-" + hashlib.sha256(signature.encode()).hexdigest()[:12])
    stamp = os.path.join(dest, ".source")
    if os.path.isfile(stamp) and open(stamp).read() == signature:
        return dest
    os.makedirs(work_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".backends-", dir=work_dir)
    os.mkdir(os.path.join(tmp, "b"))
    for name in os.listdir(source):
        if name != VLLM_BACKEND_NAME:
            os.symlink(os.path.abspath(os.path.join(source, name)), os.path.join(tmp, "b", name))
    with open(os.path.join(tmp, "b", ".source"), "w") as f:
        f.write(signature)
    _publish(os.path.join(tmp, "b"), dest, work_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _publish(built, dest, work_dir):
    """Rename the folder `built` to `dest`, replacing an older one; another launch that won the race keeps its own."""
    old = None
    if os.path.exists(dest):
        old = tempfile.mkdtemp(prefix=".old-", dir=work_dir)
        try:
            os.rename(dest, os.path.join(old, "b"))
        except OSError:
            pass
    try:
        os.rename(built, dest)
    except OSError:  # another launch won the race: use its copy
        pass
    if old:
        shutil.rmtree(old, ignore_errors=True)


def install_vllm_backend(backends):
    """Put our Python-based backend `vllm` in the backend directory: Triton runs
    <backends>/vllm/model.py with backends/python's library and stub for each model whose
    config.pbtxt says backend: "vllm" (a repository written for Triton's vLLM backend)."""
    folder = os.path.join(backends, VLLM_BACKEND_NAME)
    target = os.path.join(folder, "model.py")
    code = open(VLLM_BACKEND).read()
    if os.path.islink(folder):
        os.unlink(folder)
    if os.path.isfile(target) and not os.path.islink(target) and open(target).read() == code:
        return
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".model-", suffix=".py", dir=folder)
    with os.fdopen(fd, "w") as f:
        f.write(code)
    os.chmod(tmp, 0o644)
    os.replace(tmp, target)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repository", default=os.path.join(REPO, "model_repository"))
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--openai-port", type=int, default=9000,
                   help="port of the OpenAI-compatible front and vLLM's /generate (0: don't start it)")
    p.add_argument("--openai-model", default="llm", help="the model the OpenAI front serves")
    p.add_argument("--openai-workers", type=int, default=max(1, min(4, (os.cpu_count() or 1) // 4)),
                   help="processes of the OpenAI front sharing its port (default: a quarter of the CPUs, "
                        "1 to 4); one streams a few thousand chunks/s")
    p.add_argument("--served-model-name", nargs="+", default=[],
                   help="names clients give as 'model' to the OpenAI front (default: the model's, llm)")
    p.add_argument("--chat-template", default=None,
                   help="a jinja chat template (file) for the OpenAI front instead of the tokenizer's")
    p.add_argument("--address", default="127.0.0.1",
                   help="address for HTTP, gRPC, metrics and the OpenAI front (0.0.0.0 to listen on all)")
    p.add_argument("--work-dir", default=os.environ.get("LLM_TRITON_WORK_DIR", os.path.join(REPO, ".triton")),
                   help="writable folder for the backend copy (default: .triton in the repository)")
    p.add_argument("--admin-apis", default=ADMIN_APIS,
                   help=f"APIs that need the header '{ADMIN_HEADER}: ${ADMIN_KEY_ENV}' "
                        f"(default: {ADMIN_APIS}; 'none': leave every API open)")
    p.add_argument("--max-restarts", type=int, default=5,
                   help="most restarts of tritonserver within 10 minutes before the launcher gives up "
                        "and exits with an error (0: never restart)")
    p.add_argument("--print-command", action="store_true", help="print the command and environment, don't run")
    args, extra = p.parse_known_args(argv)
    if extra and extra[0] == "--":
        extra = extra[1:]
    return args, extra


def admin_key():
    """$LLM_ADMIN_KEY, else a random key: the restricted APIs are then closed to everyone."""
    key = os.environ.get(ADMIN_KEY_ENV)
    if not key:
        return secrets.token_urlsafe(32)
    # Triton parses "<apis>:<header>=<key>" (and the API list at commas): keep the key plain.
    if not re.fullmatch(r"[A-Za-z0-9._~+/-]{16,}", key):
        sys.exit(f"serve.py: {ADMIN_KEY_ENV} must be at least 16 characters of A-Z a-z 0-9 . _ ~ + / -")
    return key


def _has_flag(extra, flag):
    return any(a == flag or a.startswith(flag + "=") for a in extra)


def _flag_value(extra, flag, default):
    for i, a in enumerate(extra):
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
        if a == flag and i + 1 < len(extra):
            return extra[i + 1]
    return default


def security_args(apis, key, extra):
    """Triton's flags that put `apis` behind the admin header, unless the caller passed its own."""
    if apis.strip().lower() in ("", "none"):
        return []
    args = []
    if not _has_flag(extra, "--http-restricted-api"):
        args.append(f"--http-restricted-api={apis}:{ADMIN_HEADER}={key}")
    if not _has_flag(extra, "--grpc-restricted-protocol"):
        args.append(f"--grpc-restricted-protocol={apis}:{ADMIN_HEADER}={key}")
    return args


def shm_args(extra):
    """A shared-memory prefix of this launcher's own, so that it can remove exactly the regions its
    server left behind (a killed server never removes them). Returns (args, prefix or None)."""
    if any("shm-region-prefix-name" in a for a in extra):
        return [], None     # the caller chose a prefix: its regions are the caller's to manage
    prefix = f"llm_serve_{os.getpid()}_{secrets.token_hex(3)}_"
    return ["--backend-config", f"python,shm-region-prefix-name={prefix}"], prefix


def server_env(libs):
    env = dict(os.environ)
    env.pop(ADMIN_KEY_ENV, None)   # the server's processes (and the model's code) have no use for it
    env.pop(API_KEY_ENV, None)     # the OpenAI front's (openai_front gives it back to the front alone)
    bindir = os.path.dirname(sys.executable)  # not resolved: a venv's bin/ is what we want
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    if sys.prefix != sys.base_prefix:
        env["VIRTUAL_ENV"] = sys.prefix
    env.pop("PYTHONHOME", None)
    ld = [x for x in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if x]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [x for x in ld if x not in libs])
    # The stub imports the engine package `backend` from this checkout, also in an environment
    # without `pip install -e .` (a GPU host's bundle venv).
    env["PYTHONPATH"] = os.pathsep.join([REPO] + [x for x in env.get("PYTHONPATH", "").split(os.pathsep)
                                                  if x and x != REPO])
    return env


def local_host(address):
    """How this host reaches a server listening on `address` (a wildcard address: loopback)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1"}.get(address, address)
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def ready_url(args):
    return f"http://{local_host(args.address)}:{args.http_port}/v2/health/ready"


def openai_front(args, env):
    """The OpenAI front as a companion process, or None (--openai-port 0)."""
    if not args.openai_port:
        return None
    cmd = [sys.executable, "-m", "entrypoints.api_server", "--host", args.address, "--port", str(args.openai_port),
           "--triton-url", f"{local_host(args.address)}:{args.grpc_port}", "--model", args.openai_model,
           "--metrics-url", f"http://{local_host(args.address)}:{args.metrics_port}/metrics",
           "--model-repository", os.path.abspath(args.model_repository), "--workers", str(args.openai_workers)]
    if args.chat_template:
        cmd += ["--chat-template", os.path.abspath(args.chat_template)]
    if args.served_model_name:
        cmd += ["--served-model-name", *args.served_model_name]
    if os.environ.get(API_KEY_ENV):
        env = dict(env, **{API_KEY_ENV: os.environ[API_KEY_ENV]})
    return Companion("the OpenAI front", cmd, env)


def main(argv=None):
    args, extra = parse_args(argv)
    root, libs = find_server_root()
    work_dir = args.work_dir
    try:
        os.makedirs(work_dir, exist_ok=True)
        backends = prepare_backends(root, work_dir)
    except OSError:  # read-only checkout: use a temporary folder
        backends = prepare_backends(root, os.path.join(tempfile.gettempdir(), f"llm-triton-{os.getuid()}"))

    key = admin_key()
    shm, shm_prefix = shm_args(extra)
    cmd = [os.path.join(root, "bin", "tritonserver"),
           "--model-repository", os.path.abspath(args.model_repository),
           "--backend-directory", backends,
           "--http-address", args.address, "--http-port", str(args.http_port),
           "--grpc-address", args.address, "--grpc-port", str(args.grpc_port),
           "--metrics-address", args.address, "--metrics-port", str(args.metrics_port),
           *security_args(args.admin_apis, key, extra), *shm, *extra]
    env = server_env(libs)
    front = openai_front(args, env)
    if args.print_command:
        for k in ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH"):
            print(f"{k}={env[k]}")
        print(" ".join(cmd).replace(key, "<admin key>"))
        if front is not None:
            print(" ".join(front.cmd))
        return 0
    sys.stdout.flush()
    exit_timeout = float(_flag_value(extra, "--exit-timeout-secs", 30))
    supervisor = Supervisor(cmd, env, ready_url(args), shm_prefix, exit_timeout_s=exit_timeout,
                            max_restarts=args.max_restarts, companions=[front] if front else [])
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
