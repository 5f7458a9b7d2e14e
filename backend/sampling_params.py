"""SamplingParams: a request's sampling options with vLLM's names, from JSON (values may be strings).

Numbers are parsed exactly: an integer field keeps a JSON integer as it is (seeds above 2**53
stay distinct), takes "12", "1e3" or 12.0 only when the value is exactly integral, and never goes
through a float; float fields take finite numbers only. Every bad value raises ValueError whose
message names the field ('key'), so the glue can answer INVALID_ARG / HTTP 400.
"""
import json
import math
import re
import reprlib
from dataclasses import dataclass, field
from functools import cached_property
from decimal import Decimal, InvalidOperation

# Below this temperature sampling is greedy (vLLM's _SAMPLING_EPS): dividing logits by a tinier
# temperature overflows to inf and the softmax turns into NaNs.
SAMPLING_EPS = 1e-5
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1
MAX_N = 64                      # most samples (or beams) per request
# Stop strings are searched in every new piece of text of the request, so their number and
# length bound its per-token cost: 64 strings of 256 characters cost ~20 us per token (measured
# with str.find, the engine's search); 100,000 strings cost ~14 ms per token and slowed others 9x.
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 256        # checked per generated token (and masked before min_tokens)
MAX_LOGPROBS = 20               # vLLM's default max_logprobs: the top-k gather is sized by the largest asked
MAX_NUMBER_CHARS = 64           # a number sent as text; longer is refused before any parsing
# Logits processors (backend/logits_processors.py) build index tensors from these every step of the
# request, and bad words are matched on the host against the output's tail per token: 1024 ids or
# biases and 128 words (vLLM's own per-request cap for bad words) keep that a few microseconds
# per token and a few kilobytes copied to the device, while a million entries would stall every step.
MAX_LOGIT_BIAS = 1024
MAX_ALLOWED_TOKEN_IDS = 1024
MAX_BAD_WORDS = 128
MAX_BAD_WORD_CHARS = 256
MAX_PENALTY = 2.0               # presence_penalty and frequency_penalty are in [-2, 2] (vLLM, OpenAI)
MAX_LOGIT_BIAS_VALUE = 100.0    # each bias in [-100, 100] (OpenAI's range)
# repetition_penalty divides or multiplies fp32 logits: outside float32's normal range it would
# turn them into inf, 0 or NaN.
FLOAT32_TINY, FLOAT32_MAX = 1.1754943508222875e-38, 3.4028234663852886e+38
UNTIL_MAX_MODEL_LEN = INT64_MAX  # max_tokens: null (vLLM: generate until max_model_len)

_NUMBER_TEXT = re.compile(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*")
_INTEGER_TEXT = re.compile(r"\s*[+-]?\d+\s*")


# What each RequestOutput of a request holds (vLLM's RequestOutputKind). Set by the caller, not
# by the request: the serving layer streams deltas, and non-streaming requests need only the end.
CUMULATIVE = "cumulative"   # everything so far in every output (the default)
DELTA = "delta"             # only what is new since the previous output: O(new tokens) per step
FINAL_ONLY = "final_only"   # one output, at the end, with everything


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
    presence_penalty: float = 0.0      # over the output so far: logits -= presence_penalty * (count > 0)
    frequency_penalty: float = 0.0     # over the output so far: logits -= frequency_penalty * count
    repetition_penalty: float = 1.0    # over prompt + output: logits > 0 divided by it, others multiplied
    logit_bias: dict[int, float] = field(default_factory=dict)   # token id -> added to its logit
    allowed_token_ids: list[int] | None = None   # only these may be drawn
    bad_words: list[str] = field(default_factory=list)
    truncate_prompt_tokens: int | None = None    # keep only the prompt's last k tokens
    add_special_tokens: bool = True    # the tokenizer's own (BOS...) around the prompt; false for prompts
                                       # rendered by a chat template, which writes them itself (vLLM's chat API)
    spaces_between_special_tokens: bool = True   # with skip_special_tokens false: " ".join around them
    logprobs: int | None = None        # the sampled token's log-prob plus this many most likely ones
    prompt_logprobs: int | None = None  # each prompt token's log-prob (given the tokens before it) + top ones
    # Not request fields. bad_words as token-id sequences (vLLM's _bad_words_token_ids), set by the
    # engine at admission with the model's tokenizer (backend.engine.tokenize_bad_words);
    # cumulative_logprob, set by the front when a caller wants it without logprobs; output_kind
    # (CUMULATIVE, DELTA or FINAL_ONLY), set by the caller.
    bad_words_token_ids: list[list[int]] = field(default_factory=list)
    cumulative_logprob: bool = False
    output_kind: str = CUMULATIVE

    @property
    def beam_width(self) -> int:
        return max(self.n, self.best_of or 0) if self.use_beam_search else 1

    @property
    def wants_logprob(self) -> bool:
        """The sampled token's log-prob is computed for this request (logprobs or its running sum)."""
        return self.logprobs is not None or self.cumulative_logprob

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    @cached_property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @cached_property
    def needs_output_history(self) -> bool:
        """Its logits depend on the tokens generated so far (penalties, bad words): the host must
        know every one of them when it samples, so the engine steps synchronously while it runs."""
        return self.has_penalties or bool(self.bad_words or self.bad_words_token_ids)

    @cached_property
    def processes_logits(self) -> bool:
        """Any of the logits processors applies (backend/logits_processors.py)."""
        return self.needs_output_history or bool(self.logit_bias) or self.allowed_token_ids is not None

    @cached_property
    def needs_fp32_logits(self) -> bool:
        """Its token is more than the argmax of the raw logits (sampling, log-probs, processors, beams).
        Cached: the params are complete before the engine core reads them."""
        return not self.greedy or self.wants_logprob or self.processes_logits or self.use_beam_search

    @classmethod
    def from_dict(cls, d: dict) -> "SamplingParams":
        """Unknown keys are ignored (requests carry other parameters beside these)."""
        if not isinstance(d, dict):
            raise ValueError(f"sampling parameters must be a JSON object, got {_show(d)}")
        kwargs = {}
        for key, value in d.items():
            if value is None:
                if key == "max_tokens":   # explicitly null: until max_model_len (absent: 16)
                    kwargs[key] = UNTIL_MAX_MODEL_LEN
                continue
            conv = _CONVERTERS.get(key)
            if conv is not None:
                kwargs[key] = conv(key, value)
        if kwargs.get("seed") == -1:   # vLLM's "no seed"
            del kwargs["seed"]
        params = cls(**kwargs)
        params.validate()
        if params.greedy:
            params.temperature = 0.0
        return params

    def validate(self):
        def check(ok, name, what):
            if not ok:
                raise ValueError(f"'{name}' {what}, got {_show(getattr(self, name))}")
        check(1 <= self.n <= MAX_N, "n", f"must be in [1, {MAX_N}]")
        check(self.best_of is None or 1 <= self.best_of <= MAX_N, "best_of", f"must be in [1, {MAX_N}]")
        if self.use_beam_search:
            self._validate_beam_search(check)
        else:
            check(self.best_of in (None, self.n), "best_of", "other than n needs use_beam_search")
        check(self.temperature >= 0, "temperature", "must be >= 0")
        check(-1 <= self.top_k <= INT64_MAX, "top_k", "must be -1, 0 (off) or a positive integer")
        check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        check(0 <= self.min_p <= 1, "min_p", "must be in [0, 1]")
        check(self.seed is None or INT64_MIN <= self.seed <= INT64_MAX, "seed",
              "must be in [-2**63, 2**63) (-1: no seed)")
        check(1 <= self.max_tokens <= INT64_MAX, "max_tokens", "must be >= 1")
        check(0 <= self.min_tokens <= self.max_tokens, "min_tokens", "must be in [0, max_tokens]")
        check(INT64_MIN <= self.priority <= INT64_MAX, "priority", "must fit in 64 bits")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            check(value is None or 0 <= value <= MAX_LOGPROBS, name, f"must be in [0, {MAX_LOGPROBS}] (vLLM's max_logprobs)")
        check(len(self.stop) <= MAX_STOP_STRINGS, "stop", f"may hold at most {MAX_STOP_STRINGS} strings")
        check(all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_STRING_CHARS for s in self.stop), "stop",
              f"must be non-empty strings of at most {MAX_STOP_STRING_CHARS} characters")
        check(len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS, "stop_token_ids",
              f"may hold at most {MAX_STOP_TOKEN_IDS} ids")
        for name in ("temperature", "top_p", "min_p", "length_penalty", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            check(math.isfinite(getattr(self, name)), name, "must be a finite number")
        self._validate_logits_processors(check)

    def _validate_logits_processors(self, check):
        for name in ("presence_penalty", "frequency_penalty"):
            check(-MAX_PENALTY <= getattr(self, name) <= MAX_PENALTY, name, f"must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}]")
        check(FLOAT32_TINY <= self.repetition_penalty <= FLOAT32_MAX, "repetition_penalty",
              "must be > 0 (1: off) and within float32's range")
        check(len(self.logit_bias) <= MAX_LOGIT_BIAS, "logit_bias", f"may hold at most {MAX_LOGIT_BIAS} entries")
        check(all(-MAX_LOGIT_BIAS_VALUE <= b <= MAX_LOGIT_BIAS_VALUE for b in self.logit_bias.values()),
              "logit_bias", f"values must be in [-{MAX_LOGIT_BIAS_VALUE:g}, {MAX_LOGIT_BIAS_VALUE:g}]")
        if self.allowed_token_ids is not None:
            check(0 < len(self.allowed_token_ids) <= MAX_ALLOWED_TOKEN_IDS, "allowed_token_ids",
                  f"must hold 1 to {MAX_ALLOWED_TOKEN_IDS} ids")
        check(len(self.bad_words) <= MAX_BAD_WORDS, "bad_words", f"may hold at most {MAX_BAD_WORDS} words")
        check(all(isinstance(w, str) and w.strip() and len(w) <= MAX_BAD_WORD_CHARS for w in self.bad_words),
              "bad_words", f"must be non-blank strings of at most {MAX_BAD_WORD_CHARS} characters")
        check(self.truncate_prompt_tokens is None or 1 <= self.truncate_prompt_tokens <= INT64_MAX,
              "truncate_prompt_tokens", "must be >= 1")

    def _validate_beam_search(self, check):
        """Beam search ranks candidates by the model's log-probabilities and draws nothing, so
        the filters of sampling would be silently ignored: refuse them (as vLLM did while its
        SamplingParams had use_beam_search). `temperature` is accepted (see README)."""
        check(self.best_of is None or self.best_of >= self.n, "best_of", "must be >= n (the beam width)")
        check(not self.stop, "stop", "is not supported with use_beam_search")
        check(self.min_tokens == 0, "min_tokens", "is not supported with use_beam_search")
        check(self.top_k in (0, -1), "top_k", "does not apply to use_beam_search (0 or -1 only)")
        check(self.top_p == 1, "top_p", "does not apply to use_beam_search (1 only)")
        check(self.min_p == 0, "min_p", "does not apply to use_beam_search (0 only)")
        # Beams rank the model's log-probabilities as they are: logits processors would be ignored.
        for name, off in (("presence_penalty", 0), ("frequency_penalty", 0), ("repetition_penalty", 1),
                          ("logit_bias", {}), ("allowed_token_ids", None), ("bad_words", []), ("logprobs", None)):
            check(getattr(self, name) == off, name, "is not supported with use_beam_search")


def check_token_ids(params: SamplingParams, vocab_size: int) -> None:
    """Raise ValueError naming the field when a token id of the request is outside [0, vocab_size).
    The engine calls it at submission, where the vocabulary is known; an id out of range would
    otherwise fail (or silently wrap around in) the step that indexes the logits with it."""
    for name, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", params.logit_bias),
                      ("allowed_token_ids", params.allowed_token_ids or ()),
                      ("bad_words", [t for word in params.bad_words_token_ids for t in word])):
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"'{name}' must be token ids in [0, {vocab_size}), got {_show(bad)}")


# ---------------------------------------------------------------------------------- converters

class _ShortRepr(reprlib.Repr):
    def __init__(self):
        super().__init__()
        self.maxstring = self.maxother = self.maxlong = 60
        self.maxlist = self.maxdict = 8
        self.maxlevel = 3

    def repr_int(self, x, level):
        # repr() of an int with more than 4300 digits raises; say its size instead.
        return repr(x) if x.bit_length() <= 128 else f"<an integer of {x.bit_length()} bits>"


_SHORT_REPR = _ShortRepr()


def _show(value):
    """repr for an error message, cut short (a client may send megabytes or deep nesting)."""
    return _SHORT_REPR.repr(value)


def _number_text(key, value):
    """A number sent as a string: bounded in length and shaped like a JSON number (no '1_0', 'inf')."""
    if len(value) > MAX_NUMBER_CHARS or not _NUMBER_TEXT.fullmatch(value):
        raise ValueError(f"'{key}' must be a finite number, got {_show(value)}")
    return value.strip()


def _float(key, value):
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"'{key}' must be a number, got {_show(value)}")
    try:
        x = float(_number_text(key, value) if isinstance(value, str) else value)
    except OverflowError:   # an int beyond the float range
        x = math.inf
    if not math.isfinite(x):
        raise ValueError(f"'{key}' must be a finite number, got {_show(value)}")
    return x


def _int(key, value):
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"'{key}' must be an integer, got {_show(value)}")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise ValueError(f"'{key}' must be an integer, got {_show(value)}")
        return int(value)   # exact: an integral float converts without rounding
    text = _number_text(key, value)
    if _INTEGER_TEXT.fullmatch(text):
        return int(text)
    return _integral_decimal(key, value, text)


def _integral_decimal(key, value, text):
    """'1e3', '12.0': exact through Decimal; an exponent beyond 64-bit range is refused before
    int() would build a number with millions of digits."""
    try:
        d = Decimal(text)
    except InvalidOperation:
        raise ValueError(f"'{key}' must be an integer, got {_show(value)}") from None
    if d != 0 and d.adjusted() > 19:
        raise ValueError(f"'{key}' must fit in 64 bits, got {_show(value)}")
    if d != d.to_integral_value():
        raise ValueError(f"'{key}' must be an integer, got {_show(value)}")
    return int(d)


def _bool(key, value):
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"'{key}' must be true or false, got {_show(value)}")


def _json_list(value):
    """A list sent as a JSON string (e.g. through a string-only request parameter)."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            pass
    return value


def _str_list(key, value):
    value = _json_list(value)
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ValueError(f"'{key}' must be a string or a list of strings, got {_show(value)}")
    return values


def _int_list(key, value, limit=MAX_STOP_TOKEN_IDS):
    value = _json_list(value)
    values = value if isinstance(value, list) else [value]
    if len(values) > limit:   # before converting a million elements
        raise ValueError(f"'{key}' may hold at most {limit} ids, got {len(values)}")
    return [_int(key, v) for v in values]


def _allowed_ids(key, value):
    return _int_list(key, value, MAX_ALLOWED_TOKEN_IDS)


def _str_list_bounded(key, value):
    values = _str_list(key, value)
    if len(values) > MAX_BAD_WORDS:
        raise ValueError(f"'{key}' may hold at most {MAX_BAD_WORDS} words, got {len(values)}")
    return values


def _logit_bias(key, value):
    """{token id: bias}; JSON keys are strings ("50256"), so ids are parsed like integer fields."""
    if isinstance(value, str) and value.lstrip().startswith("{"):   # sent as a JSON string
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            pass
    if not isinstance(value, dict):
        raise ValueError(f"'{key}' must be an object of token id -> bias, got {_show(value)}")
    if len(value) > MAX_LOGIT_BIAS:   # before converting a million entries
        raise ValueError(f"'{key}' may hold at most {MAX_LOGIT_BIAS} entries, got {len(value)}")
    biases = {}
    for token, bias in value.items():
        try:
            token_id = _int(key, token)
        except ValueError:
            raise ValueError(f"'{key}' keys must be token ids, got {_show(token)}") from None
        biases[token_id] = _float(key, bias)   # "7" and "7.0" are the same id: the last wins
    return biases


_CONVERTERS = {
    "n": _int, "temperature": _float, "top_k": _int, "top_p": _float, "min_p": _float, "seed": _int,
    "max_tokens": _int, "min_tokens": _int, "stop": _str_list, "stop_token_ids": _int_list,
    "ignore_eos": _bool, "skip_special_tokens": _bool, "detokenize": _bool, "include_stop_str_in_output": _bool,
    "use_beam_search": _bool, "best_of": _int, "length_penalty": _float, "early_stopping": _bool,
    "priority": _int, "presence_penalty": _float, "frequency_penalty": _float, "repetition_penalty": _float,
    "logit_bias": _logit_bias, "allowed_token_ids": _allowed_ids, "bad_words": _str_list_bounded,
    "truncate_prompt_tokens": _int, "add_special_tokens": _bool, "spaces_between_special_tokens": _bool, "logprobs": _int,
    "prompt_logprobs": _int,
}
