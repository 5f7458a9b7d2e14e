"""SamplingParams: a request's sampling options with vLLM's names, from JSON (values may be strings)."""
import json
from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_k: int = 0                 # 0 or -1: off
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    detokenize: bool = True            # False: token ids only (benchmarks with random ids)
    include_stop_str_in_output: bool = False
    use_beam_search: bool = False
    best_of: int | None = None
    length_penalty: float = 1.0
    early_stopping: bool = False
    priority: int = 0

    # Options vLLM has that we do not implement yet: accepted only at their no-op value.
    UNSUPPORTED = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0,
                   "logprobs": None, "prompt_logprobs": None}

    @property
    def beam_width(self) -> int:
        return max(self.n, self.best_of or 0) if self.use_beam_search else 1

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def from_dict(cls, d: dict) -> "SamplingParams":
        """Unknown keys are ignored (requests carry other parameters beside these)."""
        kwargs = {}
        for key, value in d.items():
            if value is None:
                continue
            if key in cls.UNSUPPORTED:
                if _number(key, value) != cls.UNSUPPORTED[key]:
                    raise ValueError(f"'{key}' is not supported yet")
                continue
            conv = _CONVERTERS.get(key)
            if conv is not None:
                kwargs[key] = conv(key, value)
        params = cls(**kwargs)
        params.validate()
        return params

    def validate(self):
        def check(ok, name, what):
            if not ok:
                raise ValueError(f"'{name}' {what}, got {getattr(self, name)!r}")
        check(1 <= self.n <= 64, "n", "must be in [1, 64]")
        if self.use_beam_search:
            check(self.best_of is None or self.best_of >= self.n, "best_of", "must be >= n (the beam width)")
            check(not self.stop, "stop", "is not supported with use_beam_search")
            check(self.min_tokens == 0, "min_tokens", "is not supported with use_beam_search")
        else:
            check(self.best_of in (None, self.n), "best_of", "other than n needs use_beam_search")
        check(self.temperature >= 0, "temperature", "must be >= 0")
        check(self.top_k >= -1, "top_k", "must be -1, 0 (off) or a positive integer")
        check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        check(0 <= self.min_p <= 1, "min_p", "must be in [0, 1]")
        check(self.max_tokens >= 1, "max_tokens", "must be >= 1")
        check(0 <= self.min_tokens <= self.max_tokens, "min_tokens", "must be in [0, max_tokens]")
        check(all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings")


def _number(key, value, typ=float):
    if isinstance(value, bool):
        raise ValueError(f"'{key}' must be a number, got {value!r}")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"'{key}' must be a number, got {value!r}") from None
    if typ is int:
        if x != int(x):
            raise ValueError(f"'{key}' must be an integer, got {value!r}")
        return int(x)
    return x


def _int(key, value):
    return _number(key, value, int)


def _bool(key, value):
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"'{key}' must be true or false, got {value!r}")


def _str_list(key, value):
    if isinstance(value, str) and value.startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ValueError(f"'{key}' must be a string or a list of strings, got {value!r}")
    return values


def _int_list(key, value):
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"'{key}' must be a list of integers, got {value!r}") from None
    if not isinstance(value, list):
        value = [value]
    return [_int(key, v) for v in value]


_CONVERTERS = {
    "n": _int, "temperature": _number, "top_k": _int, "top_p": _number, "min_p": _number, "seed": _int,
    "max_tokens": _int, "min_tokens": _int, "stop": _str_list, "stop_token_ids": _int_list,
    "ignore_eos": _bool, "skip_special_tokens": _bool, "detokenize": _bool, "include_stop_str_in_output": _bool,
    "use_beam_search": _bool, "best_of": _int, "length_penalty": _number, "early_stopping": _bool,
    "priority": _int,
}
