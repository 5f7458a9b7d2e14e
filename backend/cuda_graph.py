"""CUDA graphs for decode steps: one graph per padded batch size, replayed with static inputs.

A decode step is one new token per sequence, so its shapes depend only on the batch size:
capture the model's forward for sizes 1, 2, 4, 8, 16, 32, ... up to max_num_seqs (largest first,
sharing one memory pool), then run a batch of n sequences on the graph of the next size up.
Padding rows write nowhere (slot -1) and read one token of whatever block their stale table row
names; their outputs are ignored.
"""
import numpy as np
import torch

from backend.attention import AttentionMetadata


def graph_batch_sizes(max_bs: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s < max_bs] + list(range(16, max_bs, 16))
    return sorted(set(sizes + [max_bs]))


class DecodeGraphs:
    def __init__(self, model, kv_caches, max_bs: int, max_blocks_per_seq: int, device):
        self.model, self.kv_caches, self.device = model, kv_caches, device
        self.sizes = graph_batch_sizes(max_bs)
        self.max_bs = max_bs
        i64, i32 = dict(dtype=torch.long, device=device), dict(dtype=torch.int32, device=device)
        self.input_ids = torch.zeros(max_bs, **i64)
        self.positions = torch.zeros(max_bs, **i64)
        self.slot_mapping = torch.full((max_bs,), -1, **i64)
        self.seq_lens = torch.ones(max_bs, **i32)
        self.block_tables = torch.zeros(max_bs, max_blocks_per_seq, **i32)
        self.query_start_loc = torch.arange(max_bs + 1, **i32)
        self.hidden = torch.empty(max_bs, model.args.hidden_size, dtype=model.lm_head.weight.dtype, device=device)
        # Host staging (pinned) so that the per-step copies are asynchronous.
        self.host_tokens = torch.zeros(3, max_bs, dtype=torch.long).pin_memory()
        self.host_lens = torch.ones(max_bs, dtype=torch.int32).pin_memory()
        self.host_tables = torch.zeros(max_bs, max_blocks_per_seq, dtype=torch.int32).pin_memory()
        self.host_tables_np = self.host_tables.numpy()
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(self.slot_mapping[:bs], self.block_tables[:bs], self.seq_lens[:bs],
                                 self.query_start_loc[:bs + 1], max_query_len=1)

    @torch.inference_mode()
    def capture(self):
        pool = None
        for bs in reversed(self.sizes):
            args = (self.input_ids[:bs], self.positions[:bs], self.kv_caches, self._meta(bs))
            self.hidden[:bs] = self.model(*args)   # warm-up: compiles kernels outside the capture
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool):
                self.hidden[:bs] = self.model(*args)
            pool = graph.pool() if pool is None else pool
            self.graphs[bs] = graph
        torch.cuda.synchronize(self.device)

    def can_run(self, num_seqs: int) -> bool:
        return num_seqs <= self.max_bs and bool(self.graphs)

    def run(self, input_ids: list[int], positions: list[int], slots: list[int], seq_lens: list[int],
            block_tables: list[list[int]], fill_input_ids=None) -> torch.Tensor:
        """fill_input_ids(static input_ids): writes tokens that only the GPU knows yet (async scheduling)."""
        n = len(input_ids)
        bs = next(s for s in self.sizes if s >= n)
        host = self.host_tokens
        host[0, :n] = torch.tensor(input_ids)
        host[1, :n] = torch.tensor(positions)
        host[2, :n] = torch.tensor(slots)
        host[0, n:bs] = 0
        host[1, n:bs] = 0
        host[2, n:bs] = -1
        self.host_lens[:n] = torch.tensor(seq_lens, dtype=torch.int32)
        self.host_lens[n:bs] = 1
        width = max(map(len, block_tables))
        tables = self.host_tables_np
        for i, table in enumerate(block_tables):
            tables[i, :len(table)] = table
        self.input_ids[:bs].copy_(host[0, :bs], non_blocking=True)
        self.positions[:bs].copy_(host[1, :bs], non_blocking=True)
        self.slot_mapping[:bs].copy_(host[2, :bs], non_blocking=True)
        self.seq_lens[:bs].copy_(self.host_lens[:bs], non_blocking=True)
        self.block_tables[:n, :width].copy_(self.host_tables[:n, :width], non_blocking=True)
        if fill_input_ids is not None:
            fill_input_ids(self.input_ids)
        self.graphs[bs].replay()
        return self.hidden[:n]
