"""Triton Python-backend model: the glue lives in triton_glue/model.py, the engine in backend/.

The same file is the Python-based backend `vllm`: tools/serve.py copies it to
<backend-directory>/vllm/model.py, so that a model repository written for Triton's vLLM backend
(config.pbtxt `backend: "vllm"`, <version>/model.json of vLLM engine arguments) loads unchanged."""
import os
import sys

# Triton's Python stub leaves PYTHONPATH out of sys.path, and its working directory comes first:
# put PYTHONPATH's folders (tools/serve.py names the served checkout there) ahead of everything, so
# that a server started from inside another checkout still runs the engine it was launched with.
for _folder in reversed([p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]):
    if _folder in sys.path:
        sys.path.remove(_folder)
    sys.path.insert(0, _folder)

try:
    from triton_glue.model import TritonPythonModel  # noqa: F401
except ModuleNotFoundError as e:
    if e.name != "triton_glue":
        raise
    raise ModuleNotFoundError(f"{e}: install the engine package (`pip install -e .` in the repository, as "
                              "`make install` does) or start the server with tools/serve.py") from e
