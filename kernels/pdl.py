"""Programmatic dependent launch (PDL, Hopper and newer): a kernel launched with it may start while the kernel
before it in the stream is finishing; it must wait (griddepcontrol.wait: the previous kernel complete, its writes
visible) before it reads anything that kernel writes or writes anything it reads.

Every Triton kernel here calls pdl_wait before it touches memory that a kernel of the forward pass writes, so
results are the stream's order; most begin with it. Before it, only reads of what no kernel of the pass writes: the
weights (a GEMM's L2 prefetch), the batch's layout, block table and earlier steps' keys and values (paged
attention). Every program waits, even one that has nothing to do, so that the next kernel's wait for ours also
covers the one before ours. The next kernel may launch once all of our programs have exited, or (a weight-streaming
GEMM, kernels.fp8_gemm) released it after their main loop: its launch and start-up then overlap our tail (H100,
single-request decode, Llama-3-8B shape: FP8 3.98 -> 3.88 ms a step, bf16 6.10 -> 6.04; bench/RESULTS.md). Tried and
slower there: every kernel releasing the next at its start (a chain of kernels launching ahead, their waiting
programs placed on SMs while ours run: 4.24 / 6.94 ms), and prefetching all the GEMM's weights into L2 before its
wait (4.11 / 6.16 ms). Kept: only the op before a GEMM releases it early (after its own wait), and the GEMM
prefetches its first weight tiles only (RELEASE_BEFORE_GEMM); the same for paged attention
(RELEASE_BEFORE_ATTENTION). A torch kernel in the chain (no PDL) ends the overlap there: it waits for ours to
finish, and ours, launched after it, wait for it. CUDA graphs keep PDL launches as programmatic edges.
"""
from __future__ import annotations

import functools

import torch

from kernels.dispatch import interpreted, lazy_jit

triton = tl = None  # bound to triton / triton.language by lazy_jit at the first launch

USE_PDL = True   # off: every kernel launches as before (bench A/B, or a driver without PDL)
# Where a kernel whose output feeds a weight-streaming GEMM lets that GEMM launch: None (when all its programs
# have exited), "after_wait" (once each has waited for the kernel before it) or "at_start" (before waiting).
# An early launch places the GEMM's programs while ours run, and they prefetch their first weight tiles
# (kernels.fp8_gemm.PREFETCH_STEPS) before their own wait. H100, single-request decode, Llama-3-8B shape
# (bench/RESULTS.md): FP8 3.848 -> 3.828 ms, 3.819 with the prefetch; bf16 5.991 -> 5.941, 5.884;
# "at_start" 3.838.
RELEASE_BEFORE_GEMM = "after_wait"
# The same for the kernel before paged attention (q/k norm, rotary and the cache write): the attention's
# programs, placed early, read the block table and ask L2 for the keys and values written in earlier steps
# before their own wait (kernels.paged_attention.PREFETCH_KV_TILES). H100, single-request decode (RESULTS.md, with
# the KV prefetch): FP8 p50 3.777 -> 3.729 ms, Qwen3-0.6B 1.212 -> 1.176 with the prologue's own early reads.
RELEASE_BEFORE_ATTENTION = "after_wait"
_RELEASE_MODES = {None: True, "after_wait": 2, "at_start": 3}   # the PDL constexpr: True is wait only


def pdl(device: torch.device, feeds_gemm: bool = False, feeds_attention: bool = False) -> dict:
    """The launch keywords of a kernel that waits with pdl_wait before it reads anything the kernel before it
    writes: the PDL constexpr and, with it on, Triton's launch_pdl (both or neither: a PDL launch of a kernel
    that does not wait would race). feeds_gemm / feeds_attention: the kernel's output is (at decode) a
    weight-streaming GEMM's or paged attention's input: it may release that kernel early (RELEASE_BEFORE_GEMM,
    RELEASE_BEFORE_ATTENTION); whatever the next kernel is, it still waits for ours to finish before it reads
    our output."""
    on = USE_PDL and device.type == "cuda" and _supported(device)
    if not on:
        return {"PDL": False}
    release = RELEASE_BEFORE_GEMM if feeds_gemm else RELEASE_BEFORE_ATTENTION if feeds_attention else None
    return {"PDL": _RELEASE_MODES[release], "launch_pdl": True}


@functools.lru_cache(maxsize=None)
def _supported(device: torch.device) -> bool:
    return not interpreted() and torch.cuda.get_device_capability(device)[0] >= 9


@lazy_jit
def pdl_release(PDL: tl.constexpr):
    """Let the next kernel launch once all our programs have passed this (or exited)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


@lazy_jit
def pdl_wait(PDL: tl.constexpr):
    """Wait for the previous kernel: its writes are visible after this. PDL 2 and 3 (pdl(feeds_gemm=True) or
    pdl(feeds_attention=True)) also let the next kernel launch, after the wait or before it."""
    if PDL == 3:
        tl.extra.cuda.gdc_launch_dependents()
    if PDL:
        tl.extra.cuda.gdc_wait()
    if PDL == 2:
        tl.extra.cuda.gdc_launch_dependents()


@lazy_jit
def prefetch_l2(ptrs, ok):
    """prefetch.global.L2 of each address where ok (a hint: memory the kernel before ours does not write,
    asked for before our wait). Compiled code only (inline PTX): callers run it under PDL."""
    tl.inline_asm_elementwise("{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
                              "=r,l,r", [ptrs, ok.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)
