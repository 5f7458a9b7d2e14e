"""The engine core in a process of its own (`engine_core_process: true`), as vLLM V1 runs it.

In one process every Python thread shares one GIL: the core's scheduling and bookkeeping wait
behind the front's detokenizing and the server's response sending, and a small model's GPU steps
then wait for the host. Here the core (scheduler, model runner, tensor-parallel workers) runs in a
spawned child with a GIL of its own and steps on its own; the front keeps tokenizing, the output
processor and the callbacks. One pipe carries commands in, another, per step, the core's outputs
(token ids only, flattened by backend/core_message.py) with a snapshot of its counters out. The
front's commands leave through a thread of their own: a large request must never wait on a pipe
while the core waits on the other.

CoreProcessClient offers what LLMEngine uses of an EngineCore, so the engine drives either.
"""
import collections
import gc
import logging
import queue
import threading

from backend.config import EngineConfig
from backend.core_message import StepDecoder, StepEncoder
from backend.errors import INTERNAL
from backend.outputs import CoreOutput
from backend.worker import spawn_context

log = logging.getLogger(__name__)

# How long the front's step() waits for the core's next outputs before it returns with none, so
# that its loop can take in new requests and expire deadlines meanwhile.
STEP_WAIT_S = 0.005
STARTUP_TIMEOUT_S = 1800.0   # model loading, CUDA graphs and calibration of a large model


class CoreProcessClient:
    def __init__(self, config: EngineConfig, eos_token_ids: set[int]):
        ctx = spawn_context()
        commands_in, self._commands = ctx.Pipe(duplex=False)
        self._conn, outputs_out = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=core_main, args=(config, eos_token_ids, commands_in, outputs_out),
                                 name="llm-engine-core", daemon=True)
        self._proc.start()
        commands_in.close()
        outputs_out.close()
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_commands, name="llm-core-commands", daemon=True)
        self._writer.start()
        self.in_flight: set[str] = set()    # requests sent to the core and not yet finished
        self._max_num_seqs = config.max_num_seqs
        self.step_samples: collections.deque = collections.deque(maxlen=4096)
        self._decoder = StepDecoder()
        self._alive = True
        kind, payload = self._wait_ready()
        if kind == "error":
            self.shutdown()
            error_type, message = payload
            raise (ValueError if error_type == "ValueError" else RuntimeError)(message)
        self.num_blocks: int = payload["num_blocks"]
        self._stats: dict = payload["stats"]
        self._core_healthy = True

    def _wait_ready(self):
        if not self._conn.poll(STARTUP_TIMEOUT_S):
            raise RuntimeError("the engine core process did not start in time")
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            raise RuntimeError(f"the engine core process exited while starting (exit code "
                               f"{self._proc.exitcode})") from None

    # ---- what LLMEngine reads -------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        return self._alive and self._core_healthy and self._proc.is_alive()

    def num_queued(self, arriving: int = 0) -> int:
        """Requests sent (plus `arriving`) beyond the core's seats; the core's counters lag a step."""
        return max(0, len(self.in_flight) + arriving - self._max_num_seqs)

    def stats(self) -> dict:
        return self._stats

    def has_unfinished(self) -> bool:
        return bool(self.in_flight)

    # ---- commands -------------------------------------------------------------------------------
    def _send(self, *message):
        if self._alive:
            self._outbox.put(message)

    def _write_commands(self):
        while True:
            message = self._outbox.get()
            if message is None:
                return
            try:
                self._commands.send(message)
            except (OSError, EOFError):
                self._alive = False

    def add_request(self, request):
        self.in_flight.add(request.request_id)
        self._send("add", request)

    def abort(self, request_id: str):
        self._send("abort", request_id)

    def finish_sequences(self, stopped: list[tuple[str, int]]):
        self._send("finish", stopped)

    def fail_request(self, request_id: str, error: str, kind: str):
        self._send("fail", request_id, error, kind)

    def fail_if_waiting(self, request_id: str, error: str, kind: str):
        self._send("fail_if_waiting", request_id, error, kind)

    # ---- outputs --------------------------------------------------------------------------------
    def step(self) -> list[CoreOutput]:
        """The core's outputs since the last call (every step it finished meanwhile), waiting up to
        STEP_WAIT_S for the first."""
        outputs = []
        try:
            if not self._conn.poll(STEP_WAIT_S):
                return outputs
            while True:
                _, message, stats, samples, healthy = self._conn.recv()
                outputs += self._decoder.decode(message)
                self._stats, self._core_healthy = stats, healthy
                self.step_samples.extend(samples)
                if not self._conn.poll(0):
                    break
        except (EOFError, OSError):
            self._alive = False
            log.error("the engine core process exited (exit code %s)", self._proc.exitcode)
        for o in outputs:
            if o.finished:
                self.in_flight.discard(o.request_id)
        return outputs

    def fail_all(self, error: str | None) -> list[CoreOutput]:
        """Every request in flight ends now, as aborted (with `error`, if any); the core drops them."""
        self._send("fail_all", error)
        outputs = [CoreOutput(request_id, [], True, error, INTERNAL) for request_id in self.in_flight]
        self.in_flight.clear()
        return outputs

    def shutdown(self):
        self._send("shutdown")
        self._alive = False
        self._outbox.put(None)
        self._writer.join(timeout=60)
        self._proc.join(timeout=60)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=10)
        self._commands.close()
        self._conn.close()


def core_main(config: EngineConfig, eos_token_ids: set[int], commands, outputs):
    """The child: build the core, then step while there is work and take commands between steps."""
    import multiprocessing

    from backend.core import EngineCore
    # The front starts this process as a daemon (it must not outlive the front), and multiprocessing
    # refuses children to a daemon; tensor-parallel ranks are this process's (daemon) children, so the
    # flag is lifted here, in the child, where only that check reads it.
    multiprocessing.current_process().daemon = False
    try:
        core = EngineCore(config, eos_token_ids)
    except Exception as e:  # noqa: BLE001 - the front raises it where the engine is built
        log.exception("engine core start-up failed")
        outputs.send(("error", (type(e).__name__, str(e))))
        return
    gc.collect()
    gc.freeze()
    outputs.send(("ready", {"num_blocks": core.num_blocks, "stats": core.stats()}))
    try:
        serve(core, commands, outputs)
    except (EOFError, OSError):   # the front went away: nothing left to serve
        pass
    finally:
        core.shutdown()


def serve(core, commands, outputs):
    encoder = StepEncoder()
    while True:
        idle = not core.has_unfinished()
        took = False
        while commands.poll(None if idle and not took else 0):
            took = True
            if not apply(core, commands.recv()):
                return
        step_outputs = core.step()   # after commands too: an abort's final output goes out this way
        samples = [core.step_samples.popleft() for _ in range(len(core.step_samples))]
        if step_outputs or samples:
            outputs.send(("step", encoder.encode(step_outputs), core.stats(), samples, core.healthy))


def apply(core, message) -> bool:
    """One command from the front; False when the core is to stop."""
    kind, *args = message
    if kind == "shutdown":
        return False
    if kind == "add":
        core.add_request(*args)
    elif kind == "abort":
        core.abort(*args)
    elif kind == "finish":
        core.finish_sequences(*args)
    elif kind == "fail":
        core.fail_request(*args)
    elif kind == "fail_if_waiting":
        core.fail_if_waiting(*args)
    elif kind == "fail_all":
        core.fail_all(*args)   # the front has ended them already: only their resources go
    return True
