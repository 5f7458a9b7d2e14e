import torch
import torch.nn.functional as F

from kernels.dispatch import use_triton


def silu_and_mul_ref(x):
    """x = [gate | up] on the last dim -> silu(gate) * up."""
    gate, up = x.chunk(2, dim=-1)
    return (F.silu(gate.float()) * up.float()).to(x.dtype)


def silu_and_mul(x):
    if use_triton(x):
        from kernels.triton_ops import silu_and_mul_triton
        return silu_and_mul_triton(x)
    return silu_and_mul_ref(x)
