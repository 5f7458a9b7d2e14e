"""Host work per engine step, without a GPU: the engine thread's time per step with N requests
decoding, split into the core (schedule, sampling bookkeeping, outputs in token ids) and the front
(detokenizing, stop strings, RequestOutputs). The forward pass is a stand-in (random logits over a
small vocabulary), so what is measured is the Python that every step pays on top of the GPU.

usage: python bench/host_step.py [--requests 256] [--output-tokens 300 3000] [--steps 200] [--output-kind delta]
Prints one JSON line per output length reached before measuring.
"""
import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from backend.sampling_params import CUMULATIVE, DELTA, FINAL_ONLY, SamplingParams  # noqa: E402
from tests.helpers import engine_without_forward  # noqa: E402

DEFAULT_MODEL = os.path.join(os.path.dirname(__file__), "..", "model_repository", "llm", "tiny-shakespeare")


def measure(engine, steps: int) -> dict:
    """ms per step of engine.step(), and of its core part (EngineCore.step), over `steps` steps."""
    core_step, core_s = engine.core.step, [0.0]

    def timed():
        t = time.perf_counter()
        outputs = core_step()
        core_s[0] += time.perf_counter() - t
        return outputs
    engine.core.step = timed
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    total = (time.perf_counter() - t) * 1e3 / steps
    engine.core.step = core_step
    core = core_s[0] * 1e3 / steps
    return {"ms_per_step": round(total, 3), "core_ms": round(core, 3), "front_ms": round(total - core, 3)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=300)
    ap.add_argument("--output-tokens", type=int, nargs="+", default=[300, 3000])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--output-kind", default=DELTA, choices=[CUMULATIVE, DELTA, FINAL_ONLY],
                    help="what each step's RequestOutputs hold (serving streams DELTA)")
    a = ap.parse_args()
    engine = engine_without_forward(a.model, num_blocks=a.requests * (a.prompt_tokens + max(a.output_tokens)) // 16 + 64,
                                    vocab=64, max_num_seqs=a.requests, max_num_batched_tokens=max(8192, a.requests),
                                    max_model_len=a.prompt_tokens + max(a.output_tokens) + a.steps + 16)
    rng = random.Random(0)
    params = SamplingParams(temperature=0, max_tokens=max(a.output_tokens) + a.steps + 8, ignore_eos=True,
                            output_kind=a.output_kind)
    for i in range(a.requests):
        engine.add_request(f"r{i}", None, params, prompt_token_ids=[rng.randrange(5, 60) for _ in range(a.prompt_tokens)])
    done = 0
    for target in sorted(a.output_tokens):
        for _ in range(target - done):
            engine.step()
        done = target + a.steps
        print(json.dumps({"requests": a.requests, "output_tokens": target, "output_kind": a.output_kind,
                          **measure(engine, a.steps)}), flush=True)


if __name__ == "__main__":
    main()
