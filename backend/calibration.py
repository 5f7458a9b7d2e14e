"""Seed the step cost model before the first request: time a few synthetic steps on the runner.

Without it the first steps after start-up run on the token budget alone until enough real steps
have been measured; with it, a latency target holds from the first request. The steps go through
runner.run exactly as scheduled steps do (graphs, sampling), over made-up sequences whose block
tables point anywhere in the still-empty KV pool (what they write there is never read).
"""
import itertools

from backend.sampler import SamplingBatch
from backend.sampling_params import SamplingParams
from backend.scheduler import SchedulerOutput
from backend.sequence import Sequence
from backend.step_cost import StepCostModel, StepTimer, chunk_attention

_GREEDY = SamplingParams(temperature=0.0, max_tokens=1)


def synthetic_step(num_decodes: int, context: int, prompt_tokens: int, block_size: int, num_blocks: int):
    """A step of num_decodes decodes at `context` tokens and one prompt chunk of prompt_tokens."""
    out, batch = SchedulerOutput(), SamplingBatch()
    next_block = itertools.count()

    def sequence(num_tokens: int, num_computed: int, n: int):
        seq = Sequence("calibration", [0] * num_tokens, num_tokens, _GREEDY)
        seq.num_computed_tokens = num_computed
        seq.block_table = [next(next_block) % num_blocks for _ in range(-(-num_tokens // block_size))]
        out.seqs.append(seq)
        out.num_new_tokens.append(n)
        out.attention += chunk_attention(num_computed, n)
        batch.add(seq, len(batch.seqs), frozenset())

    for _ in range(num_decodes):
        sequence(context + 1, context, 1)
    if prompt_tokens:
        sequence(prompt_tokens, 0, prompt_tokens)
        out.num_prefill_tokens = prompt_tokens
    return out, batch


def calibration_shapes(max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int):
    """(decodes, context, prompt tokens): a spread over all three features, within the limits."""
    decodes = sorted({1, min(32, max_num_seqs), max_num_seqs})
    contexts = sorted({min(512, max_model_len // 2), min(2048, max_model_len - 1)})
    shapes = []
    for d, c in itertools.product(decodes, contexts):
        room = max_num_batched_tokens - d
        for p in sorted({0, min(256, room), room // 2, room}):
            if p <= max_model_len:
                shapes.append((d, c, p))
    return shapes


def calibrate(runner, cost_model: StepCostModel, timer: StepTimer, config, repeats: int = 2):
    """Run each calibration shape (once to warm up, then `repeats` timed) and feed the cost model."""
    for d, c, p in calibration_shapes(config.max_num_seqs, config.max_num_batched_tokens, config.max_model_len):
        out, batch = synthetic_step(d, c, p, config.block_size, runner.num_blocks)
        runner.run(out, batch).host_token_ids()
        for _ in range(repeats):
            handle = timer.start()
            result = runner.run(out, batch)
            timer.stop(handle)
            result.host_token_ids()
            cost_model.observe(out.total_tokens, out.attention, timer.seconds(handle))
