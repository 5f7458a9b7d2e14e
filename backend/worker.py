"""Tensor-parallel workers: ranks 1..N-1, each a process holding a shard of the model.

Rank 0 lives in the engine core's process and schedules; every step it broadcasts the step's
inputs (backend.parallel) and the workers run the same forward pass on their shard.
"""
import copy
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile

import torch

from backend import parallel
from backend.config import EngineConfig
from backend.model_runner import ModelRunner
from backend.models.llama import LlamaArgs, shard_for_rank

log = logging.getLogger(__name__)


def spawn_context():
    """multiprocessing's spawn context, with a Python interpreter to spawn: inside Triton's
    Python-backend stub sys.executable is the stub itself, so spawn with the environment's python."""
    ctx = multiprocessing.get_context("spawn")
    if not os.path.basename(sys.executable).startswith("python"):
        ctx.set_executable(shutil.which("python3"))
    return ctx


class TensorParallelWorkers:
    """Starts ranks 1..size-1 and joins rank 0 (this process) to their process group."""

    def __init__(self, config: EngineConfig):
        size = config.tensor_parallel_size
        shard_for_rank(LlamaArgs.from_hf(config.hf), size, 0)   # raises now if the model does not split
        device_type = config.torch_device.type
        if device_type == "cuda" and torch.cuda.device_count() < size:
            raise ValueError(f"parameter 'tensor_parallel_size' ({size}) exceeds the GPUs here "
                             f"({torch.cuda.device_count()})")
        init_file = tempfile.mktemp(prefix="llm-tp-")
        ctx = spawn_context()
        self.procs = []
        for rank in range(1, size):
            p = ctx.Process(target=worker_main, args=(rank, size, init_file, config), name=f"llm-tp-worker-{rank}",
                            daemon=True)
            p.start()
            self.procs.append(p)
        parallel.init(0, size, init_file, device_type)

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def check(self):
        """Raises when a worker has exited: the model cannot run without all of its shards."""
        dead = [p.name for p in self.procs if not p.is_alive()]
        if dead:
            raise RuntimeError(f"tensor-parallel worker(s) {', '.join(dead)} exited")

    def stop(self):
        if all(p.is_alive() for p in self.procs):
            try:
                parallel.broadcast_step(None)
            except Exception:   # a worker died mid-broadcast: nothing more to tell them
                log.exception("stopping tensor-parallel workers")
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
        parallel.shutdown()
        self.procs = []


def worker_main(rank: int, size: int, init_file: str, config: EngineConfig):
    parallel.init(rank, size, init_file, config.torch_device.type)
    config = copy.copy(config)
    if config.torch_device.type == "cuda":
        config.torch_device = torch.device(f"cuda:{rank}")
        torch.cuda.set_device(config.torch_device)
    runner = ModelRunner(config)
    while True:
        payload = parallel.broadcast_step(None)
        if payload is None:
            break
        runner.execute_step(payload)
    parallel.shutdown()
