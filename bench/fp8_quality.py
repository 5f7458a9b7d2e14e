"""FP8 quality against the unquantized engine (issue 14): greedy agreement and next-token KL.

For each configuration (fp8 weights, fp8 KV cache, both) against the model in its own dtype:
- agreement: the share of the first --tokens greedy tokens equal to the reference's, position by
  position, over --prompts prompts (after a first difference the texts usually part ways, so this
  counts how long they agree);
- mean KL(reference || fp8) of the next-token distribution, teacher-forced: both read the same
  prompt and then the reference's own greedy tokens, so every position compares like with like.

    python bench/fp8_quality.py                                 # the default model, on this device
    python bench/fp8_quality.py --model DIR --dtype bfloat16    # e.g. a real checkpoint on the GPU
    python bench/fp8_quality.py --weight-only                   # CPU: FP8 weights x unquantized activations

Prompts are lines of the TinyShakespeare text (tools/data), tokenized with the model's tokenizer.
On a CPU, FP8 GEMMs run through torch._scaled_mm's CPU path (W8A8: activations quantized per token, as
the GPU runs every batch; --weight-only: the W8A16 kernel's math, which the GPU runs only where
backend.quantization.TRITON_W8A16_MAX_M is set) and the FP8 cache through the same kernels' reference code:
the numbers are those of the same arithmetic.
"""
import argparse
import json
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import backend.quantization as quantization  # noqa: E402
from backend.config import EngineConfig  # noqa: E402
from backend.engine import LLMEngine  # noqa: E402
from backend.model_runner import ModelRunner  # noqa: E402
from backend.sampling_params import SamplingParams  # noqa: E402
from backend.scheduler import SchedulerOutput  # noqa: E402
from backend.sequence import Sequence  # noqa: E402

DEFAULT_MODEL = os.path.join(REPO, "model_repository", "llm", "tiny-shakespeare")
TEXT = os.path.join(REPO, "tools", "data", "tinyshakespeare.txt")
CONFIGS = {"fp8 weights": dict(quantization="fp8"), "fp8 KV cache": dict(kv_cache_dtype="fp8"),
           "both": dict(quantization="fp8", kv_cache_dtype="fp8")}


def prompt_ids(tokenizer, count: int, min_tokens: int = 8, max_tokens: int = 48) -> list[list[int]]:
    """`count` prompts from the text: consecutive lines of 8 to 48 tokens, from evenly spaced places."""
    lines = [l for l in open(TEXT).read().splitlines() if l.strip()]
    prompts, step = [], max(1, len(lines) // (count * 3))
    for start in range(0, len(lines), step):
        ids = tokenizer.encode("\n".join(lines[start:start + 3]) + "\n")
        if min_tokens <= len(ids):
            prompts.append(ids[:max_tokens])
        if len(prompts) == count:
            break
    return prompts


def params_of(model, dtype, extra, num_seqs, max_len):
    return dict(model=model, dtype=dtype, max_num_seqs=str(num_seqs), max_num_batched_tokens=str(num_seqs * max_len),
                max_model_len=str(max_len), enforce_eager="true", **extra)


def greedy_tokens(params: dict, prompts, num_tokens: int) -> list[list[int]]:
    engine = LLMEngine(EngineConfig.from_parameters(params))
    outputs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=num_tokens, ignore_eos=True))
    engine.shutdown()
    return [o.samples[0].token_ids for o in outputs]


def teacher_forced_logprobs(params: dict, prompts, forced) -> torch.Tensor:
    """Next-token log-probs at every position after each prompt, feeding `forced` tokens: [positions, V]."""
    runner = ModelRunner(EngineConfig.from_parameters(params))
    block_size = runner.config.block_size
    per_seq = -(-(max(map(len, prompts)) + max(map(len, forced)) + 1) // block_size)
    seqs = []
    for i, p in enumerate(prompts):
        s = Sequence(f"r{i}", list(p), len(p), SamplingParams())
        s.block_table = list(range(per_seq * i, per_seq * (i + 1)))
        seqs.append(s)
    rows, new = [], [len(p) for p in prompts]
    with torch.inference_mode():
        for step in range(len(forced[0])):
            rows.append(runner._forward(SchedulerOutput(seqs=seqs, num_new_tokens=new), None).float().log_softmax(-1))
            for s, n, tokens in zip(seqs, new, forced):
                s.num_computed_tokens += n
                s.token_ids.append(tokens[step])
            new = [1] * len(seqs)
    return torch.cat(rows)


def mean_kl(ref: torch.Tensor, other: torch.Tensor) -> float:
    return (ref.exp() * (ref - other)).sum(-1).mean().item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--dtype", default="auto", help="the reference's dtype (auto: bf16 on a GPU, fp32 on a CPU)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--yardstick", default="", help="also compare this dtype (no FP8) with the reference, "
                                                     "e.g. bfloat16 against an fp32 reference: how much a "
                                                     "rounding change alone moves greedy outputs")
    ap.add_argument("--weight-only", action="store_true",
                    help="off the Triton path (CPU), FP8 weights against unquantized activations at every row "
                         "count (the W8A16 kernel's math: TRITON_W8A16_MAX_M) instead of W8A8")
    a = ap.parse_args(argv)
    quantization.TORCH_PATH_WEIGHT_ONLY = a.weight_only
    from transformers import AutoTokenizer
    prompts = prompt_ids(AutoTokenizer.from_pretrained(a.model), a.prompts)
    max_len = max(map(len, prompts)) + a.tokens + 8
    base = params_of(a.model, a.dtype, {}, len(prompts), max_len)
    ref_tokens = greedy_tokens(base, prompts, a.tokens)
    ref_logprobs = teacher_forced_logprobs(base, prompts, ref_tokens)
    rows = []
    configs = {name: (a.dtype, extra) for name, extra in CONFIGS.items()}
    if a.yardstick:
        configs[f"{a.yardstick} (yardstick)"] = (a.yardstick, {})
    for name, (dtype, extra) in configs.items():
        params = params_of(a.model, dtype, extra, len(prompts), max_len)
        tokens = greedy_tokens(params, prompts, a.tokens)
        agree = sum(x == y for r, t in zip(ref_tokens, tokens) for x, y in zip(r, t)) / (len(prompts) * a.tokens)
        logprobs = teacher_forced_logprobs(params, prompts, ref_tokens)
        top1 = (logprobs.argmax(-1) == ref_logprobs.argmax(-1)).float().mean().item()
        if a.weight_only and "quantization" in extra:
            name += ", weight-only math"
        row = dict(config=name, model=os.path.basename(a.model.rstrip("/")), dtype=a.dtype, prompts=len(prompts),
                   tokens=a.tokens, greedy_agreement=round(agree, 4), mean_kl=float(f"{mean_kl(ref_logprobs, logprobs):.3e}"),
                   teacher_forced_top1=round(top1, 4))
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()
