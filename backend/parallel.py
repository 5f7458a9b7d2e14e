"""Tensor parallelism over torch.distributed (NCCL on GPUs, gloo on CPUs).

Rank 0 lives in the engine's process and runs the scheduler; ranks 1..N-1 are worker processes
that each hold a shard of the weights and their share of the KV heads. Every step rank 0
broadcasts the step's inputs; all ranks run the forward pass together (all-reduce after the
row-parallel layers, all-gather of the vocabulary-parallel logits).
"""
import datetime
import multiprocessing
import os
import shutil
import sys
import tempfile

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


def start_workers(size: int, config, hf_config: dict, max_model_len: int, device_type: str):
    """Spawn ranks 1..size-1; returns (processes, init_file) for rank 0 to join with init()."""
    init_file = tempfile.mktemp(prefix="llm-tp-")
    ctx = multiprocessing.get_context("spawn")
    if not os.path.basename(sys.executable).startswith("python"):
        # Inside Triton's Python-backend stub sys.executable is the stub: spawn with the env's python.
        ctx.set_executable(shutil.which("python3"))
    procs = []
    for rank in range(1, size):
        p = ctx.Process(target=worker_main, args=(rank, size, init_file, config, hf_config, max_model_len,
                                                  device_type), name=f"llm-tp-worker-{rank}", daemon=True)
        p.start()
        procs.append(p)
    return procs, init_file


def worker_main(rank, size, init_file, config, hf_config, max_model_len, device_type):
    from backend.engine import _pick_dtype
    from backend.model_runner import ModelRunner
    init(rank, size, init_file, device_type)
    device = torch.device(f"cuda:{rank}") if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    runner = ModelRunner(config, hf_config, device, _pick_dtype(config.dtype, device), max_model_len)
    while True:
        payload = broadcast_step(None)
        if payload is None:
            break
        runner.execute_step(payload)
    shutdown()
