import torch

from kernels.dispatch import use_triton


def rms_norm_ref(x, weight, eps, residual=None):
    """y = x / rms(x) * weight in fp32. With residual: x += residual first, return (y, x)."""
    if residual is not None:
        x = (x.float() + residual.float()).to(x.dtype)
        residual = x
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
    return y if residual is None else (y, residual)


def rms_norm(x, weight, eps, residual=None):
    if use_triton(x):
        from kernels.triton_ops import rms_norm_triton
        return rms_norm_triton(x, weight, eps, residual)
    return rms_norm_ref(x, weight, eps, residual)
