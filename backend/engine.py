"""LLMEngine: add_request / abort / step, and the loop thread that steps while there is work.

Requests arrive from any thread (Triton's execute()); they are validated and tokenized in the
caller's thread so a bad request fails at once, then queued for the engine thread. Outputs go
to each request's callback from the engine thread; callbacks must not block.
"""
import json
import logging
import os
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import AutoTokenizer

from backend.block_manager import BlockManager, cdiv
from backend.config import EngineConfig
from backend.detokenizer import decode_delta, new_state
from backend.model_runner import ModelRunner
from backend.sampling_params import SamplingParams
from backend.scheduler import Scheduler
from backend.sequence import Sequence

log = logging.getLogger(__name__)


@dataclass
class RequestOutput:
    request_id: str
    prompt: str
    new_text: str                 # text added since the previous output of this request
    text: str                     # all output text so far (prompt excluded)
    token_ids: list[int]          # output token ids so far
    num_prompt_tokens: int
    finished: bool
    finish_reason: str | None = None   # "stop", "length", "abort"
    error: str | None = None


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = _pick_device(config.device)
        self.dtype = _pick_dtype(config.dtype, self.device)
        hf_config = config.hf_config()
        model_max = hf_config.get("max_position_embeddings", 4096)
        self.max_model_len = config.max_model_len or model_max
        self.tokenizer = AutoTokenizer.from_pretrained(config.model)
        self.eos_token_ids = _eos_token_ids(config.model, hf_config, self.tokenizer)
        self.runner = ModelRunner(config, hf_config, self.device, self.dtype, self.max_model_len)
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self._callbacks: dict[str, Callable[[RequestOutput], None] | None] = {}
        self._seqs: dict[str, Sequence] = {}
        self._inbox: deque = deque()          # ("add", seq) / ("abort", request_id), from any thread
        self._wakeup = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        log.info("engine: %s %s, %d KV blocks of %d tokens, max_model_len %d", self.device, self.dtype,
                 self.runner.num_blocks, config.block_size, self.max_model_len)

    # ---- requests -------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str, params: SamplingParams,
                    on_output: Callable[[RequestOutput], None] | None = None,
                    prompt_token_ids: list[int] | None = None) -> Sequence:
        if prompt_token_ids is None:
            prompt_token_ids = self.tokenizer.encode(prompt)
        if not prompt_token_ids:
            raise ValueError("'text_input' is empty: the prompt needs at least one token")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(f"'text_input' has {len(prompt_token_ids)} tokens; max_model_len is "
                             f"{self.max_model_len}, which must leave room for at least one output token")
        lifetime = min(len(prompt_token_ids) + params.max_tokens, self.max_model_len)
        if cdiv(lifetime, self.block_manager.block_size) > self.block_manager.num_blocks:
            raise ValueError(f"the request needs up to {lifetime} tokens of KV cache, more than the whole pool "
                             f"({self.block_manager.num_blocks * self.block_manager.block_size} tokens); "
                             "lower 'max_tokens' or give the engine a larger KV cache")
        seq = Sequence(request_id, prompt, prompt_token_ids, params)
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        seq.detok = new_state(len(prompt_token_ids))
        with self._wakeup:
            if self._stopping:
                raise RuntimeError("the engine is shutting down")
            self._inbox.append(("add", seq, on_output))
            self._wakeup.notify()
        return seq

    def abort(self, request_id: str):
        with self._wakeup:
            self._inbox.append(("abort", request_id, None))
            self._wakeup.notify()

    def has_unfinished(self) -> bool:
        return bool(self._inbox or self.scheduler.has_work())

    # ---- one iteration --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs = self._drain_inbox()
        out = self.scheduler.schedule()
        if not out:
            return self._deliver(outputs)
        seqs, tokens = self.runner.run(out, self._stop_ids_while_min_tokens)
        self.scheduler.advance(out)
        for seq, token in zip(seqs, tokens):
            outputs.append(self._append_token(seq, token))
        return self._deliver(outputs)

    def _drain_inbox(self) -> list[RequestOutput]:
        outputs = []
        while self._inbox:
            kind, item, callback = self._inbox.popleft()
            if kind == "add":
                self._seqs[item.request_id] = item
                self._callbacks[item.request_id] = callback
                self.scheduler.add(item)
            elif item in self._seqs:
                seq = self._seqs[item]
                self.scheduler.finish(seq, "abort")
                outputs.append(self._output(seq, ""))
        return outputs

    def _append_token(self, seq: Sequence, token: int) -> RequestOutput:
        seq.token_ids.append(token)
        p = seq.params
        reason = None
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
            if seq.num_output_tokens > p.min_tokens or token in p.stop_token_ids:
                reason = "stop"
        state = seq.detok
        old_len = len(state.text)
        state.text += decode_delta(self.tokenizer, seq.token_ids, state, p.skip_special_tokens)
        if p.stop and reason is None and seq.num_output_tokens > p.min_tokens - 1:
            reason = self._apply_stop_strings(seq, old_len)
        if reason is None and (seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len):
            reason = "length"
        if reason is not None:
            self.scheduler.finish(seq, reason)
        # While a stop string could still be forming at the end, hold those characters back.
        hold = 0 if reason or not p.stop else max(map(len, p.stop)) - 1
        sendable = len(state.text) - hold
        sent = getattr(seq, "num_sent_chars", 0)
        new_text = state.text[sent:sendable] if sendable > sent else ""
        seq.num_sent_chars = max(sent, sendable)
        return self._output(seq, new_text)

    def _apply_stop_strings(self, seq: Sequence, old_len: int) -> str | None:
        text, p = seq.detok.text, seq.params
        start = max(0, old_len - max(map(len, p.stop)) + 1)
        hits = [(text.find(s, start), s) for s in p.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return None
        i, s = min(hits)
        seq.detok.text = text[:i + len(s)] if p.include_stop_str_in_output else text[:i]
        return "stop"

    def _stop_ids_while_min_tokens(self, seq: Sequence) -> set[int]:
        p = seq.params
        if seq.num_output_tokens >= p.min_tokens:
            return set()
        return set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_token_ids)

    def _output(self, seq: Sequence, new_text: str) -> RequestOutput:
        sent = getattr(seq, "num_sent_chars", 0)
        return RequestOutput(seq.request_id, seq.prompt, new_text, seq.detok.text[:sent], seq.output_token_ids,
                             seq.num_prompt_tokens, seq.is_finished, seq.finish_reason)

    def _deliver(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        for o in outputs:
            callback = self._callbacks.get(o.request_id)
            if o.finished:
                self._callbacks.pop(o.request_id, None)
                self._seqs.pop(o.request_id, None)
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
                self.add_request(rid, "", p, prompt_token_ids=list(prompt))
            ids.append(rid)
        final = {}
        while self.has_unfinished():
            for o in self.step():
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
                self.step()
            except Exception as e:   # fail what is in flight rather than hang it
                log.exception("engine step failed")
                self._fail_all(f"engine step failed: {e!r}")

    def _fail_all(self, error: str | None, reason: str = "abort"):
        self._drain_inbox()
        outputs = []
        for seq in list(self._seqs.values()):
            self.scheduler.finish(seq, reason)
            o = self._output(seq, "")
            o.error = error
            outputs.append(o)
        self._deliver(outputs)

    def shutdown(self):
        """Stop the loop; every request still in flight gets a final "abort" output."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._fail_all(None)


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _eos_token_ids(model_dir: str, hf_config: dict, tokenizer) -> set[int]:
    ids = set()
    gen_path = os.path.join(model_dir, "generation_config.json")
    sources = [hf_config.get("eos_token_id")]
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
