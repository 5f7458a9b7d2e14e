"""Shared test helpers: build an engine, and the HF transformers greedy reference."""
import functools

import torch
from transformers import AutoModelForCausalLM

from backend.config import EngineConfig
from backend.engine import LLMEngine
from backend.sampler import Sampler
from backend.sampling_params import SamplingParams
from backend.scheduler import Scheduler


def engine_config(model_path, **params) -> EngineConfig:
    params = {"model": model_path, "device": "cpu", **{k: str(v) for k, v in params.items()}}
    return EngineConfig.from_parameters(params)


def make_engine(model_path, **params):
    return LLMEngine(engine_config(model_path, **params))


class RandomLogitsRunner:
    """Stands in for ModelRunner: the same contract and the real sampler, random logits instead of
    a forward pass (scheduler and block bookkeeping at full speed)."""

    def __init__(self, vocab, num_blocks, seed=0):
        self.vocab, self.num_blocks = vocab, num_blocks
        self.sampler = Sampler(torch.device("cpu"), seed)
        self.gen = torch.Generator().manual_seed(seed)

    def run(self, out, batch, in_flight=None):
        logits = torch.randn(len(out.sampling_seqs()), self.vocab, generator=self.gen)
        return self.sampler.sample_step(logits, batch)


def engine_without_forward(model_path, num_blocks, vocab=None, seed=0, scheduler=None, **params):
    """An engine whose core runs a RandomLogitsRunner (logits as wide as `vocab`, default the model's)
    over a pool of num_blocks (or `scheduler`)."""
    config = engine_config(model_path, **params).resolve()
    vocab = vocab or config.hf["vocab_size"]
    scheduler = scheduler or Scheduler.for_config(config, num_blocks)
    return LLMEngine(config, runner=RandomLogitsRunner(vocab, num_blocks, seed), scheduler=scheduler)


@functools.lru_cache(maxsize=8)
def hf_model(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_greedy(path, prompt_ids, max_new_tokens):
    """HF transformers greedy continuation (attention_mask explicit: token 0 is also a pad id here)."""
    ids = torch.tensor([prompt_ids])
    out = hf_model(path).generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                  do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def greedy(max_tokens=12, **kw):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def prompt_set(n=8, vocab=300, seed=0):
    """n prompts of different lengths (1 to ~70 tokens, crossing block boundaries)."""
    g = torch.Generator().manual_seed(seed)
    lengths = [1, 5, 16, 17, 31, 33, 48, 70, 9, 24][:n] + [3 + 7 * i for i in range(max(0, n - 10))]
    return [torch.randint(2, vocab, (n_,), generator=g).tolist() for n_ in lengths]


def run_staggered(engine, prompts, params, every=2):
    """Submit one prompt every `every` steps while earlier ones are running; final outputs in order."""
    params = params if isinstance(params, list) else [params] * len(prompts)
    pending = list(enumerate(prompts))
    final, ids, step = {}, {}, 0
    while pending or engine.has_unfinished():
        if pending and step % every == 0:
            i, p = pending.pop(0)
            ids[i] = f"s{i}"
            engine.add_request(ids[i], "", params[i], prompt_token_ids=p)
        for o in engine.step():
            if o.finished:
                final[o.request_id] = o
        step += 1
    return [final[ids[i]] for i in range(len(prompts))]


def prefill_then_decode_logits(runner) -> list:
    """A prefill of three prompts (9, 20 and 3 tokens, in scattered blocks of an emptied cache),
    then one decode step for each, through runner._forward: [prefill logits, decode logits]."""
    from backend.scheduler import SchedulerOutput
    from backend.sequence import Sequence
    runner.kv_cache.zero_()
    lens, g = [9, 20, 3], torch.Generator().manual_seed(0)
    seqs = []
    for i, n in enumerate(lens):
        s = Sequence(f"r{i}", torch.randint(2, 300, (n,), generator=g).tolist(), n, SamplingParams())
        s.block_table = [4 * i + 3, 4 * i + 1, 4 * i + 2, 4 * i]     # scattered blocks
        seqs.append(s)
    logits = [runner._forward(SchedulerOutput(seqs=seqs, num_new_tokens=lens), None)]
    for s, n in zip(seqs, lens):
        s.num_computed_tokens = n
        s.token_ids.append(11 + n)
    logits.append(runner._forward(SchedulerOutput(seqs=seqs, num_new_tokens=[1] * 3), None))
    return logits
