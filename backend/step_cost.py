"""How long a step takes: measured on the device, and predicted from the step's shape.

The scheduler sizes a step's prompt chunks so that the step fits a latency target
(`target_itl_ms`). It predicts a step's time as

    t = a + b * tokens + c * attention

where `tokens` counts the step's new tokens (the GEMMs over the weights, norms, launches) and
`attention` the (query, key) pairs its attention reads: a decode at context c reads c + 1 keys,
a prompt chunk of n tokens after c cached ones n*c + n(n+1)/2. The coefficients are fitted by
least squares over the latest measured steps (refitted every few steps, kept non-negative), so
the prediction follows what this GPU, this model and the CUDA graphs actually do.
"""
import collections
import time

import numpy as np
import torch

# Feature scales: keep the least-squares system well conditioned (tokens ~1e3, pairs ~1e6).
_TOKENS_UNIT, _PAIRS_UNIT = 1e3, 1e6


def chunk_attention(num_cached: int, n: int) -> int:
    """(query, key) pairs read by n new tokens after num_cached tokens (causal)."""
    return n * num_cached + n * (n + 1) // 2


class StepCostModel:
    WINDOW = 512          # steps kept for the fit: the latest behaviour, not the start-up's
    REFIT_EVERY = 4
    MIN_SAMPLES = 8
    RIDGE = 1e-6

    def __init__(self):
        self.samples: collections.deque = collections.deque(maxlen=self.WINDOW)
        self.coef: np.ndarray | None = None      # seconds for (1, tokens/1e3, pairs/1e6)
        self._since_fit = 0

    @property
    def fitted(self) -> bool:
        return self.coef is not None

    def observe(self, tokens: int, attention: int, seconds: float):
        self.samples.append((1.0, tokens / _TOKENS_UNIT, attention / _PAIRS_UNIT, seconds))
        self._since_fit += 1
        if len(self.samples) >= self.MIN_SAMPLES and (self.coef is None or self._since_fit >= self.REFIT_EVERY):
            self._fit()

    def _fit(self):
        """Least squares with the coefficients held >= 0: a feature whose fitted weight comes out
        negative (too little spread in the window to tell) is dropped and the rest refitted."""
        data = np.array(self.samples)
        x, y = data[:, :3], data[:, 3]
        active = [0, 1, 2]
        coef = np.zeros(3)
        while active:
            xa = x[:, active]
            sol = np.linalg.solve(xa.T @ xa + self.RIDGE * np.eye(len(active)), xa.T @ y)
            if (sol >= 0).all():
                coef[active] = sol
                break
            active = [f for f, c in zip(active, sol) if c >= 0] if (sol >= 0).any() else []
        self.coef, self._since_fit = coef, 0

    def predict(self, tokens: int, attention: int) -> float:
        a, b, c = self.coef
        return a + b * tokens / _TOKENS_UNIT + c * attention / _PAIRS_UNIT

    def max_chunk(self, tokens: int, attention: int, num_cached: int, limit: int, seconds: float) -> int:
        """The most new tokens (<= limit) of one sequence with num_cached tokens in the cache that a
        step already holding (tokens, attention) can take and still be predicted within seconds."""
        def fits(n):
            return self.predict(tokens + n, attention + chunk_attention(num_cached, n)) <= seconds
        if limit <= 0 or not fits(1):
            return 0
        lo, hi = 1, limit          # fits(lo) holds; the cost grows with n
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        return lo


class StepTimer:
    """A step's duration: on a GPU, CUDA events from its first launch to its last (device time,
    read once the step is done, without waiting for later steps); elsewhere the host clock
    around the (synchronous) step. `clock` replaces the host clock (tests simulate time)."""

    def __init__(self, device: torch.device, clock=time.perf_counter):
        self.cuda = device.type == "cuda"
        self.clock = clock

    def start(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return [event, None]
        return [self.clock(), None]

    def stop(self, handle):
        if self.cuda:
            handle[1] = torch.cuda.Event(enable_timing=True)
            handle[1].record()
        else:
            handle[1] = self.clock()
        return handle

    def seconds(self, handle) -> float:
        start, end = handle
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        return end - start
