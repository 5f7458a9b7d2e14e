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


def interpreted() -> bool:
    """Whether Triton runs kernels in its interpreter (TRITON_INTERPRET=1: CPU tests) rather than compiled."""
    return os.environ.get("TRITON_INTERPRET") == "1"


class lazy_jit:
    """`@triton.jit`, deferred to the kernel's first launch.

    `import kernels` then needs no triton (and does not import it), and the compiled-or-interpreted
    choice (TRITON_INTERPRET, which triton reads when it is imported and when it decorates) is made
    when kernels first run, not when the package happens to be imported. On first launch of any
    kernel of a module, triton is imported, `triton` and `tl` are bound in that module's globals
    (kernel bodies use them; modules using this write `from __future__ import annotations` so
    parameter annotations such as `tl.constexpr` stay strings until then), and every lazy_jit
    function of the module is decorated and rebinds its global name, so kernels that call helper
    kernels resolve them as jit functions (a helper imported from another module, such as
    kernels.fp8's, is taken from its own module, jitted there in the same way).
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
                if isinstance(obj, lazy_jit):   # a helper imported from another module: jitted with its module
                    g[name] = triton.jit(obj.fn, **obj.jit_kwargs) if obj.fn.__globals__ is g else obj.jitted()
        return g[self.fn.__name__]

    def __getitem__(self, grid):
        return self.jitted()[grid]


def next_pow2(n: int) -> int:
    return 1 << (max(int(n), 1) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device, for grid heuristics; 8 elsewhere (the interpreter: small,
    so tests see the wide tiles and the split-KV paths the heuristics pick on a GPU, and stay cheap)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8


# Launches of at most one row per SM (decode): each program has an SM to itself, and more warps shorten its
# latency-bound loads and reductions. H100, FP8 single-request decode (RESULTS.md): rows of 4,096 on 16 warps
# instead of 8 and of 14,336 on 32 instead of 16: 3.508 -> 3.488 ms a step (RMSNorm-quantize 2.50 -> 2.27 us).
FEW_ROWS_MORE_WARPS = True


def num_warps_for(block: int, rows: int | None = None, device=None) -> int:
    """Warps for a one-row-per-program elementwise/reduction kernel of `block` elements; with rows and device,
    twice as many (up to 32) past 1,024 elements when the launch has at most a row per SM."""
    warps = 4 if block <= 1024 else 8 if block <= 4096 else 16
    if FEW_ROWS_MORE_WARPS and rows is not None and block > 1024 and rows <= num_sms(device):
        warps *= 2
    return warps


def compiled_variants() -> dict[str, int]:
    """Kernel name -> how many variants Triton has compiled (or loaded from its disk cache) in this
    process, for every launched kernel of this package: the no-compile-after-ready check compares
    these before and after serving. Triton 3.x keeps them in JITFunction.device_caches[device][0]
    (older versions in .cache[device])."""
    import sys
    counts = {}
    for module in [m for name, m in list(sys.modules.items()) if name.startswith("kernels.")]:
        for name, fn in vars(module).items():
            if hasattr(fn, "device_caches"):
                counts[name] = sum(len(c[0]) for c in fn.device_caches.values())
            elif isinstance(getattr(fn, "cache", None), dict) and hasattr(fn, "fn"):
                counts[name] = sum(len(c) for c in fn.cache.values())
    return counts
