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

from backend import beam_search, parallel
from backend.block_manager import BlockManager, cdiv
from backend.config import EngineConfig
from backend.detokenizer import decode_delta, fast_decoder, new_state
from backend.model_runner import ModelRunner
from backend.outputs import RequestOutput, SampleOutput
from backend.sampling_params import SamplingParams
from backend.scheduler import Scheduler
from backend.tokenizer import load_tokenizer
from backend.sequence import PLACEHOLDER, Sequence, SequenceGroup, SequenceStatus

log = logging.getLogger(__name__)


@dataclass
class PendingTokens:
    """A launched step's sampled tokens, still on their way to the host (async scheduling)."""
    seqs: list[Sequence]
    indices: list[int]          # where each token goes in its sequence's token_ids
    tokens: torch.Tensor        # on the device
    host: torch.Tensor          # pinned host copy, valid once `event` has completed
    event: torch.cuda.Event | None
    row_of: dict[int, int]      # id(seq) -> row in tokens

OutputCallback = Callable[[RequestOutput], None]
_NOTHING: frozenset[int] = frozenset()


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = _pick_device(config.device)
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)   # graphs, events and kernels go to this instance's GPU
        self.dtype = _pick_dtype(config.dtype, self.device)
        hf_config = config.hf_config()
        self.max_model_len = config.max_model_len or hf_config.get("max_position_embeddings", 4096)
        self.tokenizer = load_tokenizer(config.tokenizer or config.model)
        self.decode = fast_decoder(self.tokenizer)
        self.eos_token_ids = _eos_token_ids(config.model, hf_config, self.tokenizer)
        self.workers = self._start_tensor_parallel(hf_config) if config.tensor_parallel_size > 1 else []
        self.runner = ModelRunner(config, hf_config, self.device, self.dtype, self.max_model_len)
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.scheduling_policy)
        self._groups: dict[str, SequenceGroup] = {}
        self._ids_in_flight: set[str] = set()   # added under _wakeup by add_request, removed when finished
        # Tensor parallelism steps synchronously and eagerly (its inputs are broadcast from the host).
        self._async = not self.workers and (config.async_scheduling == "true" or (
            config.async_scheduling == "auto" and self.device.type == "cuda"))
        self.healthy = True
        self._pending: PendingTokens | None = None
        self._num_forking = 0    # requests in flight with n > 1 or beams: those step synchronously
        self.num_prompt_tokens = 0       # totals for metrics (read from other threads: plain ints)
        self.num_generation_tokens = 0
        self._inbox: deque = deque()          # ("add", group) / ("abort", request_id), from any thread
        self._wakeup = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        log.info("engine: %s %s, %d KV blocks of %d tokens, max_model_len %d", self.device, self.dtype,
                 self.runner.num_blocks, config.block_size, self.max_model_len)

    def _start_tensor_parallel(self, hf_config: dict):
        from backend.models.llama import LlamaArgs, shard_for_rank
        size = self.config.tensor_parallel_size
        shard_for_rank(LlamaArgs.from_hf(hf_config), size, 0)   # raises now if the model does not split
        if self.device.type == "cuda" and torch.cuda.device_count() < size:
            raise ValueError(f"parameter 'tensor_parallel_size' ({size}) exceeds the GPUs here "
                             f"({torch.cuda.device_count()})")
        workers, init_file = parallel.start_workers(size, self.config, hf_config, self.max_model_len,
                                                    self.device.type)
        parallel.init(0, size, init_file, self.device.type)
        return workers

    def _check_workers(self):
        dead = [p.name for p in self.workers if not p.is_alive()]
        if dead:
            self.healthy = False
            raise RuntimeError(f"tensor-parallel worker(s) {', '.join(dead)} exited")

    def _stop_workers(self):
        if not self.workers:
            return
        if all(p.is_alive() for p in self.workers):
            try:
                parallel.broadcast_step(None)
            except Exception:   # a worker died mid-broadcast: nothing more to tell them
                log.exception("stopping tensor-parallel workers")
        for p in self.workers:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
        parallel.shutdown()
        self.workers = []

    def stats(self) -> dict:
        """A snapshot for metrics (vLLM's names); safe to call from any thread."""
        bm, sched = self.block_manager, self.scheduler
        return {"num_requests_running": len(sched.running), "num_requests_waiting": len(sched.waiting),
                "kv_cache_usage_perc": 1.0 - bm.num_free_blocks / bm.num_blocks,
                "num_preemptions_total": sched.num_preemptions, "prompt_tokens_total": self.num_prompt_tokens,
                "generation_tokens_total": self.num_generation_tokens,
                "prefix_cache_queries": bm.num_prefix_queries, "prefix_cache_hits": bm.num_prefix_hits}

    # ---- requests -------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str, params: SamplingParams,
                    on_output: OutputCallback | None = None, prompt_token_ids: list[int] | None = None) -> None:
        """Validate and queue a request; raises ValueError (naming the field) for a bad one."""
        ids = self.tokenizer.encode(prompt) if prompt_token_ids is None else list(prompt_token_ids)
        self._check_fits(ids, params)
        seq = Sequence(request_id, prompt, ids, params)
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        seq.detok = new_state(len(ids))
        with self._wakeup:
            if self._stopping:
                raise RuntimeError("the engine is shutting down")
            if not self.healthy:
                raise RuntimeError("the engine is not healthy (a tensor-parallel worker exited)")
            if request_id in self._ids_in_flight:
                raise ValueError(f"request id {request_id!r} is already in flight")
            self._ids_in_flight.add(request_id)
            self._inbox.append(("add", SequenceGroup(seq, on_output)))
            self._wakeup.notify()

    def _check_fits(self, ids: list[int], params: SamplingParams):
        if not ids:
            raise ValueError("'text_input' is empty: the prompt needs at least one token")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"'text_input' has {len(ids)} tokens; max_model_len is {self.max_model_len}, "
                             "which must leave room for at least one output token")
        width = max(params.n, params.beam_width)
        if width > min(self.config.max_num_seqs, self.config.max_num_batched_tokens):
            raise ValueError(f"'n' ({width}) exceeds max_num_seqs or max_num_batched_tokens of the engine")
        lifetime_blocks = cdiv(min(len(ids) + params.max_tokens, self.max_model_len), self.config.block_size)
        # Beams advance in lockstep, so all of them must fit in the pool at once.
        if lifetime_blocks * (params.beam_width if params.use_beam_search else 1) > self.block_manager.num_blocks:
            raise ValueError(f"the request needs up to {lifetime_blocks} KV blocks per sequence, more than the pool "
                             f"holds ({self.block_manager.num_blocks}); lower 'max_tokens' or give the engine a "
                             "larger KV cache")

    def abort(self, request_id: str):
        with self._wakeup:
            self._inbox.append(("abort", request_id))
            self._wakeup.notify()

    def has_unfinished(self) -> bool:
        return bool(self._inbox or self.scheduler.has_work() or self._pending is not None)

    # ---- one iteration --------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, only_finished: bool = False) -> list[RequestOutput]:
        """One iteration. Returns the outputs of the requests that progressed (only the finished
        ones with only_finished, for callers that want final results: less work per step)."""
        touched = self._drain_inbox()
        if self.workers:
            self._check_workers()
        if self._async and not self._num_forking:
            touched += self._step_async()
        else:
            touched += self._resolve_pending()
            out = self.scheduler.schedule()
            if out:
                sample_seqs, logits = self.runner.run(out)
                self.scheduler.advance(out)
                touched += self._process(sample_seqs, logits)
        return self._deliver(list(dict.fromkeys(touched)), only_finished)

    def _step_async(self) -> list[SequenceGroup]:
        """Launch this step before handling the last one's tokens, so that the host's work (detokenizing,
        stop checks, outputs, the next schedule) overlaps the GPU's. The last step's tokens are not on
        the host yet: sequences carry a PLACEHOLDER, which the runner fills from the GPU copy. A
        sequence that turns out to have stopped was scheduled one step too many; that token is dropped."""
        out = self.scheduler.schedule()
        launched = None
        if out:
            sample_seqs, logits = self.runner.run(out, self._pending)
            self.scheduler.advance(out)
            if sample_seqs:
                tokens = self.runner.sampler.sample(logits, sample_seqs, [self._masked_ids(s) for s in sample_seqs])
                launched = self._launch_copy(sample_seqs, tokens)
        touched = self._resolve_pending()
        self._pending = launched
        return touched

    def _launch_copy(self, seqs: list[Sequence], tokens: torch.Tensor) -> PendingTokens:
        cuda = tokens.is_cuda
        host = torch.empty(len(seqs), dtype=torch.long, pin_memory=cuda)
        host.copy_(tokens, non_blocking=cuda)
        event = None
        if cuda:
            event = torch.cuda.Event()
            event.record()
        indices = []
        for seq in seqs:
            indices.append(seq.num_tokens)
            seq.token_ids.append(PLACEHOLDER)
            if seq.num_output_tokens >= seq.params.max_tokens or seq.num_tokens >= self.max_model_len:
                self.scheduler.retire(seq)   # this token is its last, whatever it is
        return PendingTokens(seqs, indices, tokens, host, event, {id(s): i for i, s in enumerate(seqs)})

    def _resolve_pending(self) -> list[SequenceGroup]:
        pending, self._pending = self._pending, None
        if pending is None:
            return []
        if pending.event is not None:
            pending.event.synchronize()
        touched = []
        for seq, index, token in zip(pending.seqs, pending.indices, pending.host.tolist()):
            if seq.is_finished:     # stopped (or aborted) while this token was being made
                continue
            seq.token_ids[index] = token
            self._settle_token(seq, index)
            touched.append(seq.group)
        return touched

    def _drain_inbox(self) -> list[SequenceGroup]:
        aborted = []
        while self._inbox:
            kind, item = self._inbox.popleft()
            if kind == "add":
                self._groups[item.request_id] = item
                self.num_prompt_tokens += item.seqs[0].num_prompt_tokens
                self._num_forking += item.forks
                self.scheduler.add(item.seqs[0])
            elif item in self._groups:
                group = self._groups[item]
                for seq in group.live():
                    self.scheduler.finish(seq, "abort")
                aborted.append(group)
        return aborted

    def _process(self, sample_seqs: list[Sequence], logits: torch.Tensor) -> list[SequenceGroup]:
        """Turn the step's logits into tokens: plain sampling, first-token forks for n > 1, beam steps."""
        rows, row_seqs, beams, touched = [], [], {}, []
        for row, seq in enumerate(sample_seqs):
            group = seq.group
            if group.is_beam:
                beams.setdefault(group, []).append((row, seq))
                continue
            if not group.forked and group.params.n > 1:
                for child in self._fork_samples(seq):
                    rows.append(row)
                    row_seqs.append(child)
            rows.append(row)
            row_seqs.append(seq)
            touched.append(group)
        if rows:
            tokens = self.runner.sampler(logits[rows], row_seqs, [self._masked_ids(s) for s in row_seqs])
            for seq, token in zip(row_seqs, tokens):
                self._append_token(seq, token)
        for group, items in beams.items():
            if self._beam_step(group, items, logits):
                touched.append(group)
        return touched   # step() removes repeats

    def _fork_samples(self, parent: Sequence) -> list[Sequence]:
        """Split a request into its n samples when its prompt is done: they share the prompt's blocks."""
        group = parent.group
        group.forked = True
        children = []
        for i in range(1, group.params.n):
            child = parent.fork(i)
            self.block_manager.fork(parent, child)
            if group.params.seed is not None:
                child.generator = torch.Generator(device=self.device).manual_seed(group.params.seed + i)
            group.seqs.append(child)
            self.scheduler.add_running(child)
            children.append(child)
        return children

    def _append_token(self, seq: Sequence, token: int):
        seq.token_ids.append(token)
        self._settle_token(seq, seq.num_tokens - 1)

    def _settle_token(self, seq: Sequence, index: int):
        """The token at `index` is known: detokenize, check stop conditions, finish if one holds."""
        token, p = seq.token_ids[index], seq.params
        self.num_generation_tokens += 1
        end = index + 1
        num_output = end - seq.num_prompt_tokens
        reason = None
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
            reason = "stop"
        state = seq.detok
        old_len = len(state.text)
        if p.detokenize:
            state.text += decode_delta(self.decode, seq.token_ids, state, p.skip_special_tokens, end)
        if reason is None and p.stop:
            reason = self._apply_stop_strings(seq, old_len, num_output)
        if reason is None and (num_output >= p.max_tokens or end >= self.max_model_len):
            reason = "length"
        if reason is not None:
            del seq.token_ids[end:]   # a token scheduled past the stop (async scheduling)
            self.scheduler.finish(seq, reason)

    def _apply_stop_strings(self, seq: Sequence, old_len: int, num_output: int) -> str | None:
        text, p = seq.detok.text, seq.params
        if num_output < p.min_tokens:
            return None
        start = max(0, old_len - max(map(len, p.stop)) + 1)
        hits = [(i, s) for i, s in ((text.find(s, start), s) for s in p.stop) if i >= 0]
        if not hits:
            return None
        i, s = min(hits)
        seq.detok.text = text[:i + len(s)] if p.include_stop_str_in_output else text[:i]
        return "stop"

    def _masked_ids(self, seq: Sequence) -> set[int]:
        """Token ids that may not be drawn yet (stop ids before min_tokens)."""
        p = seq.params
        if seq.num_output_tokens >= p.min_tokens:
            return _NOTHING
        return set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_token_ids)

    def _beam_step(self, group: SequenceGroup, items: list[tuple[int, Sequence]], logits) -> bool:
        live = group.live()
        if len(items) < len(live):
            # Not every beam reached this step (chunked recompute after preemption): let the early ones
            # recompute their last token next step, so that the beams advance together.
            for _, seq in items:
                seq.num_computed_tokens -= 1
            return False
        row_of = {id(seq): row for row, seq in items}
        logprobs = torch.log_softmax(logits[[row_of[id(s)] for s in live]], dim=-1)
        eos = set() if group.params.ignore_eos else self.eos_token_ids
        length_before = live[0].num_output_tokens
        chosen = beam_search.select_beams(group, logprobs, eos)
        # Fork first (a fork copies its parent's tokens as they are), then append.
        next_beams, used = [], set()
        for parent, token, score in chosen:
            seq = parent if id(parent) not in used else self._fork_beam(parent)
            used.add(id(parent))
            next_beams.append((seq, token, score))
        for seq in live:
            if id(seq) not in used:
                self.scheduler.finish(seq, "dropped")
                group.seqs.remove(seq)
        self.num_generation_tokens += len(next_beams)
        for seq, token, score in next_beams:
            seq.token_ids.append(token)
            seq.cum_logprob = score
        group.forked = True
        p = group.params
        # (live[0] may have been dropped this step: measure a surviving beam)
        at_limit = length_before + 1 >= p.max_tokens or (next_beams and next_beams[0][0].num_tokens >= self.max_model_len)
        if at_limit or not next_beams:
            for seq, _, _ in next_beams:
                beam_search.add_hypothesis(group, seq, None, seq.cum_logprob)
            self._finish_beams(group, "length" if at_limit else "stop")
            return True
        if beam_search.is_done(group, max(s for _, _, s in next_beams), length_before):
            self._finish_beams(group, "stop")
            return True
        return False

    def _fork_beam(self, parent: Sequence) -> Sequence:
        group = parent.group
        child = parent.fork(len(group.seqs))
        self.block_manager.fork(parent, child)
        group.seqs.append(child)
        self.scheduler.add_running(child)
        return child

    def _finish_beams(self, group: SequenceGroup, reason: str):
        for seq in group.live():
            self.scheduler.finish(seq, reason)
        hyps = [seq for _, seq in group.beam_hyps[:group.params.n]]
        for i, seq in enumerate(hyps):
            seq.index, seq.finish_reason = i, reason
            seq.status = SequenceStatus.FINISHED
            seq.detok.text = self.decode(seq.output_token_ids, skip_special_tokens=group.params.skip_special_tokens)
            seq.num_sent_chars = 0
        group.seqs = hyps

    # ---- outputs --------------------------------------------------------------------------------
    def _request_output(self, group: SequenceGroup) -> RequestOutput:
        seqs = group.seqs
        if len(seqs) == 1 and not group.is_beam:   # the common case, kept short: it runs per request per step
            seq = seqs[0]
            return RequestOutput(group.request_id, seq.prompt, seq.num_prompt_tokens, [self._sample_output(seq)],
                                 seq.is_finished, group.error)
        finished = group.finished
        if group.is_beam and not finished:
            samples = []   # beams are reordered every step: only the final ranking is output
        else:
            samples = [self._sample_output(seq) for seq in sorted(group.seqs, key=lambda s: s.index)]
        first = group.seqs[0]
        return RequestOutput(group.request_id, first.prompt, first.num_prompt_tokens, samples, finished, group.error)

    def _sample_output(self, seq: Sequence) -> SampleOutput:
        text = seq.detok.text
        # While a stop string could still be forming at the end, hold those characters back.
        hold = 0 if seq.is_finished or not seq.params.stop else max(map(len, seq.params.stop)) - 1
        sendable = max(seq.num_sent_chars, len(text) - hold)
        new_text = text[seq.num_sent_chars:sendable]
        seq.num_sent_chars = sendable
        token_ids = seq.output_token_ids
        if token_ids and token_ids[-1] == PLACEHOLDER:   # in flight (async scheduling): not known yet
            token_ids.pop()
        return SampleOutput(seq.index, new_text, text[:sendable], token_ids, seq.finish_reason,
                            seq.cum_logprob if seq.params.use_beam_search else None)

    def _deliver(self, groups: list[SequenceGroup], only_finished: bool = False) -> list[RequestOutput]:
        outputs = []
        for group in groups:
            if only_finished and group.callback is None and not group.finished:
                continue
            o = self._request_output(group)
            outputs.append(o)
            if o.finished and self._groups.pop(group.request_id, None) is not None:
                self._num_forking -= group.forks
                self._ids_in_flight.discard(group.request_id)
            if group.callback is not None:
                try:
                    group.callback(o)
                except Exception:   # a broken consumer must not stop the engine
                    log.exception("output callback of request %s failed", group.request_id)
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
                self.step()
            except Exception as e:   # fail what is in flight rather than hang it
                log.exception("engine step failed")
                self._fail_all(f"engine step failed: {e!r}")

    def _fail_all(self, error: str | None):
        self._pending = None
        self._drain_inbox()
        groups = list(self._groups.values())
        for group in groups:
            group.error = error
            for seq in group.live():
                self.scheduler.finish(seq, "abort")
        self._deliver(groups)

    def shutdown(self):
        """Stop the loop; every request still in flight gets a final "abort" output."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._fail_all(None)
        self._stop_workers()


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
