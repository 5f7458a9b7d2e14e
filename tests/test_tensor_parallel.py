"""Tensor parallelism on CPU: 2 gloo ranks (rank 0 in this process, one worker process) give the
same greedy tokens as 1 rank; a worker that dies fails the requests in flight instead of hanging."""
import threading

import pytest

from backend.errors import EngineUnavailable
from tests.conftest import DEFAULT_MODEL
from tests.helpers import greedy, make_engine, prompt_set


@pytest.mark.parametrize("arch", ["qwen2", "default"])
def test_tp2_equals_tp1(tiny_checkpoints, arch):
    path = DEFAULT_MODEL if arch == "default" else tiny_checkpoints[arch]
    prompts = prompt_set(6, seed=31)
    single = make_engine(path)
    ref = [o.token_ids for o in single.generate(prompts, greedy(10))]
    # (One tensor-parallel engine per process: the rank state is process-wide.)
    engine = make_engine(path, tensor_parallel_size=2, num_gpu_blocks_override=64, block_size=8)
    try:
        assert engine.core.runner.model.args.num_kv_heads * 2 == single.core.runner.model.args.num_kv_heads
        assert [o.token_ids for o in engine.generate(prompts, greedy(10))] == ref
    finally:
        engine.shutdown()
    assert engine.core.workers is None


def test_tp2_inside_a_core_process_equals_tp1(tiny_checkpoints):
    """The served default on CUDA (engine_core_process auto) with tensor parallelism: the core's process
    runs rank 0 and starts the other rank's worker itself."""
    path = tiny_checkpoints["qwen2"]
    prompts = prompt_set(4, seed=32)
    ref = [o.token_ids for o in make_engine(path).generate(prompts, greedy(8))]
    engine = make_engine(path, tensor_parallel_size=2, engine_core_process="true", num_gpu_blocks_override=64,
                         block_size=8)
    try:
        assert [o.token_ids for o in engine.generate(prompts, greedy(8))] == ref
    finally:
        engine.shutdown()


def test_tp_size_must_divide_the_model(tiny_checkpoints):
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        make_engine(tiny_checkpoints["llama"], tensor_parallel_size=3)


def test_dead_worker_fails_requests_and_marks_unhealthy(tiny_checkpoints):
    engine = make_engine(tiny_checkpoints["llama"], tensor_parallel_size=2)
    engine.start()
    done, finals = threading.Event(), {}

    def on_output(o):
        if o.finished:
            finals[o.request_id] = o
            done.set()

    engine.add_request("x", "To be", greedy(400), on_output)   # in flight when the worker dies
    worker = engine.core.workers.procs[0]
    worker.kill()
    worker.join()
    assert done.wait(60), "the request in flight must fail, not hang"
    assert finals["x"].error and "worker" in finals["x"].error
    assert not engine.healthy
    with pytest.raises(EngineUnavailable, match="not healthy"):
        engine.add_request("y", "To be", greedy(5), on_output)
    engine.shutdown()
