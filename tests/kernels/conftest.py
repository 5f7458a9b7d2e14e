"""Kernel tests run the Triton kernels everywhere: compiled on CUDA, under the Triton interpreter on CPU.

Triton reads TRITON_INTERPRET when it is imported (its own library functions are decorated then) and
when kernels are decorated and run. The kernels package imports triton only at a kernel's first launch
(kernels.dispatch.lazy_jit), so on a machine without CUDA this file imports triton with the variable
set (re-importing triton's Python modules if something imported them earlier: transformers imports
torch._dynamo, which imports triton), then removes it again; the autouse fixture sets it (and
LLM_KERNELS=triton) around each kernel test only, so nothing leaks into the rest of the suite or the
processes it starts (which use the torch references on CPU anyway). With CUDA nothing is
interpreted: the kernels compile for the GPU.
"""
import os
import sys

import pytest
import torch

INTERPRET = not torch.cuda.is_available()


def _import_triton_interpreted():
    prev = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        if "triton" in sys.modules and type(sys.modules["triton"].language.standard.cdiv).__name__ == "JITFunction":
            # Imported compiled-mode earlier in this process (transformers imports torch._dynamo, which
            # imports triton): re-import its Python modules under the interpreter. The C extension
            # (triton._C) stays: it cannot be loaded twice.
            for name in [m for m in sys.modules if m == "triton" or m.startswith("triton.")]:
                if not (name == "triton._C" or name.startswith("triton._C.")):
                    del sys.modules[name]
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    finally:
        if prev is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = prev


if INTERPRET:
    _import_triton_interpreted()


@pytest.fixture(autouse=True)
def _triton_kernels(monkeypatch):
    monkeypatch.setenv("LLM_KERNELS", "triton")
    if INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield
