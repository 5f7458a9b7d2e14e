"""Small host lists (indices, per-row parameters) onto the device without stalling the host.

A plain torch.tensor(values, device="cuda") copies from pageable memory and then waits for the
stream to drain: the host stops until the GPU has finished all the work queued before it, which
undoes async scheduling (the next step cannot be launched ahead), and in the server the engine
thread then has to win the GIL back before it can go on. Staged in pinned memory, the copy is
queued behind that work instead; PyTorch's pinned-memory cache keeps each staging buffer until
its copy has run.
"""
import torch


def to_device(values, device: torch.device, dtype=torch.long) -> torch.Tensor:
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
