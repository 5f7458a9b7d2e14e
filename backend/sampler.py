"""Sampler: logits -> next token ids (greedy, temperature, top-k, top-p, min-p, per-request seeds).

One batched pass: greedy rows take the argmax; random rows are filtered (top-k, top-p, min-p
only when some row asks for them, so no full-vocabulary sort otherwise) and drawn as
argmax(probs / Exp(1) noise), which needs no torch.multinomial renormalisation or host sync.
Rows with a seed draw their noise from their own generator, so their draws do not depend on
what else is in the batch.
"""
import torch

from backend.sequence import Sequence


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0):
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)   # requests without a seed

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence], masked_ids: list[set[int]]) -> list[int]:
        return self.sample(logits, seqs, masked_ids).tolist()

    def sample(self, logits: torch.Tensor, seqs: list[Sequence], masked_ids: list[set[int]]) -> torch.Tensor:
        """logits [S, V] fp32, one row per sequence; masked_ids[i] may not be drawn for row i.
        Returns the token ids on logits' device (no host sync)."""
        for i, ids in enumerate(masked_ids):
            if ids:
                logits[i, list(ids)] = float("-inf")
        tokens = logits.argmax(dim=-1)
        rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if rows:
            tokens[rows] = self._sample(logits[rows], [seqs[i] for i in rows])
        return tokens

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        params = [s.params for s in seqs]
        dev = logits.device
        logits = logits / torch.tensor([p.temperature for p in params], device=dev).unsqueeze(1)
        vocab = logits.shape[1]
        if any(0 < p.top_k < vocab for p in params):
            k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=dev)
            kth = logits.sort(dim=-1, descending=True).values.gather(1, (k - 1).unsqueeze(1))
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if any(p.top_p < 1.0 for p in params):
            top_p = torch.tensor([p.top_p for p in params], device=dev).unsqueeze(1)
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            # Drop a token once the mass before it already reaches top_p (the top token always stays).
            drop = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
            probs = probs.scatter(1, order, sorted_probs.masked_fill(drop, 0.0))
        if any(p.min_p > 0 for p in params):
            min_p = torch.tensor([p.min_p for p in params], device=dev).unsqueeze(1)
            probs = probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for i, seq in enumerate(seqs):
            if seq.generator is not None:
                noise[i].exponential_(generator=seq.generator)
        return (probs / noise).argmax(dim=-1)
