"""The greedy sampler's argmax: each row's first index of its maximum, NaN counting as the maximum (as
torch.argmax; a row of -inf gives 0), for a few rows over a long vocabulary (decode: V = 128k).

torch reduces a row in one thread block, and cutting rows into pieces took 4 launches (max over pieces, argmax
over them, a gather and an add: 16.7 us of kernels a step on the H100 at V = 128,256). Here two launches: PIECES
programs a row each find their piece's maximum, its first index and the piece's first NaN; one program a row then
picks the first piece holding the row's maximum (or the first NaN)."""
from __future__ import annotations

import torch

from kernels.dispatch import cdiv, lazy_jit, next_pow2, use_triton
from kernels.pdl import pdl, pdl_wait

triton = tl = None  # bound to triton / triton.language by lazy_jit at the first launch

PIECES = 128   # programs a row in the first launch (as many as an H100 has SMs, about)
# In the kernels 2147483647 (int32's largest: a literal, a jit function reads no plain globals) stands for "no
# index": it loses every min.


@lazy_jit
def _piece_argmax_kernel(x_ptr, piece_max_ptr, piece_arg_ptr, piece_nan_ptr, vocab, width, x_stride,
                         BLOCK: tl.constexpr, PIECES: tl.constexpr, PDL: tl.constexpr):
    """Grid (rows, PIECES): the piece's largest non-NaN value, the first index holding it, its first NaN's index."""
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    piece = tl.program_id(1)
    cols = piece * width + tl.arange(0, BLOCK)
    ok = (tl.arange(0, BLOCK) < width) & (cols < vocab)
    x = tl.load(x_ptr + row * x_stride + cols, mask=ok, other=float("-inf")).to(tl.float32)
    nan = ok & (x != x)
    value = tl.where(nan, float("-inf"), x)
    top = tl.max(value, axis=0)
    first = tl.min(tl.where(ok & (value == top), cols, 2147483647), axis=0)
    first_nan = tl.min(tl.where(nan, cols, 2147483647), axis=0)
    at = row * PIECES + piece
    tl.store(piece_max_ptr + at, top)
    tl.store(piece_arg_ptr + at, first)
    tl.store(piece_nan_ptr + at, first_nan)


@lazy_jit
def _pick_piece_kernel(out_ptr, piece_max_ptr, piece_arg_ptr, piece_nan_ptr, PIECES: tl.constexpr, PDL: tl.constexpr):
    """Grid (rows,): the row's first NaN if any, else the first index of the largest piece maximum (pieces run
    in index order, so the smallest index among the pieces holding it)."""
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    at = row * PIECES + tl.arange(0, PIECES)
    top = tl.load(piece_max_ptr + at)
    arg = tl.load(piece_arg_ptr + at)
    first_nan = tl.min(tl.load(piece_nan_ptr + at), axis=0)
    first = tl.min(tl.where(top == tl.max(top, axis=0), arg, 2147483647), axis=0)
    tl.store(out_ptr + row, tl.where(first_nan < 2147483647, first_nan, first).to(tl.int64))


def first_argmax_triton(x: torch.Tensor) -> torch.Tensor:
    """x [S, V] (V < 2^31) -> int64 [S]."""
    rows, vocab = x.shape
    out = torch.empty(rows, dtype=torch.int64, device=x.device)
    if not rows:
        return out
    if x.stride(-1) != 1:
        x = x.contiguous()
    width = cdiv(vocab, PIECES)
    piece_max = torch.empty(rows, PIECES, dtype=torch.float32, device=x.device)
    piece_arg = torch.empty(rows, PIECES, dtype=torch.int32, device=x.device)
    piece_nan = torch.empty_like(piece_arg)
    _piece_argmax_kernel[(rows, PIECES)](x, piece_max, piece_arg, piece_nan, vocab, width, x.stride(0),
                                         BLOCK=next_pow2(width), PIECES=PIECES, num_warps=4, **pdl(x.device))
    _pick_piece_kernel[(rows,)](out, piece_max, piece_arg, piece_nan, PIECES=PIECES, num_warps=4, **pdl(x.device))
    return out


def first_argmax_ref(x: torch.Tensor) -> torch.Tensor:
    return x.argmax(dim=-1)


def first_argmax(x: torch.Tensor) -> torch.Tensor:
    if use_triton(x):
        return first_argmax_triton(x)
    return first_argmax_ref(x)
