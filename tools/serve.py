#!/usr/bin/env python3
"""Launch Triton Inference Server on this repository's model repository.

The server binary, its Python backend and the backend stubs come from the `nvidia-pytriton`
wheel (``pytriton/tritonserver``) installed in the running interpreter's environment, or from
``$TRITONSERVER_ROOT`` (bin/tritonserver, backends/python, python_backend_stubs/3.X), which
the GPU bundle exports. The stub for the running Python is copied next to the Python backend
in a writable folder (``.triton/`` in the repository), and the running interpreter's bin
folder is put first on PATH: the stub runs the model in the environment of the first
``python3`` on PATH.

    python tools/serve.py                                  # HTTP 8000, gRPC 8001, metrics 8002
    python tools/serve.py --http-port 9000 --model-repository /tmp/repo -- --log-verbose=1

Unknown arguments are passed through to tritonserver.
"""
import argparse
import glob
import os
import shutil
import sys
import sysconfig
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYVER = f"{sys.version_info.major}.{sys.version_info.minor}"


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
    """Copy root/backends to work_dir/backends-<py> with the stub of this Python in backends/python."""
    stub = os.path.join(root, "python_backend_stubs", PYVER, "triton_python_backend_stub")
    existing = os.path.join(root, "backends", "python", "triton_python_backend_stub")
    if not os.path.isfile(stub):
        if os.path.isfile(existing):
            stub = existing  # a server image that already carries its stub
        else:
            sys.exit(f"serve.py: no Python backend stub for Python {PYVER} under {root}")
    signature = "\n".join([_tree_signature(os.path.join(root, "backends", "python", "libtriton_python.so")),
                           _tree_signature(stub)])
    dest = os.path.join(work_dir, f"backends-py{PYVER}")
    stamp = os.path.join(dest, ".source")
    if os.path.isfile(stamp) and open(stamp).read() == signature:
        return dest
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
    old = None
    if os.path.exists(dest):
        old = tempfile.mkdtemp(prefix=".old-", dir=work_dir)
        try:
            os.rename(dest, os.path.join(old, "b"))
        except OSError:
            pass
    try:
        os.rename(os.path.join(tmp, "b"), dest)
    except OSError:  # another launch won the race: use its copy
        pass
    shutil.rmtree(tmp, ignore_errors=True)
    if old:
        shutil.rmtree(old, ignore_errors=True)
    return dest


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repository", default=os.path.join(REPO, "model_repository"))
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--address", default="127.0.0.1",
                   help="address for HTTP, gRPC and metrics (0.0.0.0 to listen on all)")
    p.add_argument("--work-dir", default=os.environ.get("LLM_TRITON_WORK_DIR", os.path.join(REPO, ".triton")),
                   help="writable folder for the backend copy (default: .triton in the repository)")
    p.add_argument("--print-command", action="store_true", help="print the command and environment, don't run")
    args, extra = p.parse_known_args(argv)
    if extra and extra[0] == "--":
        extra = extra[1:]

    root, libs = find_server_root()
    work_dir = args.work_dir
    try:
        os.makedirs(work_dir, exist_ok=True)
        backends = prepare_backends(root, work_dir)
    except OSError:  # read-only checkout: use a temporary folder
        backends = prepare_backends(root, os.path.join(tempfile.gettempdir(), f"llm-triton-{os.getuid()}"))

    env = dict(os.environ)
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

    cmd = [os.path.join(root, "bin", "tritonserver"),
           "--model-repository", os.path.abspath(args.model_repository),
           "--backend-directory", backends,
           "--http-address", args.address, "--http-port", str(args.http_port),
           "--grpc-address", args.address, "--grpc-port", str(args.grpc_port),
           "--metrics-address", args.address, "--metrics-port", str(args.metrics_port),
           *extra]
    if args.print_command:
        for k in ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH"):
            print(f"{k}={env[k]}")
        print(" ".join(cmd))
        return 0
    sys.stdout.flush()
    os.execve(cmd[0], cmd, env)


if __name__ == "__main__":
    sys.exit(main())
