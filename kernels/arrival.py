"""Arrival counters: the "last program to arrive" pattern that lets one launch finish work which needs every
program's output (the weight stream's K split: the last slice of a tile sums all of them) without a second kernel.
Where many programs arrive on one counter and the last then works alone, it measured slower than the separate
launch it saved under PDL (H100, bench/RESULTS.md: the attention reduce's 32 heads a token quantizing o_proj's
input; gate/up's 224 programs a row quantizing SiLU-and-mul's output).

Each program stores its part, then counts itself in (arrive); the one that sees the count reach the expected
number reads everyone's parts (from L2: loads with cache_modifier=".cg"), does the remaining work and resets
the counter to 0, so the counters are zeros between launches. One set per device, shared by every kernel that
uses them: launches on one stream take them one after another (a PDL launch waits for the kernel before it
with pdl_wait before it arrives). Made at the first use, which must not be under CUDA-graph capture (the
engine and the benches run each shape once before capturing)."""
from __future__ import annotations

import torch

from kernels.dispatch import lazy_jit

triton = tl = None  # bound to triton / triton.language by lazy_jit at the first launch

MAX_COUNTERS = 1 << 16   # counters a launch may use (indices 0 .. MAX_COUNTERS - 1)

_counters: dict[torch.device, torch.Tensor] = {}


def arrival_counters(device: torch.device) -> torch.Tensor:
    """The device's int32 counters, zeros (and zeros again after every launch that uses them)."""
    if device not in _counters:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("the arrival counters must exist before CUDA-graph capture: run the kernel once first")
        with torch.inference_mode(False):   # a plain tensor even if first made in an inference step
            _counters[device] = torch.zeros(MAX_COUNTERS, dtype=torch.int32, device=device)
    return _counters[device]


@lazy_jit
def _arrive_last(counter_ptr, expected):
    """Count this program in at counter_ptr; True in the program that arrives as the expected-th (the last).
    The barrier first: every thread's stores are done before the release publishes them; the acquire makes
    the other programs' stores visible to the last one."""
    tl.debug_barrier()
    return tl.atomic_add(counter_ptr, 1, sem="acq_rel") == expected - 1


@lazy_jit
def _reset(counter_ptr):
    """The last program puts its counter back to 0 for the next launch."""
    tl.atomic_xchg(counter_ptr, 0)
