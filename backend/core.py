"""EngineCore: a step is schedule -> run the model (which samples) -> update the sequences.

Single-threaded: its owner (LLMEngine's loop thread today; a process of its own tomorrow) calls
add_request, abort, finish_sequences and step. It speaks token ids only: requests in, one
CoreOutput per request that progressed out. Text, stop strings and responses are the front's.

Async scheduling: step k+1 is launched before step k's tokens reach the host. Each sequence
counts its tokens in flight (num_placeholders); the runner reads their values on the GPU; a
sequence that turns out to have stopped was scheduled one step too many and that token is dropped.
"""
import collections
import logging
import time
from dataclasses import dataclass

import torch

from backend import beam_search
from backend.calibration import calibrate
from backend.config import EngineConfig
from backend.errors import INTERNAL
from backend.model_runner import ModelRunner
from backend.outputs import CoreOutput, SampleUpdate
from backend.sampler import SamplingBatch, StepResult
from backend.sampling_params import SamplingParams
from backend.scheduler import Scheduler, SchedulerOutput
from backend.sequence import Sequence, SequenceGroup
from backend.step_cost import StepTimer
from backend.worker import TensorParallelWorkers

log = logging.getLogger(__name__)
_NOTHING: frozenset[int] = frozenset()


@dataclass
class EngineCoreRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


class EngineCore:
    def __init__(self, config: EngineConfig, eos_token_ids: set[int], runner=None, scheduler: Scheduler | None = None,
                 step_timer: StepTimer | None = None):
        """runner, scheduler, step_timer: parts to use instead of building them (tests hand in stand-ins)."""
        self.config = config.resolve()
        self.workers = None
        if runner is None:
            if config.tensor_parallel_size > 1:
                self.workers = TensorParallelWorkers(config)
            runner = ModelRunner(config)
        self.runner = runner
        self.scheduler = scheduler or Scheduler.for_config(config, runner.num_blocks)
        self.step_timer = step_timer or StepTimer(config.torch_device)
        if config.target_itl_ms and config.torch_device.type == "cuda" and self.workers is None:
            calibrate(runner, self.scheduler.cost_model, self.step_timer, config)   # the target holds from the start
        # (tokens, seconds) of finished steps, for the metrics (bounded: nobody may be reading)
        self.step_samples: collections.deque = collections.deque(maxlen=4096)
        self.block_manager = self.scheduler.block_manager
        self.eos_token_ids = eos_token_ids
        self.max_model_len = config.max_model_len
        # Tensor parallelism steps synchronously and eagerly (its inputs are broadcast from the host).
        self.async_scheduling = self.workers is None and (config.async_scheduling == "true" or (
            config.async_scheduling == "auto" and config.torch_device.type == "cuda"))
        self.requests: dict[str, SequenceGroup] = {}
        self.in_flight: StepResult | None = None
        # requests that fork (n > 1, beams) or need their whole output on the host (penalties, bad_words):
        # while any is in flight, steps are synchronous (SequenceGroup.steps_synchronously)
        self.num_stepping_synchronously = 0
        self.gpu_wait_s = 0.0   # the host's time waiting for step results (metrics: where the loop's time goes)
        self.num_prompt_tokens = 0       # totals for metrics (read from other threads: plain ints)
        self.num_generation_tokens = 0
        self._touched: list[SequenceGroup] = []
        self._stepping: tuple = ()                # (in-flight result, SchedulerOutput) of the step under way
        self._suspects: list[SequenceGroup] = []  # requests that a failed step implicates, being narrowed down
        self._sampled: set[SequenceGroup] | None = None   # while there are suspects: requests that took a token
        self.device_ok = True                     # False after an error that leaves the device unusable

    # ---- requests -------------------------------------------------------------------------------
    def add_request(self, request: EngineCoreRequest):
        seq = Sequence(request.request_id, request.prompt_token_ids, len(request.prompt_token_ids), request.params)
        if request.params.seed is not None:
            seq.generator = torch.Generator(device=self.config.torch_device).manual_seed(request.params.seed)
        group = SequenceGroup(seq)
        self.requests[request.request_id] = group
        self.num_prompt_tokens += seq.num_prompt_tokens
        self.num_stepping_synchronously += group.steps_synchronously
        self.scheduler.add(seq)

    def abort(self, request_id: str):
        group = self.requests.get(request_id)
        if group is not None:
            for seq in group.live():
                self.scheduler.finish(seq, "abort")
            self._touched.append(group)

    def finish_sequences(self, stopped: list[tuple[str, int]]):
        """(request id, sample index) pairs that the front saw stop (a stop string): free them. The
        front knows already; a request ended so gives one more (final) output, which the front
        ignores and which tells a core in another process's client that it is done."""
        for request_id, index in stopped:
            group = self.requests.get(request_id)
            if group is None:
                continue
            for seq in group.live():
                if seq.index == index:
                    self.scheduler.finish(seq, "stop")
            if group.finished:
                self._retire(group)
                self._touched.append(group)

    def fail_request(self, request_id: str, error: str, kind: str):
        """End a request (if still running) with an error of `kind` (backend.errors): a deadline passed."""
        group = self.requests.get(request_id)
        if group is not None and not group.finished:
            self._fail(group, error, kind)

    def has_unfinished(self) -> bool:
        return bool(self.scheduler.has_work() or self.in_flight is not None or self._touched)

    def has_started(self, request_id: str) -> bool:
        """Has the request been scheduled (its KV computed in part), or finished?"""
        group = self.requests.get(request_id)
        return group is None or any(s.num_computed_tokens or s.num_output_tokens for s in group.seqs)

    @property
    def healthy(self) -> bool:
        """False once a tensor-parallel worker has exited (the model cannot run without its shard) or
        the GPU is left unusable by an error."""
        return (self.workers is None or self.workers.alive()) and self.device_ok

    # ---- one step -------------------------------------------------------------------------------
    def step(self) -> list[CoreOutput]:
        """One step. If it raises, only the request(s) implicated fail (see _isolate); the rest go on."""
        if self.workers is not None:
            self.workers.check()   # no model without every shard: that failure is the whole engine's
        try:
            outputs = self._step()
        except Exception as e:   # noqa: BLE001 - whatever broke, keep serving the requests that did not
            log.exception("engine step failed")
            return self._isolate(e)
        if self._suspects:
            self._probe_passed()
        return outputs

    @torch.inference_mode()
    def _step(self) -> list[CoreOutput]:
        self._sampled = set() if self._suspects else None
        synchronous = not self.async_scheduling or self.num_stepping_synchronously > 0 or bool(self._suspects)
        self._stepping = (self.in_flight, None)
        if synchronous:
            self._update(self._take_in_flight())
        out = self.scheduler.schedule()
        self._stepping = (self._stepping[0], out)
        result = None
        if out:
            timing = self.step_timer.start()
            result = self.runner.run(out, self._sampling_batch(out), self.in_flight)
            result.step = (out.total_tokens, out.attention, self.step_timer.stop(timing))
            self._keep_prompt_logprobs(result.prompt_logprobs)
            self.scheduler.advance(out)
            self._count_in_flight(result)
        if synchronous:
            self._update(result)
        else:   # the host's work on the last step's tokens overlaps this step on the GPU
            previous, self.in_flight = self.in_flight, result
            self._update(previous)
        return self._outputs()

    def _sampling_batch(self, out: SchedulerOutput) -> SamplingBatch:
        """Who draws from which logits row; a request with n > 1 forks here, as its first token is drawn."""
        batch = SamplingBatch()
        for row, seq in enumerate(out.sampling_seqs()):
            group = seq.group
            if group.is_beam:
                batch.beam_seqs.append(seq)
                batch.beam_rows.append(row)
                continue
            if not group.forked and group.params.n > 1:
                for child in beam_search.fork_samples(seq, self.scheduler, self.config.torch_device):
                    batch.add(child, row, self._masked_ids(child))
            batch.add(seq, row, self._masked_ids(seq))
        return batch

    def _masked_ids(self, seq: Sequence) -> frozenset[int] | set[int]:
        """Token ids that may not be drawn yet (stop ids before min_tokens)."""
        p = seq.params
        if seq.num_output_tokens >= p.min_tokens:
            return _NOTHING
        return set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_token_ids)

    @staticmethod
    def _keep_prompt_logprobs(found: dict):
        """Append each chunk's prompt log-probs in position order (a recomputed chunk adds nothing)."""
        for seq, entries in found.items():
            kept = seq.group.prompt_logprobs
            for position, entry in entries:
                if position == len(kept):
                    kept.append(entry)

    def _count_in_flight(self, result: StepResult):
        for seq in result.seqs:
            seq.num_placeholders += 1
            if seq.num_output_tokens >= seq.params.max_tokens or seq.num_tokens >= self.max_model_len:
                self.scheduler.retire(seq)   # this token is its last, whatever it is

    def _take_in_flight(self) -> StepResult | None:
        result, self.in_flight = self.in_flight, None
        return result

    def _update(self, result: StepResult | None):
        """The step's tokens are known: append them, apply the stop rules, run the beams."""
        if result is None:
            return
        waited = time.perf_counter()
        tokens = result.host_token_ids()
        self.gpu_wait_s += time.perf_counter() - waited
        self._observe_step(*result.step)
        for seq, token, logprobs in zip(result.seqs, tokens, result.host_logprobs(tokens)):
            if seq.is_finished:     # stopped (or aborted) while this token was being made
                continue
            seq.num_placeholders -= 1
            seq.token_ids.append(token)
            if logprobs is not None:
                seq.cum_logprob += logprobs.logprob
                if seq.params.logprobs is not None:
                    seq.unreported_logprobs.append(logprobs)
            self.num_generation_tokens += 1
            self._check_stop(seq)
            self._touched.append(seq.group)
        if self._sampled is not None:
            self._sampled.update(s.group for s in result.seqs)
        if result.beam_seqs:
            self._beam_steps(result)

    def _observe_step(self, tokens: int, attention: int, timing):
        """The step is done: its time feeds the metrics and, under a latency target, the scheduler's
        cost model (no fitting when nothing asks for it)."""
        seconds = self.step_timer.seconds(timing)
        if self.scheduler.target_step_s:
            self.scheduler.cost_model.observe(tokens, attention, seconds)
        self.step_samples.append((tokens, seconds))

    def _check_stop(self, seq: Sequence):
        token, p = seq.token_ids[-1], seq.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
            self.scheduler.finish(seq, "stop")
        elif len(seq.token_ids) - seq.num_prompt_tokens >= p.max_tokens or len(seq.token_ids) >= self.max_model_len:
            self.scheduler.finish(seq, "length")

    def _beam_steps(self, result: StepResult):
        by_group: dict[SequenceGroup, dict[int, torch.Tensor]] = {}
        for seq, logprobs in zip(result.beam_seqs, result.beam_logprobs):
            by_group.setdefault(seq.group, {})[id(seq)] = logprobs
        for group, logprobs_of in by_group.items():
            eos = set() if group.params.ignore_eos else self.eos_token_ids
            self.num_generation_tokens += beam_search.beam_step(group, logprobs_of, self.scheduler, eos,
                                                                self.max_model_len)
            if self._sampled is not None:
                self._sampled.add(group)
            if group.finished:
                self._touched.append(group)

    # ---- outputs --------------------------------------------------------------------------------
    def _outputs(self) -> list[CoreOutput]:
        outputs = []
        for group in dict.fromkeys(self._touched):
            finished = group.finished
            outputs.append(self._core_output(group, finished))
            if finished:
                self._retire(group)
        self._touched = []
        return outputs

    @staticmethod
    def _core_output(group: SequenceGroup, finished: bool) -> CoreOutput:
        if group.is_beam:   # beams are reordered every step: only the final ranking goes out
            samples = [SampleUpdate(s.index, s.output_token_ids, s.finish_reason, s.cum_logprob, replace=True)
                       for s in group.seqs] if finished else []
        else:
            samples = []
            for s in group.seqs:
                cumulative = s.cum_logprob if s.params.wants_logprob else None
                samples.append(SampleUpdate(s.index, s.token_ids[s.num_reported_tokens:], s.finish_reason, cumulative,
                                            logprobs=s.unreported_logprobs if s.params.logprobs is not None else None))
                s.num_reported_tokens = len(s.token_ids)
                s.unreported_logprobs = []
        prompt_logprobs = None
        if group.prompt_logprobs is not None and not group.prompt_logprobs_sent and (
                len(group.prompt_logprobs) == group.seqs[0].num_prompt_tokens):
            prompt_logprobs, group.prompt_logprobs_sent = group.prompt_logprobs, True
        return CoreOutput(group.request_id, samples, finished, group.error, group.error_kind,
                          group.seqs[0].first_scheduled_time, prompt_logprobs)

    def _retire(self, group: SequenceGroup):
        if self.requests.pop(group.request_id, None) is not None:
            self.num_stepping_synchronously -= group.steps_synchronously

    def fail_all(self, error: str | None) -> list[CoreOutput]:
        """Finish every request as aborted (with `error`, if any): after a failed step, at shutdown."""
        self.in_flight = None
        for group in list(self.requests.values()):
            self._fail(group, error)
        self._set_suspects([])
        return self._outputs()

    # ---- fault isolation ------------------------------------------------------------------------
    def _isolate(self, error: Exception) -> list[CoreOutput]:
        """A step raised. Everything in flight is computed again from its tokens (the step's KV
        writes and tokens cannot be trusted), and the requests of the failed step are bisected:
        only half of the suspects runs (the rest waits) until it has drawn a token or failed again;
        a suspect left alone fails with the error."""
        self.device_ok = self._device_usable()
        in_flight, out = self._stepping
        seqs = [*(in_flight.seqs if in_flight is not None else ()), *(out.seqs if out is not None else ())]
        groups = list(dict.fromkeys(s.group for s in seqs if not s.group.finished))
        suspects = groups if not self._suspects else [g for g in self._suspects if g in groups] or groups
        self.in_flight, self._stepping = None, ()
        self.scheduler.recompute([s for g in self.requests.values() for s in g.seqs])
        self.block_manager.forget_cached_blocks()
        if len(suspects) <= 1:
            for group in suspects:
                self._fail(group, f"this request made the engine step fail: {error!r}")
            self._set_suspects([])
        else:
            self._set_suspects(suspects)
        return self._outputs()

    def _device_usable(self) -> bool:
        """After a CUDA error such as an illegal address every later call fails: then no request is
        to blame and the engine is broken. Other errors leave the device usable."""
        device = self.config.torch_device
        if device.type != "cuda":
            return True
        try:
            (torch.ones(1, device=device) + 1).item()
            return True
        except Exception:   # noqa: BLE001 - any failure here means the device is gone
            log.exception("the GPU is not usable after the failed step")
            return False

    def _set_suspects(self, suspects: list[SequenceGroup]):
        self._suspects = suspects
        probe = suspects[:(len(suspects) + 1) // 2]
        self.scheduler.admit_only = {g.request_id for g in probe} if suspects else None

    def _probe_passed(self):
        """After a good step: suspects that drew a token in it are cleared; once the probed half is
        cleared, the other half is probed (and once none is left, everyone runs again)."""
        self._suspects = [g for g in self._suspects if not g.finished and g not in self._sampled]
        if not self.scheduler.admit_only & {g.request_id for g in self._suspects}:
            self._set_suspects(self._suspects)

    def _fail(self, group: SequenceGroup, error: str | None, kind: str = INTERNAL):
        group.error, group.error_kind = error, kind
        for seq in group.live():
            self.scheduler.finish(seq, "abort")
        self._touched.append(group)

    def fail_if_waiting(self, request_id: str, error: str, kind: str):
        """Fail a request that has not started yet (queue_timeout_s); one that has goes on."""
        if not self.has_started(request_id):
            self.fail_request(request_id, error, kind)

    # ---- state ----------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.block_manager.num_blocks

    def num_queued(self, arriving: int = 0) -> int:
        """Requests (waiting, plus `arriving` not yet added) beyond the free seats: those that could
        not start even if the scheduler ran now. A burst's first requests wait a step before they
        run; they are not queued."""
        sched = self.scheduler
        return max(0, len(sched.waiting) + arriving - max(0, sched.max_num_seqs - len(sched.running)))

    def stats(self) -> dict:
        """A snapshot for metrics (vLLM's names); safe to read from any thread."""
        bm, sched = self.block_manager, self.scheduler
        return {"num_requests_running": len(sched.running), "num_requests_waiting": len(sched.waiting),
                "kv_cache_usage_perc": 1.0 - bm.num_free_blocks / bm.num_blocks,
                "num_preemptions_total": sched.num_preemptions, "prompt_tokens_total": self.num_prompt_tokens,
                "generation_tokens_total": self.num_generation_tokens,
                "prefix_cache_queries": bm.num_prefix_queries, "prefix_cache_hits": bm.num_prefix_hits,
                "engine_gpu_wait_seconds_total": self.gpu_wait_s}

    def shutdown(self):
        if self.workers is not None:
            self.workers.stop()
            self.workers = None
