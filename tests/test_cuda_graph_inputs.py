"""CUDA-graph runner logic that needs no GPU: the token buckets, which graph a step picks, and the padded
static inputs a step is staged into (against what ModelRunner.prepare builds for the eager path)."""
import types

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from backend.cuda_graph import CUDAGraphs, decode_batch_sizes, mixed_token_buckets, regions
from backend.model_runner import ModelRunner
from backend.sampling_params import SamplingParams
from backend.scheduler import SchedulerOutput
from backend.sequence import Sequence

BLOCK = 16


def test_token_buckets():
    b = mixed_token_buckets(8192)
    assert b[:4] == [64, 128, 192, 256] and b[-1] == 8192 and len(b) == 24 and b == sorted(set(b))
    assert all(hi / lo <= 1.25 for lo, hi in zip(b[3:], b[4:]))   # above 256: under 25% padding
    assert mixed_token_buckets(2048)[-1] == 2048 and mixed_token_buckets(1000)[-2:] == [896, 1000]
    assert mixed_token_buckets(40) == [40]
    assert decode_batch_sizes(256)[:6] == [1, 2, 4, 8, 16, 32] and decode_batch_sizes(256)[-1] == 256


def graphs(max_num_seqs=8, max_tokens=300, max_blocks=16):
    g = CUDAGraphs(None, None, max_num_seqs, max_tokens, BLOCK, max_blocks, torch.device("cpu"))
    g.graphs = dict.fromkeys(g.keys())   # as if captured
    return g


def test_select():
    g = graphs()
    assert g.select(3, 3) == (4, 4, False)          # decodes: the decode graph of the next batch size
    assert g.select(8, 8) == (8, 8, False)
    assert g.select(10, 3) == (64, 8, True)         # prompt chunks: the next token bucket, every seq slot
    assert g.select(65, 8) == (128, 8, True)
    assert g.select(300, 1) == (300, 8, True)
    assert g.select(301, 1) is None and g.select(9, 9) is None   # too many tokens or sequences: eager
    g.graphs = {}
    assert g.select(3, 3) is None


def seq(prompt_len, computed, output=0, placeholders=0, first_block=0):
    s = Sequence("r", list(range(100, 100 + prompt_len + output)), prompt_len, SamplingParams(max_tokens=4))
    s.num_placeholders, s.num_computed_tokens = placeholders, computed
    s.block_table = list(range(first_block + 37, first_block + 37 - (-s.num_tokens // BLOCK)))[::-1]  # scattered
    return s


def mixed_step():
    seqs = [seq(20, 20, output=1),                       # a decode
            seq(50, 16, first_block=10),                 # a prompt chunk that does not reach the end
            seq(5, 5, output=0, placeholders=1, first_block=20),  # a decode whose token is in flight
            seq(40, 33, first_block=30),                 # a prompt's last chunk, with context
            seq(17, 16, first_block=40),                 # a one-token final chunk
            seq(31, 32, output=2, first_block=50)]       # a decode at a block boundary
    nums = [1, 20, 1, 7, 1, 1]
    return SchedulerOutput(seqs=seqs, num_new_tokens=nums)


def reference_inputs(out, bs):
    """A step's inputs recomputed token by token from their definitions."""
    ids, positions, slots, lens, starts, rows = [], [], [], [], [0], []
    for seq, n in zip(out.seqs, out.num_new_tokens):
        c = seq.num_computed_tokens
        known = seq.token_ids[c:c + n]
        ids += known + [0] * (n - len(known))    # a token in flight is filled on the device
        positions += range(c, c + n)
        slots += [seq.block_table[p // bs] * bs + p % bs for p in range(c, c + n)]
        lens.append(c + n)
        starts.append(starts[-1] + n)
        if c + n == seq.num_tokens:
            rows.append(starts[-1] - 1)
    width = max(len(x.block_table) for x in out.seqs)
    tables = [x.block_table + [0] * (width - len(x.block_table)) for x in out.seqs]
    return types.SimpleNamespace(ids=ids, positions=positions, slots=slots, lens=lens, starts=starts, rows=rows,
                                 tables=tables)


def test_prepare_equals_the_reference():
    out = mixed_step()
    ids, positions, meta, logits_indices, ends = ModelRunner.prepare(
        types.SimpleNamespace(block_size=BLOCK, device=torch.device("cpu")), out)
    ref = reference_inputs(out, BLOCK)
    assert (ids.tolist(), positions.tolist(), meta.slot_mapping.tolist()) == (ref.ids, ref.positions, ref.slots)
    assert (meta.seq_lens.tolist(), meta.query_start_loc.tolist()) == (ref.lens, ref.starts)
    assert meta.block_tables.tolist() == ref.tables and logits_indices.tolist() == ref.rows
    assert (ids.dtype, positions.dtype, meta.slot_mapping.dtype, logits_indices.dtype) == (torch.long,) * 4
    assert (meta.seq_lens.dtype, meta.query_start_loc.dtype, meta.block_tables.dtype) == (torch.int32,) * 3
    assert list(ends) == [0, -1, 21, 28, 29, 30] and meta.max_query_len == 20


@pytest.mark.parametrize("key", [(64, 8, True), (31, 6, False)])
def test_staged_inputs_equal_the_reference_with_padding(key):
    out = mixed_step()
    T, S, _ = key
    g = graphs()
    g.load(key, out.seqs, out.num_new_tokens)   # the other staging set: a stale step first
    input_ids, ends, num_sampled = g.load(key, out.seqs, out.num_new_tokens)
    ref = reference_inputs(out, BLOCK)
    ids, positions = torch.tensor(ref.ids), torch.tensor(ref.positions)
    meta = types.SimpleNamespace(slot_mapping=torch.tensor(ref.slots), seq_lens=torch.tensor(ref.lens),
                                 query_start_loc=torch.tensor(ref.starts), block_tables=torch.tensor(ref.tables))
    logits_indices = torch.tensor(ref.rows)
    n, s = out.total_tokens, len(out.seqs)
    (r_ids, r_pos, r_slots, r_rows), (r_lens, r_starts) = regions(T, S)
    assert all(r.start % 2 == 0 for r in (r_ids, r_pos, r_slots, r_rows)) and r_starts.start % 4 == 0  # 16 bytes
    ids_, pos_, slots_, rows_ = (g.tok[r] for r in (r_ids, r_pos, r_slots, r_rows))
    lens_, starts_ = g.seq[r_lens], g.seq[r_starts]
    assert torch.equal(input_ids, ids_)
    assert ids_[:n].tolist() == ids.tolist() and not ids_[n:].any()
    assert pos_[:n].tolist() == positions.tolist() and not pos_[n:].any()
    assert slots_[:n].tolist() == meta.slot_mapping.tolist() and (slots_[n:] == -1).all()
    assert lens_[:s].tolist() == meta.seq_lens.tolist() and not lens_[s:].any()
    assert starts_[:s + 1].tolist() == meta.query_start_loc.tolist() and (starts_[s + 1:] == n).all()
    width = meta.block_tables.shape[1]
    for i, x in enumerate(out.seqs):
        assert g.tables[i, :len(x.block_table)].tolist() == x.block_table
    assert num_sampled == len(logits_indices) and rows_[:num_sampled].tolist() == logits_indices.tolist()
    assert list(ends) == [0, -1, 21, 28, 29, 30] and width == max(len(x.block_table) for x in out.seqs)


def test_decode_step_reads_rows_in_order():
    seqs = [seq(9, 9, output=1, first_block=i * 3) for i in range(5)]
    g = graphs()
    key = g.select(5, 5)
    _, ends, num_sampled = g.load(key, seqs, [1] * 5)
    assert key == (8, 8, False) and num_sampled == 5 and list(ends) == [0, 1, 2, 3, 4]
    (_, _, r_slots, _), (r_lens, r_starts) = regions(8, 8)
    assert g.seq[r_starts].tolist() == [0, 1, 2, 3, 4, 5, 5, 5, 5] and g.seq[r_lens].tolist() == [10] * 5 + [0] * 3
    assert np.array_equal(g.tok[r_slots].numpy(), [s.block_table[0] * BLOCK + 9 for s in seqs] + [-1] * 3)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["decode", "grow", "copy_on_write", "swap", "replace", "shuffle"]),
                          st.integers(0, 5)), min_size=1, max_size=30))
def test_reused_table_rows_follow_every_change(changes):
    """load() rewrites only the block-table rows whose list changed since that staging set last held
    them; over any run of changes, every staged step equals the reference recomputed from scratch."""
    seqs = [seq(9 + 7 * i, 9 + 7 * i, output=1, first_block=20 * i) for i in range(6)]
    spare = [seq(9 + 7 * i, 9 + 7 * i, output=1, first_block=200 + 20 * i) for i in range(6)]
    g = graphs(max_num_seqs=8, max_blocks=32)
    for kind, i in changes:
        target = seqs[i]
        if kind == "grow":            # a new block at the end (the list grows in place)
            target.block_table.append(300 + len(target.block_table))
        elif kind == "copy_on_write":   # a block replaced: BlockManager builds a new list
            target.block_table = target.block_table[:-1] + [400 + i]
        elif kind == "swap":          # another sequence, same table length, takes the row
            seqs[i], spare[i] = spare[i], seqs[i]
        elif kind == "replace":       # same list object length, fresh list of other blocks (preempted, readmitted)
            target.block_table = [500 + b for b in range(len(target.block_table))]
        elif kind == "shuffle":
            seqs = seqs[i:] + seqs[:i]
        for s in seqs:   # keep each a valid decode: its last position inside its table
            s.num_computed_tokens = min(s.num_computed_tokens, len(s.block_table) * BLOCK - 1)
            s.token_ids = s.token_ids[:s.num_computed_tokens + 1]
        key = g.select(len(seqs), len(seqs))
        g.load(key, seqs, [1] * len(seqs))
        out = SchedulerOutput(seqs=list(seqs), num_new_tokens=[1] * len(seqs))
        ref = reference_inputs(out, BLOCK)
        (_, _, r_slots, _), _ = regions(*key[:2])
        assert g.tok[r_slots][:len(seqs)].tolist() == ref.slots
        for row, s in enumerate(seqs):
            assert g.tables[row, :len(s.block_table)].tolist() == s.block_table
