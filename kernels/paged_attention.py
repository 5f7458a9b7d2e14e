"""Paged attention over a block-table KV cache: a torch reference and a "unified" Triton kernel.

The Triton path serves a packed batch that mixes prefill chunks and decodes in one launch:
  * grid (query tiles over the whole batch, kv heads[, kv segments]); the grid size T // BLOCK_Q + S
    is an upper bound, each program finds its sequence by binary search over query_start_loc and
    exits when its tile is past the sequence's queries, so no host sync is needed;
  * the GROUP query heads sharing a kv head are rows of one BLOCK_M-row tile (BLOCK_Q tokens x GROUP
    heads), so tl.dot has >= 16 rows even for a decode;
  * KV tiles of TILE_N positions, gathered through the block table per position (any block size),
    masked at the sequence length on every K/V load (unwritten cache may hold NaN) and at the causal
    frontier; tiles past the frontier of the tile's last query are skipped, and for prefill-sized
    tiles those wholly before the tile's first query run in a separate loop without masks;
    online softmax in fp32 (base 2);
  * split-KV (flash decoding) for decode batches with few sequences: NUM_SEGMENTS programs per
    (tile, kv head) each write an unnormalised fp32 partial output with its running max and exp-sum,
    and a reduce kernel rescales and combines them;
  * split_decodes (padded CUDA-graph batches, whose mix of query lengths is unknown at capture): two
    launches of the kernel, MODE_DECODE with decode-sized tiles and one program per sequence (those
    whose query is not one token exit), then MODE_PREFILL with prefill-sized tiles over the
    upper-bound grid (one-token queries exit). A single launch would size every tile for the
    longest query, and 128-row tiles on decode rows cost tensor-core time rivalling the KV reads.
Variants of the tile loop, FlashAttention-2 style, for prefill-sized tiles: constexprs of the kernel, keywords
of paged_attention_triton (VARIANT_KNOBS); a call that leaves one None gets PREFILL_VARIANT's value on
prefill-sized tiles and off on decode tiles (their loop is unchanged); bench/prefill_attention.py times each on
an H100 against SDPA, and PREFILL_VARIANT holds the winners (the first three).
  * fma_softmax: scores stay unscaled; the row max is scaled once per row and each score enters exp2 through
    one FMA (s * scale - max); unmasked tiles drop the guard for rows whose max is -inf (none is there);
  * k_row_major: K tiles load as [TILE_N, HEAD_DIM], in the cache's order, and enter the dot through tl.trans,
    instead of a [HEAD_DIM, TILE_N] pointer layout;
  * dot_acc: the rescaled accumulator is the P @ V dot's addend rather than a separate add;
  * early_v: V's load is issued before the QK dot, so its latency overlaps the softmax;
  * hoist_table: a tile's block ids are read once per block (once per tile where one block holds it) and
    broadcast over the block's rows, not once per row; blocks smaller than TILE_N / 8 keep the per-row read;
  * prefetch_table: each tile's block ids are read one tile ahead, so its K/V loads wait on no table read;
  * reverse_tiles: a sequence's query tiles start last-first: the longest causal spans first, so the grid
    ends on short tiles.
FP8 caches (kv_cache_dtype fp8): K/V tiles are float8 e4m3, converted to q's dtype (exact: every e4m3
value is a bf16, fp16 and fp32 value) for the same dots; the per-tensor k_scale folds into the score
scale and v_scale multiplies the fp32 accumulator, so scales cost nothing per tile and are read on the
device (no host sync, CUDA-graph safe).
Under PDL (kernels.pdl) a program finds its sequence and tiles, and on decode tiles asks L2 for its first keys
and values of earlier steps (PREFETCH_KV_TILES), before it waits for the kernel before (which releases it
early): none of that is written by a kernel of the forward pass; q is read after the wait.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from kernels.dispatch import interpreted, lazy_jit, next_pow2, num_sms, use_triton
import kernels.pdl as pdl_module
from kernels.pdl import pdl, pdl_wait, prefetch_l2
from kernels.fp8 import from_fp8_ref, is_fp8

triton = tl = None  # bound to triton / triton.language by lazy_jit at the first launch

# which queries a launch serves: all, one-token ones, longer ones (literals in the kernel: triton reads no globals)
MODE_ALL, MODE_DECODE, MODE_PREFILL = 0, 1, 2


def paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, k_scale=None,
                        v_scale=None):
    """Varlen causal attention over the paged cache, for a packed batch of prefill chunks and decodes.

    q [T, Hq, D] holds each sequence's new tokens, packed (query_start_loc [S+1] gives the cuts);
    their K/V are already in the cache. Sequence s has seq_lens[s] tokens in all; its new tokens
    are the last ones, so query i of s sits at position seq_lens[s] - q_len + i and sees every
    position up to it. block_tables [S, max_blocks] maps logical to physical blocks. FP8 caches are
    dequantized (value * k_scale, value * v_scale) and attended in fp32 like the others.
    """
    out = torch.empty_like(q)
    block_size = k_cache.shape[1]
    group = q.shape[1] // k_cache.shape[2]
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    for s, seq_len in enumerate(lens):
        q_s = q[starts[s]:starts[s + 1]]
        q_len = q_s.shape[0]
        if q_len == 0:
            continue
        blocks = block_tables[s, :(seq_len + block_size - 1) // block_size].long()
        k = k_cache[blocks].flatten(0, 1)[:seq_len].float()
        v = v_cache[blocks].flatten(0, 1)[:seq_len].float()
        if is_fp8(k_cache):
            k, v = from_fp8_ref(k, k_scale), from_fp8_ref(v, v_scale)
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device).unsqueeze(1)
        mask = torch.arange(seq_len, device=q.device).unsqueeze(0) <= q_pos  # [q_len, seq_len]
        o = F.scaled_dot_product_attention(q_s.float().transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                           attn_mask=mask, scale=scale)
        out[starts[s]:starts[s + 1]] = o.transpose(0, 1).to(q.dtype)
    return out


@lazy_jit
def _find_sequence(query_start_loc_ptr, q_tile, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence whose query tiles hold global tile `q_tile`; sequence s's tiles start at
    query_start_loc[s] // BLOCK_Q + s (an upper-bound layout that needs no prefix sum)."""
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_tile = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first_tile <= q_tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


# How an FP8 cache's tiles reach the dots (KV_FP8); FP8_CONVERT_DIRECT picks the compiled one (see _fp8_mode).
FP8_VIA_FP32, FP8_DIRECT = 1, 2
FP8_CONVERT_DIRECT = False


@lazy_jit
def _tile_kv_offsets(table, j, seq_len, head_off, c_stride_b, c_stride_s, BLOCK_SIZE: tl.constexpr,
                     TILE_N: tl.constexpr, CHECK_END: tl.constexpr, HOIST_TABLE: tl.constexpr):
    """Cache offsets [TILE_N] (int64) of one kv head's K/V rows at positions j * TILE_N + [0, TILE_N).
    CHECK_END: the tile may run past the sequence, where the table holds padding (maybe past its end): those
    entries are not read (block 0 stands in; the K/V loads mask those rows). HOIST_TABLE: where a tile spans
    whole blocks (or lies in one), read one table entry per block and broadcast it over the block's rows, not
    one per row (fewer dependent loads ahead of the K/V loads); smaller blocks gather per row."""
    if HOIST_TABLE and BLOCK_SIZE % TILE_N == 0:   # the tile lies in one block
        first = j * TILE_N
        if CHECK_END:
            block = tl.load(table + first // BLOCK_SIZE, mask=first < seq_len, other=0).to(tl.int64)
        else:
            block = tl.load(table + first // BLOCK_SIZE).to(tl.int64)
        slot = (first % BLOCK_SIZE + tl.arange(0, TILE_N)).to(tl.int64)
        return block * c_stride_b + slot * c_stride_s + head_off
    elif HOIST_TABLE and TILE_N % BLOCK_SIZE == 0 and TILE_N // BLOCK_SIZE <= 8:   # a few whole blocks
        # one uniform load per block, selected per row (a reshape of [blocks, slots] offsets kept Triton 3.6's
        # pipeliner from pipelining the K/V loads, and more blocks than 8 cost more selects than a gather)
        row = tl.arange(0, TILE_N)
        block = tl.zeros([TILE_N], dtype=tl.int64)
        for i in tl.static_range(TILE_N // BLOCK_SIZE):
            idx = j * (TILE_N // BLOCK_SIZE) + i
            if CHECK_END:
                block_i = tl.load(table + idx, mask=idx * BLOCK_SIZE < seq_len, other=0)
            else:
                block_i = tl.load(table + idx)
            block = tl.where(row // BLOCK_SIZE == i, block_i.to(tl.int64), block)
        return block * c_stride_b + (row % BLOCK_SIZE).to(tl.int64) * c_stride_s + head_off
    else:
        k_pos = j * TILE_N + tl.arange(0, TILE_N)
        if CHECK_END:
            block = tl.load(table + k_pos // BLOCK_SIZE, mask=k_pos < seq_len, other=0).to(tl.int64)
        else:
            block = tl.load(table + k_pos // BLOCK_SIZE).to(tl.int64)
        return block * c_stride_b + (k_pos % BLOCK_SIZE).to(tl.int64) * c_stride_s + head_off


@lazy_jit
def _load_kv_tile(cache_ptr, kv_off, k_ok, dtype, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
                  D_MAJOR: tl.constexpr, KV_FP8: tl.constexpr):
    """A K or V tile in the dots' dtype: [TILE_N, HEAD_DIM] (the cache's order), or [HEAD_DIM, TILE_N] where
    D_MAJOR. MASKED: rows past the sequence read 0 (unwritten cache may hold NaN, and 0 x NaN = NaN)."""
    offs_d = tl.arange(0, HEAD_DIM)
    if D_MAJOR:
        if MASKED:
            x = tl.load(cache_ptr + kv_off[None, :] + offs_d[:, None], mask=k_ok[None, :], other=0.0)
        else:
            x = tl.load(cache_ptr + kv_off[None, :] + offs_d[:, None])
    else:
        if MASKED:
            x = tl.load(cache_ptr + kv_off[:, None] + offs_d[None, :], mask=k_ok[:, None], other=0.0)
        else:
            x = tl.load(cache_ptr + kv_off[:, None] + offs_d[None, :])
    if KV_FP8 == 2:   # FP8_DIRECT; exact in q's dtype; the scales apply to the scores and the accumulator
        x = x.to(dtype)
    elif KV_FP8:
        x = x.to(tl.float32).to(dtype)
    return x


@lazy_jit
def _dot(a, b, acc, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """a @ b (+ acc where acc is not None), fp32."""
    if UPCAST_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@lazy_jit
def _attend_tile(acc, m_i, l_i, q, q_pos, k_pos, kv_off, k_cache_ptr, v_cache_ptr, seq_len, qk_scale,
                 HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
                 KV_FP8: tl.constexpr, FMA_SOFTMAX: tl.constexpr, K_ROW_MAJOR: tl.constexpr,
                 EARLY_V: tl.constexpr, DOT_ACC: tl.constexpr):
    """One KV tile's step of the online softmax (base 2, fp32). MASKED: scores past the sequence or past a
    row's query are -inf, and a row may have seen nothing yet (its max stays -inf)."""
    k_ok = k_pos < seq_len
    k = _load_kv_tile(k_cache_ptr, kv_off, k_ok, q.dtype, HEAD_DIM, MASKED, not K_ROW_MAJOR, KV_FP8)
    if EARLY_V:   # V's load is in flight during the QK dot and the softmax
        v = _load_kv_tile(v_cache_ptr, kv_off, k_ok, q.dtype, HEAD_DIM, MASKED, False, KV_FP8)
    if K_ROW_MAJOR:
        k = tl.trans(k)
    s = _dot(q, k, None, UPCAST_DOT, DOT_PRECISION)
    if not FMA_SOFTMAX:
        s = s * qk_scale
    if MASKED:
        s = tl.where(k_ok[None, :] & (k_pos[None, :] <= q_pos[:, None]), s, float("-inf"))
    if FMA_SOFTMAX:
        # s is unscaled: scale the row max once, and each score in the exponent's FMA
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
        if MASKED:
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)   # rows with nothing visible yet
        else:
            m_ref = m_new   # every score is finite: no row max is -inf
        p = tl.exp2(s * qk_scale - m_ref[:, None])
    else:
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)   # rows with nothing visible yet
        p = tl.exp2(s - m_ref[:, None])
    alpha = tl.exp2(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if not EARLY_V:
        v = _load_kv_tile(v_cache_ptr, kv_off, k_ok, q.dtype, HEAD_DIM, MASKED, False, KV_FP8)
    if DOT_ACC:   # the rescaled accumulator is the dot's addend (no separate add over the tile)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], UPCAST_DOT, DOT_PRECISION)
    else:
        pv = _dot(p.to(v.dtype), v, None, UPCAST_DOT, DOT_PRECISION)
        acc = acc * alpha[:, None] + pv
    return acc, m_new, l_i


@lazy_jit
def _attend_tiles(acc, m_i, l_i, q, q_pos, k_cache_ptr, v_cache_ptr, table, head_off, seq_len, tile_lo, tile_hi,
                  qk_scale, c_stride_b, c_stride_s, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                  TILE_N: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
                  KV_FP8: tl.constexpr, FMA_SOFTMAX: tl.constexpr, K_ROW_MAJOR: tl.constexpr, EARLY_V: tl.constexpr,
                  DOT_ACC: tl.constexpr, HOIST_TABLE: tl.constexpr, PREFETCH_TABLE: tl.constexpr):
    """Online softmax over KV tiles [tile_lo, tile_hi). MASKED: the tiles may hold positions past the sequence
    or past some row's query; K/V loads are then masked at the sequence length and scores at the causal
    frontier. PREFETCH_TABLE: each tile's block-table read is issued one tile ahead, so the K/V loads wait on
    no table read."""
    offs_n = tl.arange(0, TILE_N)
    if PREFETCH_TABLE:
        next_off = _tile_kv_offsets(table, tile_lo, seq_len, head_off, c_stride_b, c_stride_s, BLOCK_SIZE, TILE_N,
                                    True, HOIST_TABLE)
        for j in range(tile_lo, tile_hi):
            kv_off = next_off
            # the next tile may lie past the sequence (past this loop's range): its table read is masked
            next_off = _tile_kv_offsets(table, j + 1, seq_len, head_off, c_stride_b, c_stride_s, BLOCK_SIZE, TILE_N,
                                        True, HOIST_TABLE)
            acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, q_pos, j * TILE_N + offs_n, kv_off, k_cache_ptr,
                                         v_cache_ptr, seq_len, qk_scale, HEAD_DIM, MASKED, DOT_PRECISION, UPCAST_DOT,
                                         KV_FP8, FMA_SOFTMAX, K_ROW_MAJOR, EARLY_V, DOT_ACC)
    else:
        for j in range(tile_lo, tile_hi):
            kv_off = _tile_kv_offsets(table, j, seq_len, head_off, c_stride_b, c_stride_s, BLOCK_SIZE, TILE_N,
                                      MASKED, HOIST_TABLE)
            acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, q_pos, j * TILE_N + offs_n, kv_off, k_cache_ptr,
                                         v_cache_ptr, seq_len, qk_scale, HEAD_DIM, MASKED, DOT_PRECISION, UPCAST_DOT,
                                         KV_FP8, FMA_SOFTMAX, K_ROW_MAJOR, EARLY_V, DOT_ACC)
    return acc, m_i, l_i


@lazy_jit
def _prefetch_kv_l2(k_cache_ptr, v_cache_ptr, table, head_off, tile_lo, tile_hi, context_len, c_stride_b,
                    c_stride_s, BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, TILES: tl.constexpr,
                    KV_LINES: tl.constexpr):
    """Ask L2 for the keys and values of the first TILES tiles of [tile_lo, tile_hi) that lie before
    context_len (written in earlier steps), one address per 128-byte line (KV_LINES a head's row)."""
    per_line: tl.constexpr = 1024 // k_cache_ptr.dtype.element_ty.primitive_bitwidth
    lines = tl.arange(0, KV_LINES) * per_line
    for i in tl.static_range(TILES):
        j = tile_lo + i
        k_pos = j * TILE_N + tl.arange(0, TILE_N)
        ok = (k_pos < context_len) & (j < tile_hi)
        kv_off = _tile_kv_offsets(table, j, context_len, head_off, c_stride_b, c_stride_s, BLOCK_SIZE, TILE_N, True,
                                  False)[:, None] + lines[None, :]
        prefetch_l2(k_cache_ptr + kv_off, ok[:, None])
        prefetch_l2(v_cache_ptr + kv_off, ok[:, None])


# num_seqs and bt_stride (the block table's width) vary step to step: one compile, not one per value class
@lazy_jit(do_not_specialize=["num_seqs", "bt_stride"])
def _paged_attention_kernel(
        out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
        seg_out_ptr, seg_max_ptr, seg_sum_ptr, k_scale_ptr, v_scale_ptr,
        qk_scale, num_seqs, num_q_heads,
        q_stride_t, q_stride_h, o_stride_t, o_stride_h, c_stride_b, c_stride_s, c_stride_h, bt_stride,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, TILE_N: tl.constexpr,
        NUM_SEGMENTS: tl.constexpr, MIN_SEGMENT_TILES: tl.constexpr, DOT_PRECISION: tl.constexpr,
        UPCAST_DOT: tl.constexpr, UNMASKED_PREFIX: tl.constexpr, MODE: tl.constexpr, KV_FP8: tl.constexpr,
        FMA_SOFTMAX: tl.constexpr, K_ROW_MAJOR: tl.constexpr, EARLY_V: tl.constexpr, DOT_ACC: tl.constexpr,
        HOIST_TABLE: tl.constexpr, PREFETCH_TABLE: tl.constexpr, REVERSE_TILES: tl.constexpr, PDL: tl.constexpr,
        PREFETCH_KV: tl.constexpr, KV_LINES: tl.constexpr):
    q_tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    segment = tl.program_id(2)
    # Up to pdl_wait, only what no kernel of this forward pass writes: the batch's layout, the block table and
    # (PREFETCH_KV) keys and values of earlier steps. Every program waits, even one with nothing to do: the
    # next kernel's wait for ours must mean the kernel before ours is done too.
    if MODE == 1:   # MODE_DECODE, grid (num_seqs, ...): a program per sequence, one-token queries only
        seq = q_tile
        q_start = tl.load(query_start_loc_ptr + seq)
        q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
        local_tile = 0
        idle = q_len != 1
    else:
        seq = tl.maximum(_find_sequence(query_start_loc_ptr, q_tile, num_seqs, BLOCK_Q), 0)
        q_start = tl.load(query_start_loc_ptr + seq)
        q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
        local_tile = q_tile - (q_start // BLOCK_Q + seq)
        idle = (local_tile < 0) | (local_tile * BLOCK_Q >= q_len)
        if MODE == 2:   # MODE_PREFILL: the decode launch serves one-token queries
            idle = idle | (q_len == 1)
        if REVERSE_TILES:
            # a sequence's last tiles (the longest causal spans) start first, so the grid's last wave is short tiles
            local_tile = tl.cdiv(q_len, BLOCK_Q) - 1 - local_tile
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len

    # rows of the tile: BLOCK_Q tokens x GROUP heads (token-major), padded to BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_idx = local_tile * BLOCK_Q + offs_m // GROUP
    head = kv_head * GROUP + offs_m % GROUP
    row_ok = (offs_m // GROUP < BLOCK_Q) & (q_idx < q_len)
    token = (q_start + q_idx).to(tl.int64)
    q_pos = context_len + q_idx  # absolute position of each row's query

    # keys this tile can see end at the causal frontier of its last query
    kv_end = tl.minimum(seq_len, context_len + (local_tile + 1) * BLOCK_Q)
    num_tiles = tl.cdiv(kv_end, TILE_N)
    if NUM_SEGMENTS > 1:
        seg_tiles = tl.maximum(tl.cdiv(num_tiles, NUM_SEGMENTS), MIN_SEGMENT_TILES)
        tile_lo = segment * seg_tiles
        tile_hi = tl.minimum(tile_lo + seg_tiles, num_tiles)
    else:
        tile_lo = 0
        tile_hi = num_tiles
    table = block_tables_ptr + seq.to(tl.int64) * bt_stride
    head_off = kv_head.to(tl.int64) * c_stride_h
    if PREFETCH_KV > 0:
        _prefetch_kv_l2(k_cache_ptr, v_cache_ptr, table, head_off, tile_lo, tl.where(idle, tile_lo, tile_hi),
                        context_len, c_stride_b, c_stride_s, BLOCK_SIZE, TILE_N, PREFETCH_KV, KV_LINES)
    pdl_wait(PDL)
    if idle:
        return
    q = tl.load(q_ptr + token[:, None] * q_stride_t + head[:, None] * q_stride_h + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)

    if KV_FP8:
        qk_scale = qk_scale * tl.load(k_scale_ptr)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if UNMASKED_PREFIX:
        # tiles wholly at or before the first row's query need no masks (every key is written and visible)
        num_full = (context_len + local_tile * BLOCK_Q + 1) // TILE_N
        acc, m_i, l_i = _attend_tiles(acc, m_i, l_i, q, q_pos, k_cache_ptr, v_cache_ptr, table, head_off, seq_len,
                                      tile_lo, tl.minimum(tile_hi, num_full), qk_scale, c_stride_b, c_stride_s,
                                      HEAD_DIM, BLOCK_SIZE, TILE_N, False, DOT_PRECISION, UPCAST_DOT, KV_FP8,
                                      FMA_SOFTMAX, K_ROW_MAJOR, EARLY_V, DOT_ACC, HOIST_TABLE, PREFETCH_TABLE)
        acc, m_i, l_i = _attend_tiles(acc, m_i, l_i, q, q_pos, k_cache_ptr, v_cache_ptr, table, head_off, seq_len,
                                      tl.maximum(tile_lo, num_full), tile_hi, qk_scale, c_stride_b, c_stride_s,
                                      HEAD_DIM, BLOCK_SIZE, TILE_N, True, DOT_PRECISION, UPCAST_DOT, KV_FP8,
                                      FMA_SOFTMAX, K_ROW_MAJOR, EARLY_V, DOT_ACC, HOIST_TABLE, PREFETCH_TABLE)
    else:
        acc, m_i, l_i = _attend_tiles(acc, m_i, l_i, q, q_pos, k_cache_ptr, v_cache_ptr, table, head_off, seq_len,
                                      tile_lo, tile_hi, qk_scale, c_stride_b, c_stride_s,
                                      HEAD_DIM, BLOCK_SIZE, TILE_N, True, DOT_PRECISION, UPCAST_DOT, KV_FP8,
                                      FMA_SOFTMAX, K_ROW_MAJOR, EARLY_V, DOT_ACC, HOIST_TABLE, PREFETCH_TABLE)

    if KV_FP8:
        acc = acc * tl.load(v_scale_ptr)
    if NUM_SEGMENTS == 1:
        o = acc / l_i[:, None]
        tl.store(out_ptr + token[:, None] * o_stride_t + head[:, None] * o_stride_h + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        idx = (token * num_q_heads + head) * NUM_SEGMENTS + segment
        tl.store(seg_max_ptr + idx, m_i, mask=row_ok)
        tl.store(seg_sum_ptr + idx, l_i, mask=row_ok)
        if tile_hi > tile_lo:   # empty segments leave their partial output unwritten (max -inf)
            tl.store(seg_out_ptr + idx[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=row_ok[:, None])


@lazy_jit
def _reduce_segments_kernel(out_ptr, seg_out_ptr, seg_max_ptr, seg_sum_ptr, num_q_heads, o_stride_t, o_stride_h,
                            HEAD_DIM: tl.constexpr, NUM_SEGMENTS: tl.constexpr, PDL: tl.constexpr):
    """Grid (T, Hq): combine the segments' partial outputs (empty segments have max -inf)."""
    pdl_wait(PDL)
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    segs = tl.arange(0, NUM_SEGMENTS)
    offs_d = tl.arange(0, HEAD_DIM)
    base = (t * num_q_heads + h) * NUM_SEGMENTS
    m = tl.load(seg_max_ptr + base + segs)
    l = tl.load(seg_sum_ptr + base + segs)
    m_max = tl.max(m, axis=0)
    scale = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))
    o = tl.load(seg_out_ptr + (base + segs)[:, None] * HEAD_DIM + offs_d[None, :],
                mask=(m > float("-inf"))[:, None], other=0.0)
    o = tl.sum(o * scale[:, None], axis=0) / tl.sum(l * scale, axis=0)
    tl.store(out_ptr + t * o_stride_t + h * o_stride_h + offs_d, o.to(out_ptr.dtype.element_ty))


MAX_SEGMENTS = 16   # split-KV: most segments a decode's context is cut into (8 or 4: slower, H100 RESULTS.md)
# Warps of a split decode's programs (few programs, each an SM to itself; unsplit decodes keep 4). H100, FP8 single
# request (RESULTS.md): 8 instead of 4, 3.490 -> 3.479 ms a step (two runs each), 16 sequences 4.120 -> 4.099.
SPLIT_DECODE_WARPS = 8


def _config(max_query_len, group, head_dim, num_seqs, num_kv_heads, device, kv_fp8=False):
    """(BLOCK_M, TILE_N, num_warps, num_stages, num_segments) for a batch; python ints only."""
    rows = max_query_len * group
    min_m = next_pow2(group)
    if rows <= 16:
        block_m, tile_n, warps, stages = max(16, min_m), 64 if head_dim <= 128 else 32, 4, 3
    elif rows <= 256:
        block_m, tile_n, warps, stages = max(64, min_m), 64, 4, 3
    elif head_dim <= 128:
        # 64 tokens x 4 heads a tile on 8 warps (bench/prefill_attention.py, H100, with PREFILL_VARIANT's loop:
        # 4 x 4096 355 -> 417 TFLOP/s, 16 x 1024 254 -> 290, 2 x 8192 386 -> 446, against 128 rows on 4 warps)
        block_m, tile_n, warps, stages = max(256, min_m), 64, 8, 3
    else:
        block_m, tile_n, warps, stages = max(128, min_m), 32, 4, 3
    segments = 1
    if max_query_len == 1:
        programs = num_seqs * num_kv_heads
        sms = num_sms(device)
        if programs < 2 * sms:   # too few programs to keep the SMs' loads in flight: split the context
            segments = min(MAX_SEGMENTS, next_pow2(-(-2 * sms // programs)))
            if rows <= 16:
                warps = SPLIT_DECODE_WARPS
        if kv_fp8 and head_dim <= 128:
            # An FP8 tile is half the bytes: twice the keys per tile, and a deeper pipeline where the split
            # leaves few tiles per program (bench/fp8_attention.py, H100: 256 x 640 195 -> 151 us, 1 x 4k
            # 14.5 -> 13.2 us; converting e4m3 to bf16 directly was slower than through fp32).
            tile_n, stages = 128, 4 if segments > 1 else 3
    return block_m, tile_n, warps, stages, segments


def launch_configs(group, head_dim, num_kv_heads, max_num_seqs, max_query_len, device, kv_fp8=False):
    """Every config _config can pick for batches up to these sizes, each with the smallest batch that gets
    it: {config: (max_query_len, num_seqs)}. Start-up compiles each (no compile after ready)."""
    found = {}
    for n in range(1, max_num_seqs + 1):    # decodes: the split-KV segment count follows the batch size
        found.setdefault(_config(1, group, head_dim, n, num_kv_heads, device, kv_fp8), (1, n))
    for q in range(2, max_query_len + 1):   # prefill chunks: the tile band follows the longest query
        found.setdefault(_config(q, group, head_dim, 1, num_kv_heads, device, kv_fp8), (q, 1))
    return found


# Decode tiles: KV tiles a program asks L2 for before its PDL wait (positions before the step's new tokens, which
# no kernel of the step writes), while the kernel before (q/k norm, rotary, cache write) runs. 0: off. H100,
# single-request FP8 decode (RESULTS.md): p50 3.742 ms with the early release alone, 3.729 with 1 tile, 3.736 with 2.
PREFETCH_KV_TILES = 1


# The tile-loop variants (see the module's docstring), each a constexpr of the kernel, by keyword of
# paged_attention_triton. A call that leaves one None gets PREFILL_VARIANT's value on prefill-sized tiles
# (BLOCK_M >= 64) and False on decode tiles, whose code is then today's; True or False forces it on any tiles.
VARIANT_KNOBS = ("fma_softmax", "k_row_major", "dot_acc", "early_v", "hoist_table", "prefetch_table", "reverse_tiles")
# The H100 sweep's winner (bench/prefill_attention.py, RESULTS.md): the FlashAttention-2 loop (FMA softmax, K in
# the cache's order, P @ V accumulating in the dot); the other knobs did not pay at the chosen tiles.
PREFILL_VARIANT = {**dict.fromkeys(VARIANT_KNOBS, False), "fma_softmax": True, "k_row_major": True, "dot_acc": True}


def paged_attention_triton(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, max_query_len=None, *,
                           split_decodes=False, k_scale=None, v_scale=None, num_segments=None, block_m=None,
                           tile_n=None, num_warps=None, num_stages=None, fma_softmax=None, k_row_major=None,
                           dot_acc=None, early_v=None, hoist_table=None, prefetch_table=None, reverse_tiles=None):
    """split_decodes: two launches (see the module's docstring); max_query_len is then only an upper bound,
    which sizes the prefill launch's tiles. The keyword-only knobs override the heuristics (tests force
    paths with them; bench sweeps them); the variant knobs (VARIANT_KNOBS) reach both launches."""
    num_tokens, num_q_heads, head_dim = q.shape
    _, _, num_kv_heads, _ = k_cache.shape
    num_seqs = seq_lens.shape[0]
    group = num_q_heads // num_kv_heads
    out = torch.empty_like(q)
    if num_tokens == 0 or num_seqs == 0:
        return out
    if head_dim < 16 or head_dim & (head_dim - 1):   # the kernel tiles the head dim whole
        return paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, k_scale,
                                   v_scale)
    if q.stride(-1) != 1:
        q = q.contiguous()
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1, "k/v caches must share a layout"
    assert block_tables.stride(-1) == 1 and seq_lens.is_contiguous() and query_start_loc.is_contiguous()
    if max_query_len is None:   # no host sync: a guess that only steers the tile shapes
        max_query_len = 1 if num_tokens == num_seqs else num_tokens
    args = (out, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, k_scale, v_scale)
    fp8 = is_fp8(k_cache)
    knobs = (block_m, tile_n, num_warps, num_stages, num_segments)
    variant = dict(fma_softmax=fma_softmax, k_row_major=k_row_major, dot_acc=dot_acc, early_v=early_v,
                   hoist_table=hoist_table, prefetch_table=prefetch_table, reverse_tiles=reverse_tiles)
    if not split_decodes:
        _launch(*args, MODE_ALL, _config(max_query_len, group, head_dim, num_seqs, num_kv_heads, q.device, fp8), knobs,
                variant)
        return out
    # The decode launch runs unsplit: the decode count is unknown at capture (a one-launch mixed batch is
    # unsplit too), and with many decodes, where graphs pay off, _config would not split either.
    decode = _config(1, group, head_dim, num_seqs, num_kv_heads, q.device, fp8)[:4] + (1,)
    _launch(*args, MODE_DECODE, decode, knobs[:4] + (None,), variant)
    _launch(*args, MODE_PREFILL, _config(max(2, max_query_len), group, head_dim, num_seqs, num_kv_heads, q.device, fp8),
            knobs, variant)
    return out


def _fp8_mode(k_cache) -> int:
    """KV_FP8: 0 no FP8 cache; FP8_VIA_FP32: e4m3 -> fp32 -> q's dtype (the interpreter's only way);
    FP8_DIRECT: e4m3 -> q's dtype in one conversion."""
    if not is_fp8(k_cache):
        return 0
    return FP8_DIRECT if FP8_CONVERT_DIRECT and not interpreted() else FP8_VIA_FP32


def _variant_constexprs(variant, block_m):
    """The kernel's variant constexprs (FMA_SOFTMAX=..., ...) for a launch of block_m-row tiles: the knobs a
    call set, PREFILL_VARIANT's for the others on prefill-sized tiles, off on decode tiles."""
    forced = {name: on for name, on in (variant or {}).items() if on is not None}
    assert set(forced) <= set(VARIANT_KNOBS), set(forced) - set(VARIANT_KNOBS)
    defaults = PREFILL_VARIANT if block_m >= 64 else {}
    return {name.upper(): bool(forced.get(name, defaults.get(name, False))) for name in VARIANT_KNOBS}


def _launch(out, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, k_scale, v_scale, mode, config,
            knobs, variant=None):
    num_tokens, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = seq_lens.shape[0]
    group = num_q_heads // num_kv_heads
    bm, tn, warps, stages, segs = (knob or c for knob, c in zip(knobs, config))
    assert bm >= group and bm >= 16 and tn >= 16 and segs & (segs - 1) == 0
    assert mode == MODE_ALL or segs == 1, "split-KV partials are indexed by token over the whole batch"
    block_q = bm // group
    grid = (num_seqs if mode == MODE_DECODE else num_tokens // block_q + num_seqs, num_kv_heads, segs)
    fp8 = is_fp8(k_cache)
    if segs > 1:
        seg_out = torch.empty(num_tokens, num_q_heads, segs, head_dim, dtype=torch.float32, device=q.device)
        seg_max = torch.empty(num_tokens, num_q_heads, segs, dtype=torch.float32, device=q.device)
        seg_sum = torch.empty_like(seg_max)
    else:
        seg_out = seg_max = seg_sum = out   # unused
    launch = pdl(q.device, feeds_gemm=segs == 1)
    _paged_attention_kernel[grid](
        out, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, seg_out, seg_max, seg_sum,
        k_scale if fp8 else out, v_scale if fp8 else out,   # unused unless fp8
        float(scale) * 1.4426950408889634, num_seqs, num_q_heads,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_M=bm, BLOCK_Q=block_q, TILE_N=tn,
        NUM_SEGMENTS=segs, MIN_SEGMENT_TILES=max(1, 64 // tn),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else None,   # fp32: no silent tf32
        # Triton's interpreter multiplies bf16 operands' storage bits in tl.dot: run those dots in fp32 there
        UPCAST_DOT=q.dtype == torch.bfloat16 and interpreted(),
        # the unmasked first loop pays off for prefill tiles (H100: 301 -> 358 TFLOP/s at 4k); decode tiles keep
        # one masked loop, which streamed K/V at 2.88 TB/s where the two-loop form gave 2.42 (batch 64, 4k)
        UNMASKED_PREFIX=bm >= 64, MODE=mode, KV_FP8=_fp8_mode(k_cache), **_variant_constexprs(variant, bm),
        **_prefetch_kv(launch, bm, head_dim * k_cache.element_size()), num_warps=warps, num_stages=stages, **launch)
    if segs > 1:
        _reduce_segments_kernel[(num_tokens, num_q_heads)](
            out, seg_out, seg_max, seg_sum, num_q_heads, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, NUM_SEGMENTS=segs, num_warps=4, **pdl(q.device, feeds_gemm=True))


def _prefetch_kv(launch: dict, block_m: int, row_bytes: int) -> dict:
    """PREFETCH_KV (tiles) and KV_LINES (128-byte lines a head's row) of a launch: on decode tiles of a PDL
    launch, whose kernel before releases it early (kernels.pdl.RELEASE_BEFORE_ATTENTION), for rows of a
    power-of-two count of whole lines; else off."""
    lines = row_bytes // 128
    on = (launch["PDL"] and block_m < 64 and PREFETCH_KV_TILES and pdl_module.RELEASE_BEFORE_ATTENTION
          and row_bytes % 128 == 0 and lines & (lines - 1) == 0)
    return dict(PREFETCH_KV=PREFETCH_KV_TILES if on else 0, KV_LINES=lines if on else 1)


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, max_query_len=None,
                    split_decodes=False, k_scale=None, v_scale=None):
    """k_scale, v_scale: fp32 tensors of one element, needed with FP8 caches only."""
    if use_triton(q):
        return paged_attention_triton(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                                      max_query_len, split_decodes=split_decodes, k_scale=k_scale, v_scale=v_scale)
    return paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, k_scale, v_scale)
