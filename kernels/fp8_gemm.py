"""Weight-streaming GEMM for small batches (decode): y [M, N] = x [M, K] @ W.T (+ bias) in x's dtype, W [N, K]
  * float8 e4m3 with per-output-channel fp32 scales, W = w * w_scale [N, 1] (W8A16, quantization fp8; x is
    not quantized): fp8_weight_gemm;
  * or unquantized, in x's dtype (bf16/fp16/fp32; HAS_SCALE off): weight_gemm, what the unquantized linear
    layers run at decode sizes when backend.quantization.TRITON_BF16_GEMV_MAX_M lets them.
(The module kept the name of its first, FP8-only scope.)

At decode sizes (M up to ~64) the GEMM is a stream of the weight: time ~ bytes of W / bandwidth, which
takes enough loads in flight on every SM. The kernel
  * tiles N: each program owns BLOCK_N output channels and all BLOCK_M rows of an M tile;
  * may split K (SPLIT_K): program (n tile, m tile, s) streams the s-th K slice (a whole number of BLOCK_K
    steps) and writes its fp32 partial to a workspace [SPLIT_K, M, N]; the tile's last slice to finish (an
    arrival counter per output tile) sums the partials in slice order (deterministic: the same bits whichever
    slice arrives last), applies the scale and bias and casts: no second kernel. Without a split there is no
    workspace: the one program applies them itself;
  * converts each e4m3 tile to x's dtype in registers (exact: every e4m3 value is a bf16, fp16 and fp32
    value) for a tensor-core dot with M padded to 16 rows (free: memory-bound), accumulating in fp32;
  * applies the per-channel scale once to the fp32 sum, adds the bias in fp32, casts once.
The heuristic (gemm_config) first picks the N tiling (from the H100 sweeps), then splits K where that alone
leaves too few programs: for e4m3 under 1.5 per SM (Llama-3-8B's qkv, o and down at M <= 16: 96-128
programs on the H100's 132 SMs), with the smallest power of two that reaches 2 (so 2-4 programs per SM);
bf16 weights, which stream at bandwidth from fewer programs, only under 0.5 per SM (SPLIT_BELOW_PER_SM).
K steps are mostly chosen in bytes of W, so bf16 weights get half the K elements of e4m3 ones for the same
loads and shared memory. The knobs of *_triton override any of it.
With an e4m3 x and its per-token scales (W8A8: fp8_w8a8_gemm_triton, what quantization fp8 runs at decode sizes)
the tiles take e4m3 as they are and the dot is swapped (out.T = W @ x.T: W8A8_BLOCK_N and below).
Variants for bench/fp8_gemm.py --variants (knobs, off by default; H100 sweeps in bench/RESULTS.md): other e4m3
conversions (CONVERTS), the dot swapped or not.
Under PDL (kernels.pdl) each program releases the next kernel after its main loop.
No host syncs and no data-dependent host branches (the config follows shapes only; the workspace is a
torch.empty per call, which the caching allocator serves from the graph's pool under capture; the counters are
made once per device, before any capture): CUDA-graph safe.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from kernels.dispatch import cdiv, interpreted, lazy_jit, num_sms, use_triton
from kernels.pdl import pdl, pdl_release, pdl_wait, prefetch_l2
from kernels.fp8 import FP8_DTYPE
from kernels.arrival import MAX_COUNTERS, _arrive_last, _reset, arrival_counters

triton = tl = None  # bound to triton / triton.language by lazy_jit at the first launch

MAX_SPLIT_K = 16
MIN_SLICE_STEPS = 4   # K steps a slice keeps at least: fewer, and the 3-stage pipeline is mostly fill and drain
# Split K below this many programs per SM, by bytes of a weight element. e4m3 at 1.5: more programs help its
# small projections, which lose to start-up and tail more than to the conversion (H100, M = 1: qkv 16.2 -> 12.9
# us, down 25.2 -> 24.4; bench/fp8_gemm.py --variants: every other conversion is slower); not 2: a grid just
# short of it (M = 32's o and down: 256 programs on 132 SMs) would pay the partials' round trip and the fixup
# for 3% more programs. bf16 streams at bandwidth from its N tiles alone (0.7-1 per
# SM on Llama-3-8B): the split cost qkv and o 4-5% on the H100 (19.8 -> 20.6 us, 14.3 -> 15.0), so only a
# much smaller grid splits.
SPLIT_BELOW_PER_SM = {1: 1.5, 2: 0.5, 4: 0.5}
# A split doubles until the grid has SPLIT_TO_PER_SM programs per SM, each streaming SPLIT_STEP_BYTES of a weight
# row a K step. In the FP8 decode step (H100, with the early release and prefetch; RESULTS.md) 2 and 256 beat
# 1 (3.82 -> 3.90 ms), 4 (4.04), 512-byte steps (4.09), no split at all (3.91) and a lower threshold (same).
SPLIT_TO_PER_SM = 2
SPLIT_STEP_BYTES = 256
# K steps of its weight tile a program asks L2 for before its PDL wait (the weights never depend on the kernel
# before), by bytes of a weight element: with kernels.pdl.RELEASE_BEFORE_GEMM, that wait overlaps the op
# before the GEMM. H100, M = 1 (RESULTS.md): e4m3 best at 1 step (2: 3.82 -> 3.94 ms a step), bf16 at 2.
PREFETCH_STEPS = {1: 1, 2: 2}
# W8A8 (an e4m3 x, quantization fp8 at decode sizes): the dot swapped, the weight tile wgmma's wide operand (e4m3 x
# e4m3, nothing converted), W8A8_BLOCK_N output channels a program where that leaves 1.5 programs per SM, else 64
# (then K steps of 512 bytes up to 32 rows, where shared memory holds them). H100, Llama-3-8B projections, best
# tiles of bench sweeps (RESULTS.md): a layer's four GEMMs 80-91 us at M = 1-64 against 110-118 for _scaled_mm
# and 92-207 for the W8A16 kernel. The K split (with_split_k) only from W8A8_SPLIT_MIN_K on: the fp8 dot's sums
# lose precision over a long K (down, K = 14,336: off the fp32 result by more than 1% unsplit, not in 4 slices).
W8A8_BLOCK_N = 128
W8A8_BLOCK_K = 256
W8A8_SPLIT_MIN_K = 8192
# Where it splits, to 1 program per SM (not SPLIT_TO_PER_SM): down at M = 1 in 4 slices, not 8. H100, FP8 single
# request (RESULTS.md): 3.548 -> 3.501 ms a step; the sweeps' best down tiles at M = 16-64 are 4 slices as well.
W8A8_SPLIT_TO_PER_SM = 1


def fp8_weight_gemm_ref(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ (weight [N, K] e4m3 * weight_scale [N]).T (+ bias) in fp32, cast to x's dtype."""
    return _fp32_linear(x, weight.float() * weight_scale.float()[:, None], bias)


def weight_gemm_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ weight [N, K].T (+ bias) in fp32, cast to x's dtype."""
    return _fp32_linear(x, weight.float(), bias)


def _fp32_linear(x, w_fp32, bias):
    y = x.float() @ w_fp32.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


@lazy_jit
def _e4m3_to(w, dtype, CONVERT: tl.constexpr):
    """e4m3 w in dtype, exactly (every e4m3 value is a bf16, fp16 and fp32 value), by one of the conversions
    (CONVERTS) that bench/fp8_gemm.py --variants times; through fp32 (0) was the fastest on the H100."""
    if CONVERT == 1:    # Triton's own e4m3 -> dtype
        return w.to(dtype)
    elif CONVERT == 2:  # e4m3's bits placed in fp32's: the value * 2^-120 (subnormals too), times 2^120
        b = w.to(tl.uint8, bitcast=True).to(tl.uint32)
        f = (((b & 0x80) << 24) | ((b & 0x7F) << 20)).to(tl.float32, bitcast=True)
        return (f * 1.329227995784916e36).to(dtype)
    elif CONVERT == 3:  # the same in bf16's bits, times 2^120 in bf16 (x in bf16 only)
        b = w.to(tl.uint8, bitcast=True).to(tl.uint16)
        h = (((b & 0x80) << 8) | ((b & 0x7F) << 4)).to(tl.bfloat16, bitcast=True)
        return h * 1.329227995784916e36
    else:               # through fp32
        return w.to(tl.float32).to(dtype)


@lazy_jit
def _dot_tile(acc, a, b, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """acc + a @ b in fp32."""
    if UPCAST_DOT:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return acc


@lazy_jit
def _weight_operand(w, dtype, HAS_SCALE: tl.constexpr, X_FP8: tl.constexpr, CONVERT: tl.constexpr):
    """The weight tile as the dot takes it: e4m3 as it is against an e4m3 x (W8A8), else in x's dtype."""
    if HAS_SCALE and not X_FP8:
        w = _e4m3_to(w, dtype, CONVERT)
    return w


@lazy_jit
def _scale_bias_store(acc, offs_m, offs_n, m, n, x_scale_ptr, scale_ptr, bias_ptr, out_ptr, out_stride,
                      HAS_SCALE: tl.constexpr, X_FP8: tl.constexpr, HAS_BIAS: tl.constexpr):
    """out[offs_m, offs_n] = (acc * x_scale * scale + bias) cast to out's dtype: in fp32, one rounding."""
    n_ok = offs_n < n
    if X_FP8:   # x's per-token scales, [M, 1]
        acc = acc * tl.load(x_scale_ptr + offs_m, mask=offs_m < m, other=0.0)[:, None]
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * out_stride + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m < m)[:, None] & n_ok[None, :])


@lazy_jit
def _prefetch_weight_l2(w_ptr, offs_n, n_ok, k_start, k_end, w_stride, BLOCK_K: tl.constexpr, STEPS: tl.constexpr):
    """prefetch.global.L2 of the program's first STEPS weight tiles [BLOCK_K, BLOCK_N], one address per
    128-byte line."""
    per_line: tl.constexpr = 1024 // w_ptr.dtype.element_ty.primitive_bitwidth
    lines = tl.arange(0, BLOCK_K // per_line) * per_line
    for step in tl.static_range(STEPS):
        cols = k_start + step * BLOCK_K + lines
        ok = (cols < k_end)[:, None] & n_ok[None, :]
        prefetch_l2(w_ptr + offs_n.to(tl.int64)[None, :] * w_stride + cols[:, None], ok)


@lazy_jit
def _weight_stream_kernel(x_ptr, x_scale_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, partial_ptr, counter_ptr,
                          m, n, k, k_per_split, x_stride, w_stride, out_stride,
                          HAS_SCALE: tl.constexpr, X_FP8: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          CONVERT: tl.constexpr, SWAP_AB: tl.constexpr,
                          DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, PDL: tl.constexpr,
                          PREFETCH: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(2)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok, m_ok = offs_n < n, offs_m < m
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * x_stride + offs_k[None, :]          # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * w_stride + offs_k[:, None]          # [BLOCK_K, BLOCK_N]
    # This program's K slice; k_per_split is a multiple of BLOCK_K, so only the last step of the last
    # slice is partial, and masks on K alone suffice.
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, k)
    if PREFETCH > 0:
        _prefetch_weight_l2(w_ptr, offs_n, n_ok, k_start, k_end, w_stride, BLOCK_K, PREFETCH)
    pdl_wait(PDL)
    # SWAP_AB: out.T = W @ x.T, the weight tile the dot's wide operand (Hopper's wgmma wants >= 64 rows there,
    # and takes that operand from registers, where an e4m3 tile is converted)
    acc = tl.zeros((BLOCK_N, BLOCK_M) if SWAP_AB else (BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k_ok = offs_k + k0 < k   # every load masked on K: the row past K is another row's (or no) memory
        x = tl.load(x_ptrs + k0, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = _weight_operand(tl.load(w_ptrs + k0, mask=k_ok[:, None] & n_ok[None, :], other=0.0), x.dtype,
                            HAS_SCALE, X_FP8, CONVERT)
        if SWAP_AB:
            acc = _dot_tile(acc, tl.trans(w), tl.trans(x), DOT_PRECISION, UPCAST_DOT)
        else:
            acc = _dot_tile(acc, x, w, DOT_PRECISION, UPCAST_DOT)
    pdl_release(PDL)   # the epilogue left: the next kernel's launch overlaps it
    if SWAP_AB:
        acc = tl.trans(acc)
    if SPLIT_K == 1:
        _scale_bias_store(acc, offs_m, offs_n, m, n, x_scale_ptr, scale_ptr, bias_ptr, out_ptr, out_stride, HAS_SCALE,
                          X_FP8, HAS_BIAS)
    else:
        _split_k_fixup(acc, offs_m, offs_n, m, n, split, partial_ptr, counter_ptr, x_scale_ptr, scale_ptr, bias_ptr,
                       out_ptr, out_stride, HAS_SCALE, X_FP8, HAS_BIAS, SPLIT_K)


@lazy_jit
def _split_k_fixup(acc, offs_m, offs_n, m, n, split, partial_ptr, counter_ptr, x_scale_ptr, scale_ptr, bias_ptr,
                   out_ptr, out_stride, HAS_SCALE: tl.constexpr, X_FP8: tl.constexpr, HAS_BIAS: tl.constexpr,
                   SPLIT_K: tl.constexpr):
    """A K slice's fp32 partial to the workspace [SPLIT_K, M, N]; the tile's last slice to arrive (a counter per
    output tile) then sums all of them in slice order (the same bits whichever arrives last), applies the
    scales and bias, stores, and resets the counter to 0 for the next launch. No second kernel."""
    ok = (offs_m < m)[:, None] & (offs_n < n)[None, :]
    cols = offs_n[None, :]
    tl.store(partial_ptr + (split * m + offs_m).to(tl.int64)[:, None] * n + cols, acc, mask=ok)
    tile = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    if _arrive_last(counter_ptr + tile, SPLIT_K):
        total = tl.zeros(acc.shape, dtype=tl.float32)
        for s in tl.static_range(SPLIT_K):   # .cg: from L2, where the other SMs' partials are
            total += tl.load(partial_ptr + (s * m + offs_m).to(tl.int64)[:, None] * n + cols, mask=ok, other=0.0,
                             cache_modifier=".cg")
        _scale_bias_store(total, offs_m, offs_n, m, n, x_scale_ptr, scale_ptr, bias_ptr, out_ptr, out_stride,
                          HAS_SCALE, X_FP8, HAS_BIAS)
        _reset(counter_ptr + tile)


class GemmConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    split_k: int = 1
    convert: int = 0        # e4m3 -> x's dtype: CONVERTS
    swap_ab: bool = False   # the dot as out.T = W @ x.T


def gemm_config(m: int, n: int, device: torch.device, k: int | None = None,
                weight_dtype: torch.dtype = FP8_DTYPE, x_fp8: bool = False) -> GemmConfig:
    """The tiles and the K split from the shapes only (python ints). Without k, no split (the N tiling alone).
    x_fp8: W8A8 (an e4m3 x with per-token scales)."""
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64     # tl.dot needs >= 16 rows; padding rows cost no bytes
    sms = num_sms(device)
    if x_fp8:
        block_n = next((wide for wide in (W8A8_BLOCK_N, 64) if cdiv(n, wide) * cdiv(m, block_m) >= 1.5 * sms), 64)
        block_k = 2 * W8A8_BLOCK_K if block_n == 64 and block_m <= 32 else W8A8_BLOCK_K
        tiles = GemmConfig(block_m, block_n, block_k, 4, 4, swap_ab=True)
        if k is None or k < W8A8_SPLIT_MIN_K:
            return tiles
        return with_split_k(tiles, cdiv(n, block_n) * cdiv(m, block_m), k, sms, 1, W8A8_SPLIT_TO_PER_SM)
    elem = weight_dtype.itemsize   # K steps below are in bytes of e4m3 (one byte): wider weights take fewer
    if m <= 16:
        # From bench/fp8_gemm.py --sweep on the H100 (Llama-3-8B projections, M = 1 and 16, e4m3): a wide
        # output (gate_up, 28672) streams best in short K steps; the others in long ones (512) over the widest
        # tile that still gives ~0.7 programs per SM (qkv 64, o and down 32): 22-28% under the old pick.
        # bf16's wide steps are 256 bytes (128 elements: gate_up 80.9 us against 82.5 at 64, H100).
        if cdiv(n, 32) >= 4 * sms:
            tiles = GemmConfig(block_m, 64, 128 if elem == 1 else 256 // elem, 4, 3)
        else:
            block_n = next((wide for wide in (64, 32) if cdiv(n, wide) >= 0.7 * sms), 16)
            tiles = GemmConfig(block_m, block_n, 512 // elem, 4, 4)
    else:
        block_n = 16
        for wide in (64, 32):   # widest tile that still leaves ~2 programs per SM to keep loads in flight
            if cdiv(n, wide) * cdiv(m, block_m) >= 2 * sms:
                block_n = wide
                break
        tiles = GemmConfig(block_m, block_n, 256 // elem, 4, 4)
    if k is None:
        return tiles
    return with_split_k(tiles, cdiv(n, tiles.block_n) * cdiv(m, block_m), k, sms, elem)


def with_split_k(tiles: GemmConfig, programs: int, k: int, sms: int, elem: int,
                 to_per_sm: float | None = None) -> GemmConfig:
    """Split K when the N x M tiling gives fewer than SPLIT_BELOW_PER_SM programs per SM: the smallest power
    of two that reaches to_per_sm programs per SM (default SPLIT_TO_PER_SM: so 2-4 per SM), while each slice keeps
    MIN_SLICE_STEPS K steps. Split programs stream shorter K steps (SPLIT_STEP_BYTES a row, 3 stages) so that 2-4
    of them fit an SM's shared memory."""
    if programs >= SPLIT_BELOW_PER_SM[elem] * sms:
        return tiles
    block_k = min(tiles.block_k, SPLIT_STEP_BYTES // elem)
    to_per_sm = SPLIT_TO_PER_SM if to_per_sm is None else to_per_sm
    most = min(MAX_SPLIT_K, cdiv(k, block_k) // MIN_SLICE_STEPS)
    split = 1
    while programs * split < to_per_sm * sms and 2 * split <= most:
        split *= 2
    if split == 1:
        return tiles
    return tiles._replace(block_k=block_k, num_stages=3, split_k=split)


def k_slices(k: int, split_k: int, block_k: int) -> tuple[int, int]:
    """(K elements per slice, a multiple of block_k; slices that hold any K): the last slice is the short one."""
    per_split = cdiv(cdiv(k, split_k), block_k) * block_k
    return per_split, max(1, cdiv(k, per_split))


# _e4m3_to's conversions, by the CONVERT constexpr (3 is for bf16 x only: others take 0)
CONVERTS = {0: "through fp32", 1: "triton's cast", 2: "bits into fp32, x 2^120", 3: "bits into bf16, x 2^120"}
KNOBS = ("split_k", "block_n", "block_k", "num_warps", "num_stages", "convert", "swap_ab")


def _weight_stream_gemm(x, weight, weight_scale, bias, knobs: dict, x_scale=None, out_dtype=None) -> torch.Tensor:
    """x_scale: x is e4m3 with per-token scales [M, 1] (W8A8), out in out_dtype; else out in x's dtype."""
    m, k = x.shape
    n = weight.shape[0]
    out = torch.empty(m, n, dtype=out_dtype or x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if x.stride(-1) != 1:
        x = x.contiguous()
    assert weight.stride(-1) == 1 and weight.shape[1] == k and (bias is None or bias.is_contiguous())
    assert weight_scale is not None or weight.dtype == x.dtype, "an unquantized weight must be in x's dtype"
    assert x_scale is None or (weight_scale is not None and x_scale.is_contiguous() and x_scale.numel() == m)
    config = gemm_config(m, n, x.device, k, weight.dtype, x_scale is not None)
    config = config._replace(**{name: v for name, v in knobs.items() if v is not None})
    if config.convert == 3 and x.dtype != torch.bfloat16:
        config = config._replace(convert=0)
    k_per_split, split_k = k_slices(k, config.split_k, config.block_k)
    # the workspace exists only for a split: partials in fp32, each [M, N] slice written whole
    partial = torch.empty(split_k, m, n, dtype=torch.float32, device=x.device) if split_k > 1 else out
    scale = weight_scale if weight_scale is not None else out   # never read when HAS_SCALE is off
    bias_arg = bias if bias is not None else out                 # never read when HAS_BIAS is off
    x_scale_arg = x_scale if x_scale is not None else out        # never read when X_FP8 is off
    flags = dict(HAS_SCALE=weight_scale is not None, X_FP8=x_scale is not None, HAS_BIAS=bias is not None,
                 SPLIT_K=split_k)
    grid = (cdiv(n, config.block_n), cdiv(m, config.block_m), split_k)
    launch = pdl(x.device)
    counters = arrival_counters(x.device) if split_k > 1 else partial
    assert split_k == 1 or grid[0] * grid[1] <= MAX_COUNTERS
    _weight_stream_kernel[grid](
        x, x_scale_arg, weight, scale, bias_arg, out, partial, counters, m, n, k, k_per_split,
        x.stride(0), weight.stride(0), out.stride(0), **flags,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        CONVERT=config.convert, SWAP_AB=config.swap_ab,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else None,   # fp32: no silent tf32
        # Triton's interpreter multiplies bf16 (and e4m3) operands' storage bits in tl.dot: run those dots in
        # fp32 there
        UPCAST_DOT=interpreted() and (x.dtype == torch.bfloat16 or x_scale is not None),
        # only where a PDL launch may start early, and tiles of whole 128-byte lines
        PREFETCH=_prefetch_steps(weight.element_size(), config.block_k, launch["PDL"]),
        num_warps=config.num_warps, num_stages=config.num_stages, **launch)
    return out


def _prefetch_steps(elem: int, block_k: int, pdl_on) -> int:
    """PREFETCH_STEPS of this weight width where a PDL launch may start early, on tiles of whole 128-byte
    lines; else 0."""
    return PREFETCH_STEPS.get(elem, 0) if pdl_on and block_k * elem >= 128 else 0


def fp8_weight_gemm_triton(x, weight, weight_scale, bias=None, **knobs):
    """W8A16. The keyword-only knobs (KNOBS) override the heuristic (tests force tile shapes and variants with
    them; bench sweeps them)."""
    assert weight_scale.is_contiguous() and set(knobs) <= set(KNOBS)
    return _weight_stream_gemm(x, weight, weight_scale, bias, knobs)


def fp8_w8a8_gemm_triton(x_fp8, x_scale, weight, weight_scale, bias=None, out_dtype=torch.bfloat16, **knobs):
    """x_fp8 [M, K] e4m3 with per-token scales [M, 1] @ (weight [N, K] e4m3 * weight_scale [N]).T (+ bias) ->
    [M, N] in out_dtype: the weight stream with an e4m3 x, no conversion in the loop (the dot takes e4m3)."""
    assert weight_scale.is_contiguous() and set(knobs) <= set(KNOBS)
    return _weight_stream_gemm(x_fp8, weight, weight_scale, bias, knobs, x_scale=x_scale, out_dtype=out_dtype)


def fp8_w8a8_gemm_ref(x_fp8, x_scale, weight, weight_scale, bias=None, out_dtype=torch.bfloat16):
    """(x_fp8 * x_scale) @ (weight * weight_scale).T (+ bias) in fp32, cast to out_dtype."""
    return _fp32_linear(x_fp8.float() * x_scale.float(), weight.float() * weight_scale.float()[:, None],
                        bias).to(out_dtype)


def weight_gemm_triton(x, weight, bias=None, **knobs):
    """weight_gemm's kernel; the knobs as fp8_weight_gemm_triton's."""
    assert set(knobs) <= set(KNOBS)
    return _weight_stream_gemm(x, weight, None, bias, knobs)


def fp8_weight_gemm(x, weight, weight_scale, bias=None):
    """x [M, K] (bf16/fp16/fp32) with e4m3 weight [N, K] and fp32 weight_scale [N] -> [M, N] in x's dtype."""
    if use_triton(x):
        return fp8_weight_gemm_triton(x, weight, weight_scale, bias)
    return fp8_weight_gemm_ref(x, weight, weight_scale, bias)


def weight_gemm(x, weight, bias=None):
    """x [M, K] @ weight [N, K].T (+ bias), both in one dtype (bf16/fp16/fp32) -> [M, N] in that dtype."""
    if use_triton(x):
        return weight_gemm_triton(x, weight, bias)
    return weight_gemm_ref(x, weight, bias)
