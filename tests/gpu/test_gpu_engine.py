"""On a CUDA machine: the engine with our Triton kernels and CUDA graphs against the CPU reference
path and HF transformers. Skipped where there is no GPU (CI); run through the device tool."""
import pytest
import torch

from backend.sampling_params import SamplingParams
from tests.conftest import DEFAULT_MODEL
from tests.helpers import greedy, hf_model, make_engine, prompt_set

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

PROMPTS = ["To be or not to be, that is", "ROMEO:", "First Citizen:\nBefore we proceed any further, hear me speak.",
           "O", "KING HENRY", "My lord, ", "What light through yonder window", "\n\nJULIET:\n"]


def gpu(path, **kw):
    from backend.config import EngineConfig
    from backend.engine import LLMEngine
    # in process (the served default on CUDA is a process of its own): the tests look into the core
    params = {"model": path, "device": "cuda", "num_gpu_blocks_override": "512", "engine_core_process": "false",
              **{k: str(v) for k, v in kw.items()}}
    return LLMEngine(EngineConfig.from_parameters(params))


def ids(outputs):
    return [o.token_ids for o in outputs]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "default"])
def test_fp32_kernels_match_cpu_reference(tiny_checkpoints, arch):
    path = DEFAULT_MODEL if arch == "default" else tiny_checkpoints[arch]
    prompts = prompt_set(8, seed=3)
    cpu = make_engine(path).generate(prompts, greedy(16))
    assert ids(gpu(path, dtype="float32").generate(prompts, greedy(16))) == ids(cpu)


def test_cuda_graphs_equal_eager_fp32():
    prompts = [p + [5] * i for i, p in enumerate(prompt_set(8, seed=4))]
    eager = gpu(DEFAULT_MODEL, dtype="float32", enforce_eager="true").generate(prompts, greedy(24))
    graphed = gpu(DEFAULT_MODEL, dtype="float32", max_num_seqs=64)
    assert graphed.core.runner.graphs is not None
    assert ids(graphed.generate(prompts, greedy(24))) == ids(eager)


def test_the_default_on_cuda_is_a_core_process_with_the_same_outputs():
    from backend.core_process import CoreProcessClient
    prompts = prompt_set(8, seed=6)
    local = ids(gpu(DEFAULT_MODEL, dtype="float32").generate(prompts, greedy(16)))
    remote = gpu(DEFAULT_MODEL, dtype="float32", engine_core_process="auto")
    try:
        assert isinstance(remote.core, CoreProcessClient)
        assert ids(remote.generate(prompts, greedy(16))) == local
    finally:
        remote.shutdown()


def test_outputs_do_not_change_with_batch_size_fp32():
    engine = gpu(DEFAULT_MODEL, dtype="float32", max_num_seqs=64)
    prompts = prompt_set(40, seed=5, vocab=4000)
    alone = [engine.generate([p], greedy(16))[0].token_ids for p in prompts[:6]]
    batched = ids(engine.generate(prompts, greedy(16)))
    assert batched[:6] == alone


def test_bf16_matches_hf_first_tokens():
    engine = gpu(DEFAULT_MODEL)
    assert engine.config.torch_dtype == torch.bfloat16
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
    ours = ids(engine.generate(prompts, greedy(4)))
    hf = hf_model(DEFAULT_MODEL).to(device="cuda", dtype=torch.bfloat16)
    try:
        refs = []
        for p in prompts:
            x = torch.tensor([p], device="cuda")
            out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=4, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
            refs.append(out[0, len(p):].tolist())
    finally:
        hf.to(device="cpu", dtype=torch.float32)
    first_equal = sum(o[0] == r[0] for o, r in zip(ours, refs))
    all_equal = sum(o == r for o, r in zip(ours, refs))
    assert first_equal == len(prompts) and all_equal >= len(prompts) - 2, (ours, refs)


def test_sampling_on_gpu_seeded_reproducible():
    engine = gpu(DEFAULT_MODEL)
    p = SamplingParams(temperature=0.8, top_p=0.9, top_k=40, seed=3, max_tokens=32, ignore_eos=True)
    a = engine.generate(["To be"], p)[0].text
    b = engine.generate(["To be", "ROMEO:", "O"], p)[0].text
    assert a == b and len(a) > 10


def test_async_scheduling_equals_sync_on_gpu_fp32():
    prompts = prompt_set(24, seed=6, vocab=4000)
    params = [greedy(20) if i % 3 else SamplingParams(temperature=0.8, seed=i, max_tokens=20, ignore_eos=True)
              for i in range(len(prompts))]
    sync = gpu(DEFAULT_MODEL, dtype="float32", async_scheduling="false").generate(prompts, params)
    engine = gpu(DEFAULT_MODEL, dtype="float32")
    assert engine.core.async_scheduling and engine.core.runner.graphs is not None
    assert ids(engine.generate(prompts, params)) == ids(sync)


def test_forks_and_beams_on_gpu_fp32(tiny_checkpoints):
    """Beam search (log-probs ranked on the GPU) gives the CPU reference's beams; n > 1 samples
    (forked before the forward pass, sharing one logits row) equal single requests seeded seed + i."""
    path = tiny_checkpoints["llama"]
    prompts = prompt_set(3, seed=7)
    beams = SamplingParams(use_beam_search=True, n=3, max_tokens=10, ignore_eos=True)
    cpu = make_engine(path).generate(prompts, beams)
    engine = gpu(path, dtype="float32")
    ours = engine.generate(prompts, beams)
    assert [[s.token_ids for s in o.samples] for o in ours] == [[s.token_ids for s in o.samples] for o in cpu]
    many = engine.generate(prompts[1:2], SamplingParams(n=3, temperature=0.9, seed=11, max_tokens=12,
                                                        ignore_eos=True))[0]
    for i, sample in enumerate(many.samples):
        single = SamplingParams(temperature=0.9, seed=11 + i, max_tokens=12, ignore_eos=True)
        assert sample.token_ids == engine.generate(prompts[1:2], single)[0].token_ids


# ---------------- mixed-step CUDA graphs ----------------

def count_graph_steps(runner):
    """Wrap the graphs' replay: how many steps ran on decode graphs and on mixed graphs."""
    counts = {"decode": 0, "mixed": 0}
    replay = runner.graphs.replay

    def counted(key, *a):
        counts["mixed" if key[2] else "decode"] += 1
        return replay(key, *a)
    runner.graphs.replay = counted
    return counts


@pytest.mark.parametrize("arch", ["default", "qwen3"])
def test_mixed_graphs_equal_eager_under_staggered_arrivals_fp32(tiny_checkpoints, arch):
    """Prompts arrive while others decode and chunk (budget 100: chunks of long prompts beside decodes);
    async scheduling fills in-flight tokens into the mixed graphs' static inputs."""
    from tests.helpers import run_staggered
    path = DEFAULT_MODEL if arch == "default" else tiny_checkpoints[arch]
    prompts = [p * (1 + i % 4) for i, p in enumerate(prompt_set(12, seed=8))]
    kw = dict(dtype="float32", max_num_seqs=8, max_num_batched_tokens=100)
    eager = run_staggered(gpu(path, enforce_eager="true", **kw), prompts, greedy(20), every=3)
    engine = gpu(path, **kw)
    assert engine.core.async_scheduling and engine.core.runner.graphs.token_buckets == [64, 100]
    counts = count_graph_steps(engine.core.runner)
    assert ids(run_staggered(engine, prompts, greedy(20), every=3)) == ids(eager)
    assert counts["mixed"] >= 10 and counts["decode"] >= 10, counts


@torch.inference_mode()
def test_mixed_step_logits_graph_equal_eager_bf16():
    """One mixed step (decodes at several contexts, a first chunk, a last chunk with context) through the
    graph and eagerly: the logits agree within bf16 rounding."""
    from backend.scheduler import SchedulerOutput
    from backend.sequence import Sequence
    engine = gpu(DEFAULT_MODEL, max_num_seqs=16, max_num_batched_tokens=512)
    runner = engine.core.runner
    g = torch.Generator().manual_seed(9)
    lens = [30, 70, 5, 120, 90]
    seqs, next_block = [], 1
    for i, n in enumerate(lens):
        s = Sequence(f"r{i}", torch.randint(2, 4000, (n + 1,), generator=g).tolist(), n, SamplingParams())
        blocks = -(-(n + 1) // runner.block_size)
        s.block_table = list(range(next_block + blocks - 1, next_block - 1, -1))   # scattered, descending
        next_block += blocks
        seqs.append(s)
    prefill = SchedulerOutput(seqs=seqs[:4], num_new_tokens=lens[:4])
    runner._forward(prefill, None)                  # context of the first four
    for s, n in zip(seqs[:4], lens[:4]):
        s.num_computed_tokens = n                   # each has one more token: a decode
    seqs[3].num_computed_tokens = 100               # ... but the fourth: a last chunk of 21 with context
    mixed = SchedulerOutput(seqs=seqs, num_new_tokens=[1, 1, 1, 21, 60])   # the fifth: a first chunk
    assert runner.graphs.select(mixed.total_tokens, len(seqs)) == (128, 16, True)
    graphed = runner._forward(mixed, None)
    saved, runner.graphs = runner.graphs, None
    try:
        eager = runner._forward(mixed, None)
    finally:
        runner.graphs = saved
    assert graphed.shape == eager.shape == (4, runner.model.args.vocab_size)
    err = (graphed - eager).abs().max().item()
    assert err <= 2e-2 * eager.abs().max().item(), err
    assert (graphed.argmax(-1) == eager.argmax(-1)).all()


@pytest.mark.parametrize("eager", [False, True])
def test_no_compile_after_ready(eager):
    """Once the runner is built, serving compiles no Triton kernel: decode batches of every size,
    prompt chunks of many lengths (every tile band), mixed steps."""
    from kernels.dispatch import compiled_variants
    engine = gpu(DEFAULT_MODEL, max_num_seqs=32, max_num_batched_tokens=512, enforce_eager=str(eager).lower())
    before = compiled_variants()
    assert before.get("_paged_attention_kernel") and before.get("_rms_norm_kernel")
    g = torch.Generator().manual_seed(10)
    lengths = [1, 2, 3, 5, 8, 9, 15, 17, 33, 64, 65, 100, 129, 200, 257, 300, 511, 700]
    prompts = [torch.randint(2, 4000, (n,), generator=g).tolist() for n in lengths]
    # different output lengths: the decode batch shrinks through every size as requests finish
    engine.generate(prompts[:14] * 2 + prompts[14:], [greedy(2 + i) for i in range(32)])
    from tests.helpers import run_staggered
    run_staggered(engine, prompts, greedy(12), every=2)
    after = compiled_variants()
    assert after == before, {k: (before.get(k), v) for k, v in after.items() if before.get(k) != v}


# ---------------- latency target ----------------

def test_latency_target_calibrates_at_start_and_keeps_outputs_fp32(tiny_checkpoints):
    """target_itl_ms on the GPU: synthetic steps fit the cost model before any request (its
    prediction of a decode step is positive and below a prefill-heavy one), steps are timed with
    CUDA events, and greedy outputs equal those without the target."""
    from tests.helpers import run_staggered
    prompts = [p * (1 + i % 4) for i, p in enumerate(prompt_set(12, seed=9))]
    kw = dict(dtype="float32", max_num_seqs=8, max_num_batched_tokens=256)
    plain = run_staggered(gpu(DEFAULT_MODEL, **kw), prompts, greedy(20), every=2)
    engine = gpu(DEFAULT_MODEL, target_itl_ms=5, **kw)
    model = engine.core.scheduler.cost_model
    assert model.fitted and 0 < model.predict(8, 8 * 512) < model.predict(256, 256 * 2048)
    assert ids(run_staggered(engine, prompts, greedy(20), every=2)) == ids(plain)
    samples = engine.take_step_samples()
    assert samples and all(0 < seconds < 1 for _, seconds in samples)


def test_logprobs_on_gpu_equal_cpu_fp32(tiny_checkpoints):
    """The device path (packed rows, one host copy, async scheduling) gives the CPU engine's logprobs."""
    path = tiny_checkpoints["llama"]
    prompts = prompt_set(6, seed=14)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=3)
    cpu = make_engine(path).generate(prompts, params)
    dev = gpu(path, dtype="float32").generate(prompts, params)
    for c, g in zip(cpu, dev):
        assert g.token_ids == c.token_ids
        assert g.samples[0].cumulative_logprob == pytest.approx(c.samples[0].cumulative_logprob, abs=1e-3)
        for mc, mg in zip(c.samples[0].logprobs, g.samples[0].logprobs):
            assert set(mg) == set(mc)
            for t in mc:
                assert mg[t]["rank"] == mc[t]["rank"] and mg[t]["logprob"] == pytest.approx(mc[t]["logprob"], abs=1e-3)


def test_logits_processors_on_gpu_equal_cpu_fp32(tiny_checkpoints):
    """Penalties, logit_bias, allowed ids and bad words on the device (index tensors copied to the
    GPU each step) give the CPU engine's tokens, with async scheduling on."""
    path = tiny_checkpoints["qwen3"]
    prompts = prompt_set(5, seed=15)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, repetition_penalty=1.3,
                            frequency_penalty=0.4, presence_penalty=0.2, logit_bias={7: 2.0},
                            allowed_token_ids=list(range(2, 200)))
    cpu = make_engine(path).generate(prompts, params)
    dev = gpu(path, dtype="float32").generate(prompts, params)
    assert ids(dev) == ids(cpu)


def test_prompt_logprobs_on_gpu_equal_cpu_fp32(tiny_checkpoints):
    path = tiny_checkpoints["llama"]
    prompts = prompt_set(4, seed=17)[1:]
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True, prompt_logprobs=1)
    cpu = make_engine(path).generate(prompts, params)
    dev = gpu(path, dtype="float32", max_num_batched_tokens=256).generate(prompts, params)
    for c, g in zip(cpu, dev):
        assert len(g.prompt_logprobs) == len(c.prompt_logprobs) and g.prompt_logprobs[0] is None
        for mc, mg in zip(c.prompt_logprobs[1:], g.prompt_logprobs[1:]):
            assert set(mg) == set(mc)
            for t in mc:
                assert mg[t]["rank"] == mc[t]["rank"] and mg[t]["logprob"] == pytest.approx(mc[t]["logprob"], abs=1e-3)


@pytest.mark.parametrize("params", [
    dict(temperature=0.0),
    dict(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, seed=7),
    dict(temperature=0.7, logprobs=2, min_tokens=4, n=2),
    dict(temperature=0.7, logit_bias={5: 2.0}, allowed_token_ids=list(range(5, 300))),
], ids=["greedy", "filters", "logprobs-n", "bias-allowed"])
def test_steady_steps_never_block_the_host(params):
    """Async scheduling holds only if nothing in a step waits for the GPU: with CUDA's sync debug
    mode set to error, any blocking copy (a pageable host list sent to the device, a list index)
    raises. The one wait allowed is the event of the previous step's tokens."""
    engine = gpu(DEFAULT_MODEL, max_num_seqs=32)
    for i, p in enumerate(prompt_set(12, seed=8, vocab=4000)):
        engine.add_request(f"s{i}", "", SamplingParams(max_tokens=24, ignore_eos=True, **params), prompt_token_ids=p)
    for _ in range(3):   # admission, prompt steps and the first forks happen outside the check
        engine.step()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(12):
            engine.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert engine.core.async_scheduling and engine.has_unfinished()
