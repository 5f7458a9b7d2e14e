import os

import torch


def use_triton(t: torch.Tensor) -> bool:
    """Triton kernels on CUDA tensors (or anywhere under TRITON_INTERPRET=1 when LLM_KERNELS=triton);
    torch references otherwise. LLM_KERNELS=reference forces the references."""
    mode = os.environ.get("LLM_KERNELS", "auto")
    if mode == "reference":
        return False
    if mode == "triton":
        return True
    return t.is_cuda
