"""The CUDA graphs' data path on CPU: a step staged into a CUDAGraphs runner's static inputs and run
there (the model called on those inputs where a graph would be replayed) gives the eager path's
logits. On CPU under the Triton interpreter (tests/kernels), so the split_decodes attention launches run
inside the model, beside padding tokens and sequences; async scheduling's in-flight token included."""
import torch

from backend.cuda_graph import CUDAGraphs
from backend.model_runner import ModelRunner
from backend.sampler import StepResult
from backend.sampling_params import SamplingParams
from backend.scheduler import SchedulerOutput
from backend.sequence import Sequence
from tests.helpers import engine_config
from tests.kernels.kernel_testing import DEVICE


class Replay:
    """Stands in for a captured torch.cuda.CUDAGraph: runs the captured call on the static inputs."""

    def __init__(self, graphs, key):
        self.graphs, self.key = graphs, key

    def replay(self):
        g = self.graphs
        input_ids, positions, meta = g._inputs(self.key)
        g.hidden[:self.key[0]] = g.model(input_ids, positions, g.kv_caches, meta)


def runner_with_cpu_graphs(path):
    runner = ModelRunner(engine_config(path, num_gpu_blocks_override=64, max_num_seqs=8, max_num_batched_tokens=100,
                                       device=DEVICE.type, dtype="float32", enforce_eager="true"))
    g = CUDAGraphs(runner.model, runner.kv_caches, 8, 100, runner.block_size, 32, runner.device)
    g.hidden = torch.empty(100, runner.model.args.hidden_size, device=DEVICE)
    g.graphs = {key: Replay(g, key) for key in g.keys()}
    return runner, g


def both_paths(runner, graphs, out, in_flight=None):
    runner.graphs = graphs
    graphed = runner._forward(out, in_flight)
    runner.graphs = None
    return graphed, runner._forward(out, in_flight)


@torch.inference_mode()
def test_graph_inputs_give_eager_logits(tiny_checkpoints):
    runner, graphs = runner_with_cpu_graphs(tiny_checkpoints["llama"])
    g = torch.Generator().manual_seed(0)
    lens = [9, 20, 3, 40, 30]
    seqs, block = [], 1
    for i, n in enumerate(lens):
        s = Sequence(f"r{i}", torch.randint(2, 300, (n,), generator=g).tolist(), n, SamplingParams())
        s.block_table = list(range(block + 3, block - 1, -1))   # 4 blocks each, descending
        block += 4
        seqs.append(s)
    runner.graphs = None
    runner._forward(SchedulerOutput(seqs=seqs[:4], num_new_tokens=lens[:4]), None)   # context of four
    for s, n in zip(seqs[:4], lens[:4]):
        s.num_computed_tokens = n
        s.token_ids.append(5 + n)
    seqs[2].token_ids.pop()             # its token is still in flight (async scheduling)
    seqs[2].num_placeholders = 1
    in_flight = StepResult([seqs[0], seqs[2]], torch.tensor([7, 123], device=DEVICE))
    seqs[3].num_computed_tokens = 33    # a last chunk of 8 with context
    mixed = SchedulerOutput(seqs=seqs, num_new_tokens=[1, 1, 1, 8, 17])   # and a first chunk of 17
    assert graphs.select(mixed.total_tokens, 5) == (64, 8, True)
    graphed, eager = both_paths(runner, graphs, mixed, in_flight)
    assert graphed.shape == (4, runner.model.args.vocab_size)
    torch.testing.assert_close(graphed, eager, atol=1e-4, rtol=1e-4)

    for s, n in zip(seqs[:4], [1, 1, 1, 8]):   # a decode step of the four: the decode graph of size 4
        s.num_computed_tokens += n
        s.token_ids.append(11)
    decode = SchedulerOutput(seqs=seqs[:4], num_new_tokens=[1] * 4)
    assert graphs.select(4, 4) == (4, 4, False)
    graphed, eager = both_paths(runner, graphs, decode, StepResult([seqs[1]], torch.tensor([42], device=DEVICE)))
    torch.testing.assert_close(graphed, eager, atol=1e-4, rtol=1e-4)
