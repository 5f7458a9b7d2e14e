"""Sampler: logits -> next token ids (greedy, temperature, top-k, top-p, min-p, per-request seeds)."""
import torch

from backend.sequence import Sequence


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0):
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)   # requests without a seed

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence], masked_ids: list[set[int]]) -> list[int]:
        """logits [S, V] fp32, one row per sequence; masked_ids[i] may not be drawn for row i."""
        for i, ids in enumerate(masked_ids):
            if ids:
                logits[i, list(ids)] = float("-inf")
        tokens = logits.argmax(dim=-1)
        for i, seq in enumerate(seqs):
            if not seq.params.greedy:
                tokens[i] = self._sample_row(logits[i], seq)
        return tokens.tolist()

    def _sample_row(self, logits: torch.Tensor, seq: Sequence) -> int:
        p = seq.params
        logits = logits / p.temperature
        if p.top_k > 0 and p.top_k < logits.numel():
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # Drop a token once the mass before it already reaches top_p (the top token always stays).
            drop = (sorted_probs.cumsum(-1) - sorted_probs) >= p.top_p
            probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
        if p.min_p > 0.0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        gen = seq.generator if seq.generator is not None else self.generator
        # argmax(p / Exp(1)) is a draw from p, without torch.multinomial's renormalisation or host sync.
        noise = torch.empty_like(probs).exponential_(generator=gen)
        return int((probs / noise).argmax())
