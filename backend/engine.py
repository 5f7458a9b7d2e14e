"""LLMEngine, the front: add_request / abort / step / generate, and the loop thread.

Requests arrive from any thread (Triton's execute()); they are validated and tokenized in the
caller's thread so that a bad request fails at once, then queued for the loop thread. That thread
alone drives the parts: inbox -> EngineCore.step (token ids) -> OutputProcessor (text, stop
strings) -> each request's callback. Callbacks must not block.
"""
import dataclasses
import gc
import heapq
import json
import logging
import os
import threading
import time
from collections import deque
from typing import Callable

from backend.block_manager import cdiv
from backend.config import EngineConfig
from backend.core import EngineCore, EngineCoreRequest
from backend.errors import UNAVAILABLE, EngineUnavailable
from backend.output_processor import OutputProcessor
from backend.outputs import CoreOutput, RequestOutput
from backend.sampling_params import SamplingParams, check_token_ids
from backend.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

OutputCallback = Callable[[RequestOutput], None]


class LLMEngine:
    def __init__(self, config: EngineConfig, runner=None, scheduler=None):
        """runner, scheduler: parts for the core to use instead of building its own (tests hand in
        stand-ins)."""
        self.config = config.resolve()
        self.tokenizer = load_tokenizer(config.tokenizer or config.model)
        self.eos_token_ids = eos_token_ids(config, self.tokenizer)
        if self.config.uses_core_process:
            from backend.core_process import CoreProcessClient
            self.core = CoreProcessClient(self.config, self.eos_token_ids)
        else:
            self.core = EngineCore(config, self.eos_token_ids, runner, scheduler)
        self.processor = OutputProcessor(self.tokenizer)
        self.max_model_len = config.max_model_len
        self.vocab_size = config.hf["vocab_size"]   # the logits' width: every token id a request names is below it
        # Beyond this many characters a prompt is first tokenized in part: if the part alone is too
        # long, the prompt is refused without tokenizing the rest (megabytes would take seconds).
        self.max_prompt_chars = self.max_model_len * max(map(len, self.tokenizer.get_vocab()))
        self.num_rejected = 0                 # refused by max_queue_size (metrics)
        # The loop thread's steps: wall and CPU seconds (metrics). With the core's GPU wait they show
        # where a served step's time goes: wall - CPU - GPU wait is time without the GIL.
        self.loop_wall_s = self.loop_cpu_s = 0.0
        self._deadlines: list[tuple[float, str, str]] = []   # heap of (when, request id, why), loop thread only
        # Requests in flight -> their callback: added under _wakeup by add_request, removed when finished.
        self._callbacks: dict[str, OutputCallback | None] = {}
        self._inbox: deque = deque()   # ("add", (request, prompt, timeout_s)) / ("abort", request_id), from any thread
        self._wakeup = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        # Start-up leaves a large heap of long-lived objects (model, tokenizer, graphs): move it out of
        # the collector's sight, or each full collection scans it all while steps wait (150 ms
        # measured on the H100 host amid a Qwen3-0.6B run).
        gc.collect()
        gc.freeze()
        log.info("engine: %s %s%s, %d KV blocks of %d tokens (%s), max_model_len %d", config.torch_device,
                 config.torch_dtype, ", fp8 weights" if config.quantization == "fp8" else "", self.core.num_blocks,
                 config.block_size, config.kv_cache_torch_dtype, self.max_model_len)

    @property
    def healthy(self) -> bool:
        return self.core.healthy

    def take_step_samples(self) -> list[tuple[int, float]]:
        """(tokens, seconds) of the engine steps finished since the last call; any thread."""
        samples, queue = [], self.core.step_samples
        while queue:
            samples.append(queue.popleft())
        return samples

    def stats(self) -> dict:
        """A snapshot for metrics (vLLM's names); safe to call from any thread."""
        return {**self.core.stats(), "request_rejected_total": self.num_rejected,
                "engine_loop_seconds_total": self.loop_wall_s, "engine_loop_cpu_seconds_total": self.loop_cpu_s}

    # ---- requests -------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str, params: SamplingParams,
                    on_output: OutputCallback | None = None, prompt_token_ids: list[int] | None = None,
                    timeout_s: float | None = None) -> None:
        """Validate and queue a request; raises ValueError (naming the field) for a bad one and
        EngineUnavailable when the engine cannot take it now. timeout_s: the request ends with an
        error when it has not finished by then (Triton's request timeout)."""
        self._check_admission()   # before any work on a request that would be refused anyway
        if params.prompt_logprobs is not None and self.config.tensor_parallel_size > 1:
            raise ValueError("'prompt_logprobs' is not supported with tensor_parallel_size > 1")
        if prompt_token_ids is None:
            if not prompt:   # vLLM refuses an empty prompt too (even where the tokenizer adds a BOS)
                raise ValueError("'text_input' is empty: the prompt must not be empty")
            if params.truncate_prompt_tokens is None:   # truncated, the whole prompt may be long
                self._check_prompt_length(prompt)
            prompt_token_ids = self.tokenizer.encode(prompt, add_special_tokens=params.add_special_tokens)
        else:
            prompt_token_ids = list(prompt_token_ids)
            if not prompt_token_ids:
                raise ValueError("'prompt_token_ids' is empty: the prompt must not be empty")
            if not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in prompt_token_ids):
                raise ValueError(f"'prompt_token_ids' must be token ids in [0, {self.vocab_size})")
        ids = prompt_token_ids
        if params.truncate_prompt_tokens is not None:   # vLLM: keep the last k tokens
            ids = ids[-params.truncate_prompt_tokens:]
        if params.bad_words:
            params = dataclasses.replace(params, bad_words_token_ids=tokenize_bad_words(params.bad_words,
                                                                                        self.tokenizer))
        self._check_fits(ids, params)
        check_token_ids(params, self.vocab_size)
        request = EngineCoreRequest(request_id, ids, params)
        with self._wakeup:
            self._check_admission()
            if request_id in self._callbacks:
                raise ValueError(f"request id {request_id!r} is already in flight")
            self._callbacks[request_id] = on_output
            self._inbox.append(("add", (request, prompt, timeout_s)))
            self._wakeup.notify()

    def _check_prompt_length(self, prompt: str):
        """Refuse a prompt far too long for max_model_len from its head alone. A prefix has at most
        one token more than the whole text (the cut may split a word), so a head of more than
        max_model_len + 1 tokens proves the prompt cannot fit. (Tokenizers that drop whitespace
        can pack many characters into few tokens: length in characters alone proves nothing.)"""
        if len(prompt) <= self.max_prompt_chars:
            return
        head = self.tokenizer.encode(prompt[:self.max_prompt_chars])
        if len(head) > self.max_model_len + 1:
            raise ValueError(f"'text_input' has more than {len(head) - 1} tokens ({len(prompt)} characters); "
                             f"max_model_len is {self.max_model_len}")

    def _check_admission(self):
        if self._stopping:
            raise EngineUnavailable("the engine is shutting down")
        if not self.healthy:
            raise EngineUnavailable("the engine is not healthy (a tensor-parallel worker exited, or the GPU failed)")
        limit = self.config.max_queue_size
        if limit and self.core.num_queued(len(self._inbox)) >= limit:
            self.num_rejected += 1
            raise EngineUnavailable(f"the server is overloaded: {limit} requests are waiting to start "
                                    "(max_queue_size); retry later")

    def _check_fits(self, ids: list[int], params: SamplingParams):
        if not ids:
            raise ValueError("'text_input' is empty: the prompt needs at least one token")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"'text_input' has {len(ids)} tokens; max_model_len is {self.max_model_len}, "
                             "which must leave room for at least one output token")
        width = max(params.n, params.beam_width)
        if width > min(self.config.max_num_seqs, self.config.max_num_batched_tokens):
            raise ValueError(f"'n' ({width}) exceeds max_num_seqs or max_num_batched_tokens of the engine")
        num_blocks = self.core.num_blocks
        lifetime_blocks = cdiv(min(len(ids) + params.max_tokens, self.max_model_len), self.config.block_size)
        # Beams advance in lockstep, so all of them must fit in the pool at once.
        if lifetime_blocks * (params.beam_width if params.use_beam_search else 1) > num_blocks:
            raise ValueError(f"the request needs up to {lifetime_blocks} KV blocks per sequence, more than the pool "
                             f"holds ({num_blocks}); lower 'max_tokens' or give the engine a larger KV cache")

    def abort(self, request_id: str):
        with self._wakeup:
            self._inbox.append(("abort", request_id))
            self._wakeup.notify()

    def has_unfinished(self) -> bool:
        return bool(self._inbox or self.core.has_unfinished())

    # ---- one iteration --------------------------------------------------------------------------
    def step(self, only_finished: bool = False) -> list[RequestOutput]:
        """One iteration. Returns the outputs of the requests that progressed (only the finished
        ones with only_finished, for callers that want final results: less work per step)."""
        self._drain_inbox()
        self._expire()
        return self._handle(self.core.step(), only_finished)

    def _drain_inbox(self):
        while self._inbox:
            kind, item = self._inbox.popleft()
            if kind == "add":
                request, prompt, timeout_s = item
                self.processor.add_request(request.request_id, prompt, request.prompt_token_ids, request.params)
                self.core.add_request(request)
                now = time.monotonic()
                if timeout_s:
                    heapq.heappush(self._deadlines, (now + timeout_s, request.request_id, "timeout"))
                if self.config.queue_timeout_s:
                    heapq.heappush(self._deadlines, (now + self.config.queue_timeout_s, request.request_id, "queue"))
            else:
                self.core.abort(item)

    def _expire(self):
        """Requests past their deadline, or still waiting to start after queue_timeout_s, end with an error."""
        if not self._deadlines:
            return
        now = time.monotonic()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, request_id, why = heapq.heappop(self._deadlines)
            if why == "queue":
                error = (f"the server is overloaded: the request waited {self.config.queue_timeout_s:g} s "
                         "without starting (queue_timeout_s); retry later")
                self.core.fail_if_waiting(request_id, error, UNAVAILABLE)
            else:
                self.core.fail_request(request_id, "the request's timeout expired", UNAVAILABLE)

    def _handle(self, core_outputs: list[CoreOutput], only_finished: bool = False) -> list[RequestOutput]:
        callbacks = self._callbacks
        outputs, stopped, failed = self.processor.process(core_outputs, only_finished,
                                                          lambda request_id: callbacks.get(request_id) is not None)
        if stopped:
            self.core.finish_sequences(stopped)
        for request_id in failed:
            self.core.abort(request_id)
        for o in outputs:
            callback = callbacks.pop(o.request_id, None) if o.finished else callbacks.get(o.request_id)
            if callback is not None:
                try:
                    callback(o)
                except Exception:   # a broken consumer must not stop the engine
                    log.exception("output callback of request %s failed", o.request_id)
        return outputs

    # ---- offline use ----------------------------------------------------------------------------
    def generate(self, prompts: list, params: SamplingParams | list[SamplingParams]) -> list[RequestOutput]:
        """Run prompts (strings or token id lists) to completion in this thread; outputs in order."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        ids = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            rid = f"generate-{id(self)}-{i}"
            if isinstance(prompt, str):
                self.add_request(rid, prompt, p)
            else:
                self.add_request(rid, "", p, prompt_token_ids=prompt)
            ids.append(rid)
        final = {}
        while self.has_unfinished():
            for o in self.step(only_finished=True):
                if o.finished:
                    final[o.request_id] = o
        return [final[r] for r in ids]

    # ---- the loop thread ------------------------------------------------------------------------
    def start(self):
        self._thread = threading.Thread(target=self._loop, name="llm-engine", daemon=True)
        self._thread.start()

    def _loop(self):
        while True:
            with self._wakeup:
                while not self._stopping and not self.has_unfinished():
                    self._wakeup.wait()
                if self._stopping:
                    break
            try:
                wall, cpu = time.perf_counter(), time.thread_time()
                self.step()   # a request that breaks a step fails alone (EngineCore.step)
                self.loop_cpu_s += time.thread_time() - cpu
                self.loop_wall_s += time.perf_counter() - wall
                if not self.core.healthy:
                    self._fail_all("the engine is not healthy: the GPU is not usable after an error")
            except Exception as e:   # the core as a whole is broken: fail what is in flight rather than hang it
                log.exception("engine step failed")
                self._fail_all(f"engine step failed: {e!r}")

    def _fail_all(self, error: str | None):
        self._drain_inbox()
        self._handle(self.core.fail_all(error))
        self._deadlines.clear()

    def shutdown(self):
        """Stop the loop; every request still in flight gets a final "abort" output."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._fail_all(None)
        self.core.shutdown()


def tokenize_bad_words(words: list[str], tokenizer) -> list[list[int]]:
    """vLLM's bad-word token sequences: each word without special tokens as it reads at the start
    of a text, and with a leading space (mid-text) where that is a different first token of the
    same length. (A word that tokenizes to nothing is dropped: it can never be generated.)"""
    sequences = []
    for word in words:
        word = word.lstrip()
        plain = tokenizer.encode(word, add_special_tokens=False)
        spaced = tokenizer.encode(" " + word, add_special_tokens=False)
        if plain:
            sequences.append(plain)
            if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
                sequences.append(spaced)
    return sequences


def eos_token_ids(config: EngineConfig, tokenizer) -> set[int]:
    """End-of-sequence ids from config.json, generation_config.json and the tokenizer."""
    ids = set()
    sources = [config.hf.get("eos_token_id")]
    gen_path = os.path.join(config.model, "generation_config.json")
    if os.path.exists(gen_path):
        with open(gen_path) as f:
            sources.append(json.load(f).get("eos_token_id"))
    sources.append(tokenizer.eos_token_id)
    for s in sources:
        if isinstance(s, int):
            ids.add(s)
        elif isinstance(s, list):
            ids.update(x for x in s if isinstance(x, int))
    return ids
