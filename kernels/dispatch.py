import functools
import importlib.util
import os

import torch


def use_triton(t: torch.Tensor) -> bool:
    """Triton kernels on CUDA tensors (or anywhere under TRITON_INTERPRET=1 when LLM_KERNELS=triton);
    torch references otherwise. LLM_KERNELS=reference forces the references."""
    mode = os.environ.get("LLM_KERNELS", "auto")
    if mode == "reference":
        return False
    if mode == "triton":
        if not has_triton():
            raise RuntimeError("LLM_KERNELS=triton but triton is not installed")
        return True
    return t.is_cuda and has_triton()


@functools.lru_cache(maxsize=None)
def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


class lazy_jit:
    """`@triton.jit`, deferred to the kernel's first launch.

    `import kernels` then needs no triton (and does not import it), and the compiled-or-interpreted
    choice (TRITON_INTERPRET, which triton reads when it is imported and when it decorates) is made
    when kernels first run, not when the package happens to be imported. On first launch of any
    kernel of a module, triton is imported, `triton` and `tl` are bound in that module's globals
    (kernel bodies use them; modules using this write `from __future__ import annotations` so
    parameter annotations such as `tl.constexpr` stay strings until then), and every lazy_jit
    function of the module is decorated and rebinds its global name, so kernels that call helper
    kernels resolve them as jit functions.
    """

    def __init__(self, fn=None, **jit_kwargs):
        self.fn, self.jit_kwargs = fn, jit_kwargs
        if fn is not None:
            functools.update_wrapper(self, fn)

    def __call__(self, fn):
        """`@lazy_jit(do_not_specialize=[...])`: keyword arguments go to triton.jit."""
        return lazy_jit(fn, **self.jit_kwargs)

    def jitted(self):
        g = self.fn.__globals__
        if g.get(self.fn.__name__) is self:
            import triton
            import triton.language as tl
            g["triton"], g["tl"] = triton, tl
            for name, obj in list(g.items()):
                if isinstance(obj, lazy_jit):
                    g[name] = triton.jit(obj.fn, **obj.jit_kwargs)
        return g[self.fn.__name__]

    def __getitem__(self, grid):
        return self.jitted()[grid]


def next_pow2(n: int) -> int:
    return 1 << (max(int(n), 1) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def num_warps_for(block: int) -> int:
    """Warps for a one-row-per-program elementwise/reduction kernel of `block` elements."""
    return 4 if block <= 1024 else 8 if block <= 4096 else 16
