"""CUDA graphs: the model's forward captured once per padded shape and replayed with static inputs.

A small model's step is bound by launch and Python cost, not the GPU, so every step on one GPU
replays a graph (tensor parallelism and enforce_eager run eagerly):
  * decode graphs, one per batch size (1, 2, 4, 8, 16, 32, 48, ...): one new token per sequence;
  * mixed graphs, one per token bucket T (64 ... max_num_batched_tokens): a step carrying prompt
    chunks (with or without decodes), in T token slots and max_num_seqs sequence slots. Attention
    runs as two launches there (split_decodes): which queries are decodes is unknown at capture.
A step runs on the smallest graph that holds it. Padding tokens have slot -1 (written nowhere) and
belong to no sequence; padding sequences have empty queries and length 0. Attention skips both and
their output rows are ignored. The logits gather and the LM head run outside the graphs.

All graphs share one memory pool (captured largest first) and one set of static inputs, which each
graph reads as [input_ids | positions | slots | logits rows] (int64, T + T + T + S) and [seq_lens |
query_start_loc] (int32, S + S + 1) (see regions), so that one asynchronous copy from pinned staging
fills each.
"""
import numpy as np
import torch

from backend.attention import AttentionMetadata


def decode_batch_sizes(max_bs: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s < max_bs] + list(range(16, max_bs, 16))
    return sorted(set(sizes + [max_bs]))


def mixed_token_buckets(max_tokens: int, smallest: int = 64) -> list[int]:
    """64, 128, 192, then four per octave (256, 320, ..., 512, 640, ..., 1024, 1280, ...) up to max_tokens.
    Below ~256 tokens a small model's matmuls cost the same at any row count (weight reads bound them), so
    padding is nearly free there; above, a step pads by under 25% (about 12% on average), and a budget of
    8192 tokens needs 24 graphs."""
    sizes, t = [], smallest
    while t < max_tokens:
        sizes.append(t)
        t += max(smallest, (1 << (t.bit_length() - 1)) // 4)
    return sizes + [max_tokens]


def regions(T: int, S: int):
    """Where the graph of T tokens and S sequences finds its inputs: slices of the int64 buffer (input_ids,
    positions, slots, logits rows) and of the int32 one (seq_lens, query_start_loc). Each starts 16-byte
    aligned: Triton specializes kernels on pointer alignment, so an unaligned view would compile more."""
    t, s = -(-T // 2) * 2, -(-S // 4) * 4
    int64 = (slice(0, T), slice(t, t + T), slice(2 * t, 2 * t + T), slice(3 * t, 3 * t + S))
    return int64, (slice(0, S), slice(s, s + S + 1))


def stage_inputs(seqs, num_new_tokens, block_size, T, S, tok: np.ndarray, seq: np.ndarray, tables: np.ndarray,
                 rows: list | None = None):
    """Write a step's inputs, padded to T tokens and S sequences, into host arrays laid out as a graph
    reads them (tok int64, seq int32: see regions; tables int32 [>= len(seqs), max blocks]).
    rows: what `tables` holds already, per row (the block-table list written there and its length,
    kept by the caller between steps): a row whose sequence's table did not change is not rewritten.
    Returns (ends, num_sampled, width): where each sequence's last token sits if this step reaches its
    end (else -1), how many logits rows there are, and the widest block table."""
    s = len(seqs)
    (r_ids, r_pos, r_slots, r_rows), (r_lens, r_starts) = regions(T, S)
    ids, pos, slots, rows_out, lens, starts = tok[r_ids], tok[r_pos], tok[r_slots], tok[r_rows], seq[r_lens], seq[r_starts]
    computed = np.fromiter([sq.num_computed_tokens for sq in seqs], np.int64, s)
    total = np.fromiter([sq.num_tokens for sq in seqs], np.int64, s)
    known, width = [], 0
    for i, (sq, n) in enumerate(zip(seqs, num_new_tokens)):
        c = sq.num_computed_tokens
        chunk = sq.token_ids[c:c + n]
        known += chunk
        if len(chunk) < n:     # a token in flight (async scheduling): filled on the GPU before replay
            known += [0] * (n - len(chunk))
        table = sq.block_table
        size = len(table)
        # The list itself is kept (not its id): a freed list's id could come back with other contents.
        if rows is None or rows[i] is None or rows[i][0] is not table or rows[i][1] != size:
            tables[i, :size] = table
            if rows is not None:
                rows[i] = (table, size)
        width = max(width, size)
    new = np.asarray(num_new_tokens, np.int64)
    n = len(known)
    starts[0] = 0
    np.cumsum(new, out=starts[1:s + 1])
    starts[s + 1:] = n
    lens[:s] = computed + new
    lens[s:] = 0
    p = np.arange(n) + np.repeat(computed - starts[:s], new)    # each token's position in its sequence
    owner = np.repeat(np.arange(s), new)
    ids[:n], pos[:n], slots[:n] = known, p, tables[owner, p // block_size] * block_size + p % block_size
    ids[n:], pos[n:], slots[n:] = 0, 0, -1
    reach = computed + new == total
    ends = np.where(reach, starts[1:s + 1] - 1, -1)
    sampled = ends[reach]
    rows_out[:len(sampled)] = sampled
    return ends, len(sampled), width


class CUDAGraphs:
    def __init__(self, model, kv_caches, max_num_seqs: int, max_num_batched_tokens: int, block_size: int,
                 max_blocks_per_seq: int, device):
        self.model, self.kv_caches, self.block_size, self.device = model, kv_caches, block_size, device
        self.max_seqs = max_num_seqs
        self.decode_sizes = decode_batch_sizes(min(max_num_seqs, 512))
        self.token_buckets = mixed_token_buckets(max_num_batched_tokens)
        max_t = max(self.decode_sizes[-1], self.token_buckets[-1])
        i64, i32 = dict(dtype=torch.long, device=device), dict(dtype=torch.int32, device=device)
        self.tok = torch.zeros(regions(max_t, max_num_seqs)[0][-1].stop, **i64)
        self.seq = torch.zeros(regions(max_t, max_num_seqs)[1][-1].stop, **i32)
        self.tables = torch.zeros(max_num_seqs, max_blocks_per_seq, **i32)
        # Pinned host staging, two sets used in turn: a step's non-blocking copies may still be queued
        # behind the previous step's work when the host stages the next one (async scheduling).
        pin = device.type == "cuda"
        self.staging = [tuple(t.cpu().pin_memory() if pin else t.cpu().clone() for t in (self.tok, self.seq, self.tables))
                        for _ in range(2)]
        self.staged_rows = [[None] * max_num_seqs for _ in range(2)]   # per staging set: stage_inputs' rows
        self.turn = 0
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.hidden = None

    def select(self, num_tokens: int, num_seqs: int) -> tuple | None:
        """The graph for a step, as (tokens T, sequences S, split_decodes), or None: run it eagerly."""
        if num_seqs > self.max_seqs or not self.graphs:
            return None
        if num_tokens == num_seqs and num_seqs <= self.decode_sizes[-1]:
            bs = next(s for s in self.decode_sizes if s >= num_seqs)
            return bs, bs, False
        t = next((t for t in self.token_buckets if t >= num_tokens), None)
        return None if t is None else (t, self.max_seqs, True)

    def _inputs(self, key):
        T, S, split = key
        (ids, pos, slots, _), (lens, starts) = regions(T, S)
        meta = AttentionMetadata(self.tok[slots], self.tables[:S], self.seq[lens], self.seq[starts],
                                 max_query_len=T if split else 1, split_decodes=split)
        return self.tok[ids], self.tok[pos], meta

    def keys(self) -> list[tuple]:
        """Every graph, largest first (capture order: the smaller graphs reuse the pool's memory)."""
        keys = [(t, self.max_seqs, True) for t in self.token_buckets] + [(b, b, False) for b in self.decode_sizes]
        return sorted(keys, key=lambda k: -k[0])

    @torch.inference_mode()
    def capture(self):
        keys = self.keys()
        self.hidden = torch.empty(keys[0][0], self.model.args.hidden_size, dtype=self.model.lm_head.weight.dtype,
                                  device=self.device)
        pool = None
        for key in keys:
            input_ids, positions, meta = self._inputs(key)
            meta.slot_mapping.fill_(-1)     # capture runs on padding (every query empty): it writes nowhere
            args = (input_ids, positions, self.kv_caches, meta)
            self.hidden[:key[0]] = self.model(*args)   # warm-up: compiles kernels outside the capture
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool):
                self.hidden[:key[0]] = self.model(*args)
            pool = graph.pool() if pool is None else pool
            self.graphs[key] = graph
        torch.cuda.synchronize(self.device)

    def load(self, key, seqs, num_new_tokens):
        """Stage a step into the static inputs (asynchronous copies). Returns (input_ids, ends, num_sampled):
        the static input_ids (the caller may write tokens only the GPU knows, before replay) and
        stage_inputs' ends and logits row count."""
        T, S, _ = key
        tok, seq, tables = self.staging[self.turn]
        rows = self.staged_rows[self.turn]
        self.turn ^= 1
        ends, num_sampled, width = stage_inputs(seqs, num_new_tokens, self.block_size, T, S, tok.numpy(),
                                                seq.numpy(), tables.numpy(), rows)
        tok_end, seq_end = (r[-1].stop for r in regions(T, S))
        self.tok[:tok_end].copy_(tok[:tok_end], non_blocking=True)
        self.seq[:seq_end].copy_(seq[:seq_end], non_blocking=True)
        self.tables[:len(seqs), :width].copy_(tables[:len(seqs), :width], non_blocking=True)
        return self.tok[:T], ends, num_sampled

    def replay(self, key, num_tokens: int, num_sampled: int) -> torch.Tensor:
        """Run the graph; the hidden states of the rows that draw a token, in step order."""
        self.graphs[key].replay()
        if num_sampled == num_tokens:   # one token per sequence, each drawing: the rows are 0..n-1
            return self.hidden[:num_tokens]
        rows = regions(*key[:2])[0][3]
        return self.hidden[self.tok[rows.start:rows.start + num_sampled]]
