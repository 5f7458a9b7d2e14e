"""What a step's outputs cost to cross the pipe from the engine core's process to the front
(engine_core_process): pickled CoreOutput lists (before) against core_message's flat message (after).

The core side (encode + send) is timed here; the front side (receive + decode) in a spawned child,
from the moment the message is there. One message in flight at a time (the child acknowledges), so
neither side's time includes waiting for the other. Both count their thread's CPU time (a busy
shared box then adds little noise): the median over --steps, the best of --rounds (layouts take
turns). CPU only.

usage: python bench/core_message.py [--requests 256] [--steps 400] [--rounds 3] [--logprob-requests 32] [--top 5]
Prints a table: microseconds per step for each layout and workload.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from backend.core_message import StepDecoder, StepEncoder  # noqa: E402
from backend.logprobs import TokenLogprobs  # noqa: E402
from backend.outputs import CoreOutput, SampleUpdate  # noqa: E402
from backend.worker import spawn_context  # noqa: E402


class Pickled:
    """Before: the list of CoreOutputs as it is (the pipe pickles it)."""
    def encode(self, outputs):
        return outputs

    def decode(self, message):
        return message


def step_outputs(step: int, requests: int, logprob_requests: int, top: int, churn: bool) -> list[CoreOutput]:
    """One decode step: every request one new token; the first `logprob_requests` asked logprobs=top
    (their running log-prob too); with churn, one request is replaced every step (its id changes)."""
    outputs = []
    for i in range(requests):
        rid = f"cmpl-{(i + step * churn * (i == 0)):032x}"
        token = (step * 7919 + i) % 151_000
        sample = SampleUpdate(0, [token])
        if i < logprob_requests:
            sample.cumulative_logprob = -0.25 * step
            sample.logprobs = [TokenLogprobs(token, -0.5, 2, [(token + k, -0.1 * k) for k in range(top)])]
        outputs.append(CoreOutput(rid, [sample], first_scheduled_time=1000.0 + i))
    return outputs


def front(conn, layout_name):
    decoder = StepDecoder() if layout_name == "flat" else Pickled()
    times = []
    while True:
        conn.poll(None)
        t = time.thread_time()
        message = conn.recv()
        if message is None:
            conn.send(times)
            return
        outputs = decoder.decode(message)
        times.append(time.thread_time() - t)
        conn.send(outputs[-1].samples[0].new_token_ids)   # ack, with a check


def measure(layout_name: str, workload: list[list[CoreOutput]]) -> tuple[float, float]:
    ctx = spawn_context()
    here, there = ctx.Pipe()
    child = ctx.Process(target=front, args=(there, layout_name), daemon=True)
    child.start()
    encoder = StepEncoder() if layout_name == "flat" else Pickled()
    times = []
    for outputs in workload:
        t = time.thread_time()
        here.send(encoder.encode(outputs))
        times.append(time.thread_time() - t)
        assert here.recv() == outputs[-1].samples[0].new_token_ids
    here.send(None)
    front_times = here.recv()
    child.join()
    skip = len(times) // 10   # warm-up
    return statistics.median(times[skip:]) * 1e6, statistics.median(front_times[skip:]) * 1e6


def check_round_trip(workload):
    encoder, decoder = StepEncoder(), StepDecoder()
    for outputs in workload:
        assert decoder.decode(encoder.encode(outputs)) == outputs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--logprob-requests", type=int, default=32)
    ap.add_argument("--top", type=int, default=5)
    a = ap.parse_args()
    workloads = {
        f"{a.requests} x 1 token": dict(logprob_requests=0, churn=False),
        f"{a.requests} x 1 token, one new request a step": dict(logprob_requests=0, churn=True),
        f"{a.requests} x 1 token, {a.logprob_requests} with logprobs={a.top}":
            dict(logprob_requests=a.logprob_requests, churn=False),
    }
    print(f"{'workload':<44} {'layout':<8} {'core us':>8} {'front us':>9} {'total us':>9}")
    for name, kw in workloads.items():
        workload = [step_outputs(s, a.requests, top=a.top, **kw) for s in range(a.steps)]
        check_round_trip(workload)
        best = {}
        for _ in range(a.rounds):
            for layout_name in ("pickle", "flat"):
                core_us, front_us = measure(layout_name, workload)
                if layout_name not in best or core_us + front_us < sum(best[layout_name]):
                    best[layout_name] = (core_us, front_us)
        for layout_name, (core_us, front_us) in best.items():
            print(f"{name:<44} {layout_name:<8} {core_us:>8.0f} {front_us:>9.0f} {core_us + front_us:>9.0f}")


if __name__ == "__main__":
    main()
