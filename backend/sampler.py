"""Sampler: logits -> next token ids (greedy, temperature, top-k, top-p, min-p, per-request seeds).

Penalties, logit_bias, allowed_token_ids and bad_words (backend/logits_processors.py) change the
rows that ask for them first, then stop ids are masked before min_tokens.

One batched pass: greedy rows take the argmax; random rows are filtered (top-k, top-p, min-p
only when some row asks for them, so no full-vocabulary sort otherwise) and drawn as
argmax(probs / Exp(1) noise), which needs no torch.multinomial renormalisation or host sync.
Rows with a seed draw their noise from their own generator, so their draws do not depend on
what else is in the batch.
"""
from dataclasses import dataclass, field

import torch

import kernels
from backend import logprobs
from backend.logits_processors import apply_logits_processors
from backend.logprobs import TokenLogprobs, unpack
from backend.sequence import Sequence
from backend.transfer import to_device


@dataclass
class SamplingBatch:
    """What a step draws, decided by the engine core before the forward pass."""
    seqs: list[Sequence] = field(default_factory=list)       # one token each
    rows: list[int] = field(default_factory=list)            # its row of the step's logits (n samples share one)
    masked_ids: list[set[int]] = field(default_factory=list)  # ids it may not draw yet
    beam_seqs: list[Sequence] = field(default_factory=list)  # beams: full log-probs instead of a token
    beam_rows: list[int] = field(default_factory=list)

    def add(self, seq: Sequence, row: int, masked_ids: set[int]):
        self.seqs.append(seq)
        self.rows.append(row)
        self.masked_ids.append(masked_ids)


class StepResult:
    """A step's sampled tokens, on the device; copied to the host without blocking, so the next
    step can launch first (async scheduling) and read them from here in the meantime."""

    def __init__(self, seqs: list[Sequence], token_ids: torch.Tensor, beam_seqs=(), beam_logprobs=None,
                 logprob_rows: list[int] = (), packed_logprobs: torch.Tensor | None = None, top_k: int = 0):
        """logprob_rows: indices into seqs of the requests that asked for log-probs; packed_logprobs:
        their logprobs.compute() rows (top_k entries each)."""
        self.seqs = seqs
        self.token_ids = token_ids              # [len(seqs)] int64, on the device
        self.beam_seqs = list(beam_seqs)
        self.beam_logprobs = beam_logprobs      # [len(beam_seqs), vocab] fp32, or None
        self._row_of: dict[int, int] | None = None
        self.step = None    # (tokens, attention, timing) of the step that made it (EngineCore)
        self.prompt_logprobs: dict = {}   # {seq: [(position, TokenLogprobs)]} of prompts that asked (runner)
        cuda = token_ids.is_cuda
        self._host = torch.empty(len(seqs), dtype=torch.long, pin_memory=cuda)
        self._host.copy_(token_ids, non_blocking=cuda)
        self.logprob_rows, self._top_k = list(logprob_rows), top_k
        self._host_logprobs = None
        if packed_logprobs is not None:
            self._host_logprobs = torch.empty(packed_logprobs.shape, dtype=torch.float32, pin_memory=cuda)
            self._host_logprobs.copy_(packed_logprobs, non_blocking=cuda)
        self._event = None
        if cuda:
            self._event = torch.cuda.Event()
            self._event.record()

    def row_of(self, seq: Sequence) -> int | None:
        if self._row_of is None:
            self._row_of = {id(s): i for i, s in enumerate(self.seqs)}
        return self._row_of.get(id(seq))

    def host_token_ids(self) -> list[int]:
        """Waits for the copy (only for this step's GPU work, not for later launches)."""
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()

    def host_logprobs(self, token_ids: list[int]) -> list[TokenLogprobs | None]:
        """Per sequence (aligned with seqs): its sampled token's log-probs, or None if not asked.
        Call after host_token_ids() (the copy is then complete)."""
        entries: list[TokenLogprobs | None] = [None] * len(self.seqs)
        if self._host_logprobs is not None:
            for i, row in zip(self.logprob_rows, self._host_logprobs.tolist()):
                entries[i] = unpack(row, token_ids[i], self._top_k, self.seqs[i].params.logprobs or 0)
        return entries


# A few rows over a long vocabulary (decode) take the pieced Triton argmax (kernels.argmax): torch reduces a row in
# one thread block, one SM for the whole row (H100, V = 128,256: 36 us a step); the kernel's two launches took the
# single-request FP8 step 3.476 -> 3.455 ms against torch ops over 128 pieces (4 launches).
ARGMAX_TRITON_MAX_ROWS = 32


def first_argmax(x: torch.Tensor) -> torch.Tensor:
    """x [S, V] -> each row's argmax, the first index of its maximum (NaN counting as the maximum), as
    torch.argmax."""
    if x.shape[0] <= ARGMAX_TRITON_MAX_ROWS:
        return kernels.first_argmax(x)   # the Triton kernel where kernels run, torch.argmax elsewhere
    return x.argmax(dim=-1)


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0):
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)   # requests without a seed

    def sample_step(self, logits: torch.Tensor, batch: SamplingBatch) -> StepResult:
        """logits: one row per sampling sequence of the step (SchedulerOutput.sampling_seqs), in the
        model's dtype. Only a step that reads their values pays for an fp32 copy: a step of greedy rows
        alone (min_tokens masks aside) takes the argmax in bf16, which picks the same token as in fp32
        (bf16 -> fp32 is exact and both return the first maximum). Decided on the host: no sync."""
        if batch.beam_seqs or any(s.params.needs_fp32_logits for s in batch.seqs):
            logits = logits.float()
        beam_logprobs = None
        if batch.beam_seqs:
            beam_logprobs = torch.log_softmax(logits[batch.beam_rows], dim=-1)
        rows = batch.rows
        # Raw rows of the requests that asked for log-probs, copied before sampling masks logits in place.
        logprob_rows = [i for i, seq in enumerate(batch.seqs) if seq.params.wants_logprob]
        raw = logits[to_device([rows[i] for i in logprob_rows], logits.device)] if logprob_rows else None
        # Each non-beam logits row has at least one drawer, in order: one each and no beams is the identity.
        if len(rows) != logits.shape[0] or batch.beam_seqs:
            logits = logits[to_device(rows, logits.device)]
        tokens = self.sample(logits, batch.seqs, batch.masked_ids) if rows else logits.new_empty(0, dtype=torch.long)
        packed, top_k = None, 0
        if logprob_rows:
            top_k = max(batch.seqs[i].params.logprobs or 0 for i in logprob_rows)
            packed = logprobs.compute(raw, tokens[to_device(logprob_rows, tokens.device)], top_k)
        return StepResult(batch.seqs, tokens, batch.beam_seqs, beam_logprobs, logprob_rows, packed, top_k)

    def sample(self, logits: torch.Tensor, seqs: list[Sequence], masked_ids: list[set[int]]) -> torch.Tensor:
        """logits [S, V] fp32 (or the model's dtype if every row is greedy without processors), one row
        per sequence; masked_ids[i] may not be drawn for row i.
        Returns the token ids on logits' device (no host sync)."""
        logits = apply_logits_processors(logits, seqs)   # penalties, bias, ...: only rows that ask
        for i, ids in enumerate(masked_ids):
            if ids:
                logits[i, to_device(list(ids), logits.device)] = float("-inf")
        rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if len(rows) == len(seqs):   # no greedy row: no argmax to overwrite
            return self._sample(logits, seqs)
        tokens = first_argmax(logits)
        if rows:
            on_device = to_device(rows, logits.device)
            tokens[on_device] = self._sample(logits[on_device], [seqs[i] for i in rows])
        return tokens

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        params = [s.params for s in seqs]
        dev = logits.device
        logits = logits / to_device([p.temperature for p in params], dev, torch.float32).unsqueeze(1)
        vocab = logits.shape[1]
        if any(0 < p.top_k < vocab for p in params):
            k = to_device([p.top_k if 0 < p.top_k < vocab else vocab for p in params], dev)
            kth = logits.sort(dim=-1, descending=True).values.gather(1, (k - 1).unsqueeze(1))
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if any(p.top_p < 1.0 for p in params):
            top_p = to_device([p.top_p for p in params], dev, torch.float32).unsqueeze(1)
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            # Drop a token once the mass before it already reaches top_p (the top token always stays).
            drop = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
            probs = probs.scatter(1, order, sorted_probs.masked_fill(drop, 0.0))
        if any(p.min_p > 0 for p in params):
            min_p = to_device([p.min_p for p in params], dev, torch.float32).unsqueeze(1)
            probs = probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for i, seq in enumerate(seqs):
            if seq.generator is not None:
                noise[i].exponential_(generator=seq.generator)
        return first_argmax(probs / noise)
