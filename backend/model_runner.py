"""ModelRunner: owns the model and the KV pool; turns a scheduled step into tensors, runs it, samples."""
import numpy as np
import torch

from backend import logprobs, parallel
from backend.attention import AttentionMetadata
from backend.config import EngineConfig
from backend.cuda_graph import CUDAGraphs, regions, stage_inputs
from backend.loader import load_model
from backend.sampler import Sampler, SamplingBatch, StepResult
from backend.scheduler import SchedulerOutput
from backend.sequence import Sequence
from backend.transfer import to_device
from kernels.paged_attention import launch_configs


class ModelRunner:
    def __init__(self, config: EngineConfig):
        config.resolve()
        self.config = config
        device, dtype, max_model_len = config.torch_device, config.torch_dtype, config.max_model_len
        self.device, self.dtype, self.max_model_len = device, dtype, max_model_len
        self.kv_dtype = config.kv_cache_torch_dtype      # the model's dtype, or float8_e4m3fn (1 byte an element)
        self.block_size = config.block_size
        self.model = load_model(config)
        self.num_blocks = self._num_kv_blocks()
        if parallel.tp_size() > 1:   # every rank's pool must have the same block ids
            self.num_blocks = parallel.min_across_ranks(self.num_blocks)
        a = self.model.args
        # One tensor for the whole pool: [k|v, layer, block, slot in block, kv head, head dim].
        self.kv_cache = torch.zeros(2, a.num_layers, self.num_blocks, self.block_size, a.num_kv_heads,
                                    a.head_dim, dtype=self.kv_dtype, device=device)
        self.kv_caches = [(self.kv_cache[0, i], self.kv_cache[1, i]) for i in range(a.num_layers)]
        self.sampler = Sampler(device, config.seed)
        self._prompt_logprobs: dict = {}   # of the step under way: {seq: [(position, TokenLogprobs)]}
        self.graphs = None
        if device.type == "cuda":
            self._warmup_kernels()
        if device.type == "cuda" and not config.enforce_eager and parallel.tp_size() == 1:
            max_blocks = -(-max_model_len // self.block_size)
            self.graphs = CUDAGraphs(self.model, self.kv_caches, config.max_num_seqs, config.max_num_batched_tokens,
                                     self.block_size, max_blocks, device)
            self.graphs.capture()   # also compiles the split_decodes attention launches

    @torch.inference_mode()
    def _warmup_kernels(self):
        """Compile now, not while serving, every attention tile config a step can pick (prefill bands;
        decodes with each split-KV segment count): one small batch each. The other kernels have one
        variant per model, which any forward compiles."""
        a, dev, bs = self.model.args, self.device, self.block_size
        max_q = min(self.config.max_num_batched_tokens, self.max_model_len, self.num_blocks * bs)
        configs = launch_configs(a.num_heads // a.num_kv_heads, a.head_dim, a.num_kv_heads, self.config.max_num_seqs,
                                 max_q, dev, kv_fp8=self.kv_dtype == torch.float8_e4m3fn)
        for q_len, num_seqs in configs.values():   # num_seqs sequences of q_len tokens, reading block 0 on
            n = q_len * num_seqs
            i32 = dict(dtype=torch.int32, device=dev)
            meta = AttentionMetadata(  # slots -1: nothing is written to the pool
                slot_mapping=torch.full((n,), -1, dtype=torch.long, device=dev),
                block_tables=torch.arange(-(-q_len // bs), **i32).expand(num_seqs, -1).contiguous(),
                seq_lens=torch.full((num_seqs,), q_len, **i32),
                query_start_loc=torch.arange(0, n + 1, q_len, **i32), max_query_len=q_len)
            positions = torch.arange(n, device=dev) % q_len
            self.model(torch.zeros(n, dtype=torch.long, device=dev), positions, self.kv_caches, meta)
        # The LM head streams its weight at decode sizes (UnquantizedLinear), outside the CUDA graphs: its
        # variants by rows (1, a multiple of 16, any other: Triton's integer specializations).
        hidden = torch.zeros(16, a.hidden_size, dtype=self.model.lm_head.weight.dtype, device=dev)
        for rows in (1, 2, 16):
            if rows <= self.config.max_num_seqs:
                self.model.compute_logits(hidden[:rows])
        torch.cuda.synchronize(dev)

    def kv_block_bytes(self) -> int:
        a = self.model.args
        return 2 * a.num_layers * self.block_size * a.num_kv_heads * a.head_dim * self.kv_dtype.itemsize

    def _num_kv_blocks(self) -> int:
        if self.config.num_gpu_blocks_override:
            return self.config.num_gpu_blocks_override
        if self.device.type == "cpu":
            return max(1, int(self.config.cpu_kvcache_space_gb * 2**30) // self.kv_block_bytes())
        return self._profile_gpu_blocks()

    def _profile_gpu_blocks(self) -> int:
        """Run one forward at max_num_batched_tokens to learn peak activation memory, then give the
        rest of gpu_memory_utilization's share of the card to KV blocks."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        n = min(self.config.max_num_batched_tokens, self.max_model_len)
        a = self.model.args
        blocks = -(-n // self.block_size)
        cache = torch.zeros(2, a.num_layers, blocks, self.block_size, a.num_kv_heads, a.head_dim,
                            dtype=self.kv_dtype, device=self.device)
        meta = AttentionMetadata(
            slot_mapping=torch.arange(n, device=self.device),
            block_tables=torch.arange(blocks, dtype=torch.int32, device=self.device)[None],
            seq_lens=torch.tensor([n], dtype=torch.int32, device=self.device),
            query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=self.device), max_query_len=n)
        with torch.inference_mode():
            hidden = self.model(torch.zeros(n, dtype=torch.long, device=self.device),
                                torch.arange(n, device=self.device),
                                [(cache[0, i], cache[1, i]) for i in range(a.num_layers)], meta)
            self.model.compute_logits(hidden[-min(n, self.config.max_num_seqs):]).float()   # the sampler's copy
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        del cache, hidden
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        in_use_by_others = total - free - torch.cuda.memory_allocated(self.device)
        budget = total * self.config.gpu_memory_utilization - in_use_by_others - peak
        num_blocks = int(budget // self.kv_block_bytes())
        if num_blocks < 1:
            raise ValueError("parameter 'gpu_memory_utilization' leaves no room for the KV cache "
                             f"(model and activations need {peak / 2**30:.1f} GiB)")
        return num_blocks

    def prepare(self, out: SchedulerOutput):
        """An eager step's inputs: the graphs' staging (cuda_graph.stage_inputs) without padding.
        Returns (input_ids, positions, AttentionMetadata, logits_indices, ends) (ends: see stage_inputs)."""
        T, S = out.total_tokens, len(out.seqs)
        (r_ids, r_pos, r_slots, r_rows), (r_lens, r_starts) = regions(T, S)
        tok, seq = np.empty(r_rows.stop, np.int64), np.empty(r_starts.stop, np.int32)
        tables = np.zeros((S, max(len(s.block_table) for s in out.seqs)), np.int32)
        ends, num_sampled, _ = stage_inputs(out.seqs, out.num_new_tokens, self.block_size, T, S, tok, seq, tables)
        dev = self.device

        def tensor(x):
            return torch.from_numpy(np.ascontiguousarray(x)).to(dev)

        meta = AttentionMetadata(slot_mapping=tensor(tok[r_slots]), block_tables=tensor(tables),
                                 seq_lens=tensor(seq[r_lens]), query_start_loc=tensor(seq[r_starts]),
                                 max_query_len=max(out.num_new_tokens))
        return tensor(tok[r_ids]), tensor(tok[r_pos]), meta, tensor(tok[r_rows][:num_sampled]), ends

    def _run_tensor_parallel(self, out, input_ids, positions, meta, logits_indices):
        """Rank 0: send the step to the other ranks, then run it together with them."""
        cpu = lambda t: t.cpu()  # noqa: E731
        payload = dict(input_ids=cpu(input_ids), positions=cpu(positions), slot_mapping=cpu(meta.slot_mapping),
                       block_tables=cpu(meta.block_tables), seq_lens=cpu(meta.seq_lens),
                       query_start_loc=cpu(meta.query_start_loc), max_query_len=meta.max_query_len,
                       logits_indices=cpu(logits_indices), block_copies=out.block_copies)
        parallel.broadcast_step(payload)
        return self.execute_step(dict(payload, block_copies=[]))   # rank 0 has copied its blocks already

    @torch.inference_mode()
    def execute_step(self, p: dict) -> torch.Tensor:
        """Every rank: one forward pass from the broadcast inputs; the logits (all ranks get them)."""
        if self.device.type != "cpu":
            p = {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in p.items()}
        self.copy_blocks(p["block_copies"])
        meta = AttentionMetadata(p["slot_mapping"], p["block_tables"], p["seq_lens"], p["query_start_loc"],
                                 p["max_query_len"])
        hidden = self.model(p["input_ids"], p["positions"], self.kv_caches, meta)
        return self.model.compute_logits(hidden[p["logits_indices"]])

    def _fill_in_flight(self, input_ids: torch.Tensor, seqs: list[Sequence], last_positions, in_flight: StepResult):
        """Async scheduling: the last step's tokens are still on their way to the host; copy them
        into this step's inputs on the GPU. last_positions[i]: where seqs[i]'s last input token
        sits in input_ids (-1: its chunk does not reach its end)."""
        at, rows = [], []
        for seq, i in zip(seqs, last_positions):
            if i >= 0 and seq.num_placeholders:
                row = in_flight.row_of(seq)
                if row is not None:
                    at.append(i)
                    rows.append(row)
        if at and _consecutive(at) and _consecutive(rows):
            # the usual decode step (the same sequences in the same order): one device-to-device copy, not two
            # host-to-device index copies and a gather-scatter
            input_ids[at[0]:at[0] + len(at)].copy_(in_flight.token_ids[rows[0]:rows[0] + len(rows)])
        elif at:
            input_ids[to_device(at, self.device)] = in_flight.token_ids[to_device(rows, self.device)]

    def _run_graph(self, key, out: SchedulerOutput, in_flight: StepResult | None) -> torch.Tensor:
        input_ids, ends, num_sampled = self.graphs.load(key, out.seqs, out.num_new_tokens)
        if in_flight is not None:
            self._fill_in_flight(input_ids, out.seqs, ends, in_flight)
        hidden = self.graphs.replay(key, out.total_tokens, num_sampled)
        if not num_sampled:
            return hidden.new_empty(0, self.model.args.vocab_size, dtype=torch.float32)
        return self.model.compute_logits(hidden)

    def copy_blocks(self, pairs: list[tuple[int, int]]):
        """Copy-on-write: give each writer its private copy of a shared block, in every layer."""
        if pairs:
            src, dst = (to_device(x, self.device) for x in zip(*pairs))
            pool = self.kv_cache.view(torch.uint8) if self.kv_dtype.itemsize == 1 else self.kv_cache  # fp8: as bytes
            pool[:, :, dst] = pool[:, :, src]

    @torch.inference_mode()
    def run(self, out: SchedulerOutput, batch: SamplingBatch, in_flight: StepResult | None = None) -> StepResult:
        """Forward every scheduled token and draw the batch's tokens. `in_flight`: the previous
        step's result while its tokens are not on the host yet (async scheduling)."""
        self._prompt_logprobs = {}
        result = self.sampler.sample_step(self._forward(out, in_flight), batch)
        result.prompt_logprobs = self._prompt_logprobs
        return result

    def _forward(self, out: SchedulerOutput, in_flight: StepResult | None) -> torch.Tensor:
        """Logits [len(out.sampling_seqs()), vocab] in the model's dtype (the sampler upcasts if it must)."""
        self.copy_blocks(out.block_copies)
        wants_prompt_logprobs = any(s.params.prompt_logprobs is not None and s.num_computed_tokens < s.num_prompt_tokens
                                    for s in out.seqs)
        key = self.graphs.select(out.total_tokens, len(out.seqs)) if self.graphs is not None else None
        if key is not None and not wants_prompt_logprobs:   # those need every row's hidden state: eager
            return self._run_graph(key, out, in_flight)
        input_ids, positions, meta, logits_indices, ends = self.prepare(out)
        if parallel.tp_size() > 1:
            return self._run_tensor_parallel(out, input_ids, positions, meta, logits_indices)
        if in_flight is not None:
            self._fill_in_flight(input_ids, out.seqs, ends, in_flight)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
        if wants_prompt_logprobs:
            self._prompt_logprobs = logprobs.prompt_chunk_logprobs(out.seqs, out.num_new_tokens, hidden,
                                                                   self.model.compute_logits)
        if not logits_indices.numel():
            return hidden.new_empty(0, self.model.args.vocab_size, dtype=torch.float32)
        return self.model.compute_logits(hidden[logits_indices])


def _consecutive(indices: list[int]) -> bool:
    """indices are i, i + 1, i + 2, ...: a slice."""
    return indices == list(range(indices[0], indices[0] + len(indices)))
