"""The unified paged-attention kernel (and its split-KV path) against the torch reference.

On CPU these run under the Triton interpreter on small shapes; on CUDA the same cases run compiled,
plus realistic shapes (Llama-3-8B heads, batches up to 256, contexts up to 8k).
"""
import importlib
import random

import pytest
import torch

import kernels
from kernels.paged_attention import VARIANT_KNOBS, paged_attention_triton

from tests.kernels.kernel_testing import DEVICE, ON_GPU, assert_close, make_paged_batch, ref_attention


def run_kernel(b, max_query_len="auto", **overrides):
    if max_query_len == "auto":
        max_query_len = max(int(n) for n in (b["query_start_loc"][1:] - b["query_start_loc"][:-1]).tolist())
    if overrides:
        return paged_attention_triton(b["q"], b["k_cache"], b["v_cache"], b["block_tables"], b["seq_lens"],
                                      b["query_start_loc"], b["scale"], max_query_len, **overrides)
    return kernels.paged_attention(b["q"], b["k_cache"], b["v_cache"], b["block_tables"], b["seq_lens"],
                                   b["query_start_loc"], b["scale"], max_query_len)


DECODE_LENS = [1, 15, 16, 17, 33, 70]          # 1, around one block, not multiples of the block size
# (seq_len, q_len): decode of a 1-token sequence, whole prompts, chunks with cached context, decodes,
# and a sequence with no new tokens this step
MIXED = [(1, 1), (17, 17), (40, 7), (33, 1), (64, 64), (20, 0), (50, 1), (5, 3)]


@pytest.mark.parametrize("group", [1, 4, 5])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("segments", [1, 4])
def test_decode(group, block_size, segments):
    b = make_paged_batch(DECODE_LENS, [1] * len(DECODE_LENS), 2, group, 32, block_size, torch.bfloat16)
    assert_close(run_kernel(b, num_segments=segments), ref_attention(b))


@pytest.mark.parametrize("group", [1, 4, 5])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("path", ["auto", "split", "small_tiles"])
def test_mixed_prefill_and_decode(group, block_size, path):
    seq_lens, q_lens = zip(*MIXED)
    b = make_paged_batch(list(seq_lens), list(q_lens), 2, group, 32, block_size, torch.bfloat16, seed=group)
    kw = {"split": dict(num_segments=4), "small_tiles": dict(block_m=16, tile_n=16)}.get(path, {})
    assert_close(run_kernel(b, **kw), ref_attention(b))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [16, 64])
def test_dtypes_and_head_dims(dtype, head_dim):
    seq_lens, q_lens = zip(*MIXED[:5])
    b = make_paged_batch(list(seq_lens), list(q_lens), 1, 4, head_dim, 16, dtype, seed=head_dim)
    assert_close(run_kernel(b), ref_attention(b))


def test_auto_split_decode_through_dispatch():
    """A decode batch small enough that the heuristics pick the split path, via the public function."""
    b = make_paged_batch([3, 47, 90], [1, 1, 1], 1, 4, 32, 16, torch.bfloat16)
    from kernels.paged_attention import _config
    assert _config(1, 4, 32, 3, 1, DEVICE)[-1] > 1
    assert_close(run_kernel(b), ref_attention(b))


@pytest.mark.parametrize("max_query_len", [None, 64])
def test_max_query_len_given_or_not(max_query_len):
    """None makes the wrapper guess tile shapes without a host sync; the result must not depend on it."""
    seq_lens, q_lens = zip(*MIXED)
    b = make_paged_batch(list(seq_lens), list(q_lens), 2, 4, 32, 16, torch.float16)
    assert_close(run_kernel(b, max_query_len=max_query_len), ref_attention(b))


@pytest.mark.parametrize("group", [1, 4, 5])
@pytest.mark.parametrize("block_size", [16, 32])
def test_split_decodes_on_a_padded_graph_batch(group, block_size):
    """The two-launch mode on a batch laid out as a mixed CUDA graph sees it: decodes, prompt chunks (one
    of a single token, with context), then padding sequences with empty queries (seq_len 0, table rows
    pointing past the pool) and NaN padding tokens that belong to no sequence; max_query_len is the
    token bucket. The real rows equal the reference; no NaN leaks in from the padding."""
    real = [(1, 1), (40, 7), (33, 1), (64, 64), (50, 1), (41, 1), (5, 3), (90, 1)]
    seq_lens, q_lens = zip(*(real + [(0, 0)] * 5))
    b = make_paged_batch(list(seq_lens), list(q_lens), 2, group, 32, block_size, torch.bfloat16, seed=group)
    n = b["q"].shape[0]
    bucket = n + 27
    b["q"] = torch.cat([b["q"], torch.full((bucket - n, *b["q"].shape[1:]), float("nan"), dtype=b["q"].dtype,
                                           device=b["q"].device)])
    out = paged_attention_triton(b["q"], b["k_cache"], b["v_cache"], b["block_tables"], b["seq_lens"],
                                 b["query_start_loc"], b["scale"], bucket, split_decodes=True)
    ref = ref_attention(b)[:n]
    assert_close(out[:n], ref)
    # each launch alone writes exactly its own queries' rows (the others exit at once)
    from kernels.paged_attention import MODE_DECODE, MODE_PREFILL, _config, _launch
    starts = b["query_start_loc"].tolist()
    one = torch.zeros(bucket, dtype=torch.bool)
    for s, q_len in enumerate(q_lens):
        one[starts[s]] = q_len == 1
    for mode, mine in ((MODE_DECODE, one), (MODE_PREFILL, ~one)):
        part = torch.full_like(b["q"], float("nan"))
        config = _config(1 if mode == MODE_DECODE else bucket, group, 32, len(q_lens), 2, DEVICE)[:4] + (1,)
        _launch(part, b["q"], b["k_cache"], b["v_cache"], b["block_tables"], b["seq_lens"], b["query_start_loc"],
                b["scale"], None, None, mode, config, (None,) * 5)
        mine = mine[:n].to(part.device)
        assert_close(part[:n][mine], ref[mine])
        assert torch.isnan(part[:n][~mine]).all() and torch.isnan(part[n:]).all()


def test_split_decodes_through_dispatch():
    """The flag reaches the kernel through the public function (and the reference ignores it)."""
    b = make_paged_batch([40, 3, 17], [7, 1, 17], 1, 4, 32, 16, torch.float32)
    args = (b["q"], b["k_cache"], b["v_cache"], b["block_tables"], b["seq_lens"], b["query_start_loc"], b["scale"])
    assert_close(kernels.paged_attention(*args, 64, split_decodes=True), ref_attention(b))


@pytest.mark.parametrize("kv_fp8", [False, True])
def test_launch_configs_cover_every_pick(kv_fp8):
    from kernels.paged_attention import _config, launch_configs
    found = launch_configs(4, 128, 8, 256, 8192, DEVICE, kv_fp8)
    picks = {_config(q, 4, 128, n, 8, DEVICE, kv_fp8) for q in (1, 2, 3, 4, 5, 64, 65, 1000, 8192)
             for n in (1, 7, 256)}
    assert picks <= set(found) and len(found) == len(set(found))
    for config, (q, n) in found.items():
        assert _config(q, 4, 128, n, 8, DEVICE, kv_fp8) == config
    decode_tiles = {_config(1, 4, 128, n, 8, DEVICE, kv_fp8)[1] for n in (1, 7, 256)}
    assert decode_tiles == ({128} if kv_fp8 else {64})   # an FP8 tile holds twice the keys in the same bytes


def test_uses_the_kernel_in_triton_mode(monkeypatch):
    import sys
    pa = sys.modules["kernels.paged_attention"]   # the package attribute of that name is the function
    called = []
    monkeypatch.setattr(pa, "paged_attention_triton", lambda *a, **k: called.append(1) or pa.paged_attention_ref(*a[:7]))
    b = make_paged_batch([5], [1], 1, 4, 16, 16, torch.float32)
    run_kernel(b)
    assert called


# ---------------- tile-loop variants (paged_attention_triton's variant knobs) ----------------

ALL_VARIANTS = dict.fromkeys(VARIANT_KNOBS, True)
# MIXED plus a chunk with context that spans several query tiles and several unmasked KV tiles
PREFILL_MIX = MIXED + [(150, 70)]
# prefill-sized tiles (two loops, the first unmasked) kept small for the interpreter: 64 rows, 32 keys
PREFILL_TILES = dict(block_m=64, tile_n=32)


def mixed_batch(group, block_size, dtype=torch.bfloat16, seed=0):
    seq_lens, q_lens = zip(*PREFILL_MIX)
    return make_paged_batch(list(seq_lens), list(q_lens), 2, group, 32, block_size, dtype, seed=seed)


@pytest.mark.parametrize("variant", [{name: True} for name in VARIANT_KNOBS] + [ALL_VARIANTS],
                         ids=list(VARIANT_KNOBS) + ["all"])
def test_each_variant_on_prefill_tiles(variant):
    b = mixed_batch(4, 16, seed=1)
    assert_close(run_kernel(b, **PREFILL_TILES, **variant), ref_attention(b))


@pytest.mark.parametrize("block_size", [1, 8, 16, 48, 64])
@pytest.mark.parametrize("variant", [dict(hoist_table=True), dict(prefetch_table=True),
                                     dict(hoist_table=True, prefetch_table=True)], ids=["hoist", "prefetch", "both"])
def test_table_variants_over_block_sizes(variant, block_size):
    """The table reads follow the block size against TILE_N (32): a gather per row (1: more blocks than the
    hoist takes), one read per block (8, 16), a block larger than the tile but not a multiple of it (48: a tile
    may straddle two blocks) and one tile per part of a block (64)."""
    b = mixed_batch(4, block_size, seed=block_size)
    assert_close(run_kernel(b, **PREFILL_TILES, **variant), ref_attention(b))


@pytest.mark.parametrize("group", [1, 5])
@pytest.mark.parametrize("path", ["prefill_tiles", "decode_tiles", "split", "split_decodes"])
def test_all_variants_on_every_path(group, path):
    """All variants at once, forced onto every path: both loops, the single masked loop of decode tiles,
    split-KV (segments where a row sees no key, so its max stays -inf there) and the two-launch mode.
    Group 5 leaves padding rows in each tile."""
    b = mixed_batch(group, 16, seed=group)
    kw = {"prefill_tiles": PREFILL_TILES, "decode_tiles": dict(block_m=16, tile_n=16),
          "split": dict(PREFILL_TILES, num_segments=4), "split_decodes": dict(split_decodes=True)}[path]
    assert_close(run_kernel(b, **kw, **ALL_VARIANTS), ref_attention(b))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_all_variants_other_dtypes(dtype):
    b = mixed_batch(4, 16, dtype, seed=7)
    assert_close(run_kernel(b, **PREFILL_TILES, **ALL_VARIANTS), ref_attention(b))


@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("variant", [dict(fma_softmax=True, k_row_major=True), ALL_VARIANTS], ids=["fma_k_rows", "all"])
def test_variants_fp8_cache(variant, block_size):
    from tests.kernels.test_fp8_kv_cache import ref_fp8, run_fp8, scaled_randn_batch
    seq_lens, q_lens = zip(*PREFILL_MIX)
    b = scaled_randn_batch(list(seq_lens), list(q_lens), 2, 4, 32, block_size, torch.bfloat16, seed=block_size)
    ref = ref_fp8(b)
    assert_close(run_fp8(b, 70, **PREFILL_TILES, **variant), ref)
    assert ref.float().abs().max() > 0.5


def test_variant_defaults(monkeypatch):
    """Left None, a knob takes PREFILL_VARIANT's value on prefill-sized tiles only; decode tiles stay as they
    were unless forced."""
    import sys
    pa = sys.modules["kernels.paged_attention"]
    assert pa._variant_constexprs(None, 128) == {name.upper(): on for name, on in pa.PREFILL_VARIANT.items()}
    assert not any(pa._variant_constexprs({}, 16).values())
    monkeypatch.setitem(pa.PREFILL_VARIANT, "fma_softmax", True)
    assert pa._variant_constexprs(dict(fma_softmax=None), 64)["FMA_SOFTMAX"]
    assert not pa._variant_constexprs(dict(fma_softmax=None), 32)["FMA_SOFTMAX"]
    assert not pa._variant_constexprs(dict(fma_softmax=False), 128)["FMA_SOFTMAX"]
    assert pa._variant_constexprs(dict(dot_acc=True), 16)["DOT_ACC"]
    with pytest.raises(AssertionError):
        pa._variant_constexprs(dict(no_such_knob=True), 128)


# ---------------- realistic shapes, CUDA only ----------------

def _rand_lens(n, lo, hi, seed):
    r = random.Random(seed)
    return [r.randint(lo, hi) for _ in range(n)]


GPU_DECODE = [(1, [8192]), (1, [1]), (8, _rand_lens(8, 1, 8192, 1)), (64, _rand_lens(64, 1, 4096, 2)),
              (256, _rand_lens(256, 1, 2048, 3))]


@pytest.mark.skipif(not ON_GPU, reason="realistic shapes need CUDA (the small cases above run everywhere)")
@pytest.mark.parametrize("batch,lens", GPU_DECODE, ids=[f"bs{b}" for b, _ in GPU_DECODE])
@pytest.mark.parametrize("segments", [None, 1, 16])
def test_gpu_decode_llama3_8b(batch, lens, segments):
    b = make_paged_batch(lens, [1] * batch, 8, 4, 128, 16, torch.bfloat16, seed=batch)
    assert_close(run_kernel(b, num_segments=segments) if segments else run_kernel(b), ref_attention(b))


@pytest.mark.skipif(not ON_GPU, reason="realistic shapes need CUDA")
@pytest.mark.parametrize("num_kv_heads,group,head_dim,block_size", [(8, 4, 128, 16), (8, 5, 64, 32), (2, 7, 128, 32)])
def test_gpu_mixed_batch(num_kv_heads, group, head_dim, block_size):
    # two prompt chunks with long cached context, a whole prompt, and 40 decodes up to 8k
    decodes = _rand_lens(40, 1, 8192, 4)
    seq_lens = [4096, 8192, 1000] + decodes
    q_lens = [512, 300, 1000] + [1] * len(decodes)
    b = make_paged_batch(seq_lens, q_lens, num_kv_heads, group, head_dim, block_size, torch.bfloat16)
    assert_close(run_kernel(b), ref_attention(b))
    assert_close(run_kernel(b, num_segments=8), ref_attention(b))


@pytest.mark.skipif(not ON_GPU, reason="realistic shapes need CUDA")
@pytest.mark.parametrize("n", [1024, 4096])
def test_gpu_prefill(n):
    b = make_paged_batch([n, n // 2], [n, n // 2], 8, 4, 128, 16, torch.bfloat16)
    assert_close(run_kernel(b), ref_attention(b))


@pytest.mark.skipif(not ON_GPU, reason="realistic shapes need CUDA")
@pytest.mark.parametrize("variant", [dict(fma_softmax=True, k_row_major=True, dot_acc=True), ALL_VARIANTS],
                         ids=["fa2", "all"])
@pytest.mark.parametrize("tiles", [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)], ids=str)
def test_gpu_prefill_variants(variant, tiles):
    """The variants compiled at bench/prefill_attention.py's tile shapes: whole prompts, a chunk with cached
    context and decodes, Llama-3-8B heads, block 16."""
    block_m, tile_n, warps, stages = tiles
    b = make_paged_batch([2048, 1000, 3000] + _rand_lens(8, 1, 4096, 5), [2048, 1000, 700] + [1] * 8, 8, 4, 128, 16,
                         torch.bfloat16)
    assert_close(run_kernel(b, block_m=block_m, tile_n=tile_n, num_warps=warps, num_stages=stages, **variant),
                 ref_attention(b))


@pytest.mark.skipif(not ON_GPU, reason="needs > 4 GiB of cache on CUDA")
def test_gpu_cache_offsets_past_int32():
    """A pool whose element offsets pass 2**31: blocks near its end must be addressed with int64."""
    block_size, seq_lens = 16, [100, 37]
    num_blocks = (2 ** 31) // (block_size * 8 * 128) + 64
    b = make_paged_batch(seq_lens, [1, 37], 8, 4, 128, block_size, torch.bfloat16, min_num_blocks=num_blocks)
    table = b["block_tables"]
    new_id = num_blocks - 1
    for s, n in enumerate(seq_lens):   # move every block of both sequences to the end of the pool
        for j in range(-(-n // block_size)):
            old = int(table[s, j])
            for key in ("k_cache", "v_cache"):
                b[key][new_id] = b[key][old]
                b[key][old] = float("nan")
            table[s, j] = new_id
            new_id -= 1
    assert_close(run_kernel(b), ref_attention(b))
    assert_close(run_kernel(b, num_segments=4), ref_attention(b))


@pytest.mark.skipif(not ON_GPU, reason="the reads before the PDL wait run on a GPU with PDL (Hopper)")
@pytest.mark.parametrize("split_decodes", [False, True])
def test_reads_before_the_wait_change_no_bits(monkeypatch, split_decodes):
    """Keys and values of earlier steps (0 to 2 tiles) asked of L2 before the wait, on decodes split in
    segments or not and a mixed batch in two launches: every output bit as without them."""
    attention_module = importlib.import_module("kernels.paged_attention")   # the package's name is the function
    outs = {}
    decodes = make_paged_batch(DECODE_LENS, [1] * len(DECODE_LENS), 2, 4, 128, 16, torch.bfloat16, seed=5)
    mixed = make_paged_batch(*zip(*MIXED), 2, 4, 128, 16, torch.bfloat16, seed=6)
    for tiles in (0, 1, 2):
        monkeypatch.setattr(attention_module, "PREFETCH_KV_TILES", tiles)
        for name, b in (("decodes", decodes), ("mixed", mixed)):
            for segments in ((1, 4) if name == "decodes" and not split_decodes else (None,)):
                assert attention_module._prefetch_kv({"PDL": True}, 16, 256)["PREFETCH_KV"] == tiles
                outs[tiles, name, segments] = paged_attention_triton(
                    b["q"], b["k_cache"], b["v_cache"], b["block_tables"], b["seq_lens"], b["query_start_loc"],
                    b["scale"], 64 if name == "mixed" else 1, split_decodes=split_decodes, num_segments=segments)
    for (tiles, name, segments), out in outs.items():
        assert torch.equal(out, outs[0, name, segments]), (tiles, name, segments)


def test_kv_prefetch_only_on_decode_tiles_of_whole_lines(monkeypatch):
    """PREFETCH_KV_TILES reaches the kernel on PDL launches of decode-sized tiles whose head rows are a
    power-of-two count of 128-byte lines, with the prologue releasing attention early; else 0."""
    attention_module = importlib.import_module("kernels.paged_attention")
    on = {"PDL": 2}
    assert attention_module._prefetch_kv(on, 16, 256) == {"PREFETCH_KV": attention_module.PREFETCH_KV_TILES,
                                                          "KV_LINES": 2}
    assert attention_module._prefetch_kv(on, 16, 128)["KV_LINES"] == 1   # e4m3, head_dim 128
    for launch, block_m, row_bytes in ((on, 64, 256), ({"PDL": False}, 16, 256), (on, 16, 64), (on, 16, 384)):
        assert attention_module._prefetch_kv(launch, block_m, row_bytes)["PREFETCH_KV"] == 0
    monkeypatch.setattr(importlib.import_module("kernels.pdl"), "RELEASE_BEFORE_ATTENTION", None)
    assert attention_module._prefetch_kv(on, 16, 256)["PREFETCH_KV"] == 0


def test_split_decodes_take_more_warps(monkeypatch):
    """Decodes that split the context (few programs, an SM each) run SPLIT_DECODE_WARPS warps; unsplit decodes and
    prefill tiles keep theirs."""
    import sys
    pa = sys.modules["kernels.paged_attention"]
    cases = [(1, 1), (1, 256), (64, 1), (1000, 1)]   # (query length, sequences): split decode, unsplit, prefill
    before = [pa._config(q, 4, 128, n, 8, DEVICE) for q, n in cases]
    assert before[0][-1] > 1 and before[0][2] == pa.SPLIT_DECODE_WARPS and before[1][-1] == 1
    monkeypatch.setattr(pa, "SPLIT_DECODE_WARPS", 2)
    after = [pa._config(q, 4, 128, n, 8, DEVICE) for q, n in cases]
    assert after[0][2] == 2 and after[0][:2] + after[0][3:] == before[0][:2] + before[0][3:]
    assert after[1:] == before[1:]
