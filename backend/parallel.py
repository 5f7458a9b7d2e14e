"""Tensor parallelism over torch.distributed (NCCL on GPUs, gloo on CPUs).

Rank 0 lives in the engine's process and runs the scheduler; ranks 1..N-1 are worker processes
that each hold a shard of the weights and their share of the KV heads. Every step rank 0
broadcasts the step's inputs; all ranks run the forward pass together (all-reduce after the
row-parallel layers, all-gather of the vocabulary-parallel logits).
"""
import datetime
import os

import torch
import torch.distributed as dist

_state = {"size": 1, "rank": 0}


def tp_size() -> int:
    return _state["size"]


def tp_rank() -> int:
    return _state["rank"]


def init(rank: int, size: int, init_file: str, device_type: str, timeout_s: float = 120):
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    _state.update(size=size, rank=rank)


def shutdown():
    if dist.is_initialized():
        dist.destroy_process_group()
    _state.update(size=1, rank=0)


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _state["size"] > 1:
        dist.all_reduce(x)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    if _state["size"] == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_state["size"])]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)


def broadcast_step(payload):
    """Rank 0 sends the step's inputs (CPU tensors and ints, or None to stop); the others receive."""
    box = [payload]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def min_across_ranks(n: int) -> int:
    t = torch.tensor([n], dtype=torch.long)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())
