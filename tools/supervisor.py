"""Run tritonserver as a child and keep it serving.

Triton 2.51's Python backend never restarts the stub of a decoupled model: after the stub dies,
requests in flight wait forever, the ready endpoints keep answering 200 and every new request
fails with "Stub process ... is not healthy". Reloading the model through the repository API
brings a fresh stub but still leaves the in-flight requests hanging (tried on 2.51), so the
supervisor restarts the whole server instead: its connections close, every client in flight gets
an error at once, and the model loads again.

What it watches, every `poll_s`:
- a stub that stays a zombie: Triton waits for the stubs it stops itself (unload, shutdown), so a
  stub left unreaped for `zombie_grace_s` died on its own (killed, crashed);
- tritonserver dying of a signal, or exiting with an error after it had been ready: restart;
- tritonserver exiting with 0, or with an error before it was first ready (a configuration
  error, such as a model that fails to load): exit with its code.

On SIGTERM/SIGINT the server gets SIGTERM (Triton finishes requests in flight, unloads models);
whatever is left of its process group after that is killed, and its shared-memory regions are
removed. The server gets SIGTERM by itself if the launcher is killed outright.
"""
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import deque

import processes


RESTART_PAUSE_S = 1.0   # lets the old server's ports and GPU memory go before the next one starts


def exit_status(code):
    """A child's exit code as our own: killed by signal N (code -N) becomes 128 + N, as in shells."""
    if code is None:
        return 1
    return 128 - code if code < 0 else code


def log(message):
    print(f"serve.py: {message}", file=sys.stderr, flush=True)


class Companion:
    """A process that serves beside tritonserver (the OpenAI front): started once, restarted on its
    own when it dies (unless it dies within QUICK_EXIT_S of its start: a port in use, say), left
    running while tritonserver restarts, stopped with the launcher."""
    QUICK_EXIT_S = 5.0

    def __init__(self, name, cmd, env):
        self.name, self.cmd, self.env = name, cmd, env
        self.proc, self.exit_code, self.started_at = None, None, None

    def start(self):
        self.exit_code, self.started_at = None, time.monotonic()
        self.proc = subprocess.Popen(self.cmd, env=self.env, process_group=0,
                                     preexec_fn=processes.die_with_parent(os.getpid()))
        log(f"{self.name} started (pid {self.proc.pid})")

    def reaped(self, pid, code):
        if self.proc is not None and pid == self.proc.pid:
            self.exit_code = self.proc.returncode = code
            return True
        return False

    def restart_if_dead(self):
        if self.exit_code is None or self.proc is None:
            return
        if time.monotonic() - self.started_at < self.QUICK_EXIT_S:
            log(f"{self.name} exited with {self.exit_code} right after its start: not restarting it")
            self.proc = None
            return
        log(f"{self.name} exited with {self.exit_code}: restarting it")
        self.start()

    def stop(self):
        if self.proc is not None and self.exit_code is None:
            processes.kill_group(self.proc.pid, signal.SIGTERM)


class Supervisor:
    def __init__(self, cmd, env, ready_url, shm_prefix, exit_timeout_s=30.0, max_restarts=5,
                 restart_window_s=600.0, poll_s=0.5, zombie_grace_s=1.0, companions=()):
        self.cmd, self.env, self.ready_url, self.shm_prefix = cmd, env, ready_url, shm_prefix
        self.companions = list(companions)
        # Triton waits up to its exit timeout for requests in flight, then unloads the models.
        self.stop_timeout_s = exit_timeout_s + 30.0
        self.max_restarts, self.restart_window_s = max_restarts, restart_window_s
        self.poll_s, self.zombie_grace_s = poll_s, zombie_grace_s
        self.restarts = deque()          # times of recent restarts
        self.signals = 0                 # SIGTERM/SIGINT received
        self.server = None
        self.server_rc = None
        self.started_at = None

    # ------------------------------------------------------------------ the loop

    def run(self):
        self._install_signal_handlers()
        if not processes.become_subreaper():
            log("could not become a child subreaper: orphaned stubs are left to init")
        for companion in self.companions:
            companion.start()
        try:
            return self._serve_until_stopped()
        finally:
            self._stop_companions()

    def _serve_until_stopped(self):
        first = True
        while True:
            outcome, value = self._serve_once(first)
            self._clean_up()
            if outcome == "exit":
                return exit_status(value)
            if not self._may_restart():
                log(f"{value}; {len(self.restarts)} restarts within {self.restart_window_s:.0f} s already: "
                    "giving up")
                return 1
            log(f"{value}: restarting tritonserver")
            time.sleep(RESTART_PAUSE_S)
            if self.signals:             # asked to stop while the server was down: stay down
                log("not restarting: asked to stop")
                return exit_status(self.server_rc)
            first = False

    def _serve_once(self, first):
        """Start the server and watch it; returns ("exit", code) or ("restart", reason)."""
        self._start()
        ready_since = None
        zombies = {}                     # stub pid -> when it was first seen as a zombie
        while True:
            self._reap()
            if self.signals:
                return "exit", self._stop_gracefully()
            if self.server_rc is not None:
                # 0: it was asked to stop. An error exit before its first ready: a configuration
                # error (a model that fails to load), not worth repeating. A signal: a crash.
                if self.server_rc == 0 or (ready_since is None and first and self.server_rc > 0):
                    return "exit", self.server_rc
                return "restart", f"tritonserver exited with {self.server_rc}"
            if ready_since is None and self._is_ready():
                ready_since = time.monotonic()
                log(f"tritonserver is ready ({ready_since - self.started_at:.1f} s after its start)")
            for companion in self.companions:
                companion.restart_if_dead()
            dead = self._dead_stub(zombies)
            if dead is not None:
                self._kill_server()
                return "restart", f"the Python-backend stub (pid {dead}) died"
            time.sleep(self.poll_s)

    # ------------------------------------------------------------------ the server process

    def _start(self):
        self.server_rc = None
        self.started_at = time.monotonic()
        self.server = subprocess.Popen(self.cmd, env=self.env, process_group=0,
                                       preexec_fn=processes.die_with_parent(os.getpid()))
        log(f"tritonserver started (pid {self.server.pid})")

    def _reap(self):
        for pid, code in processes.reap_children().items():
            if any(companion.reaped(pid, code) for companion in self.companions):
                continue
            if self.server is not None and pid == self.server.pid:
                self.server_rc = code
                self.server.returncode = code   # so that Popen never waits for it again

    def _stop_gracefully(self):
        log("stopping tritonserver (SIGTERM)")
        self._signal_server(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout_s
        seen = self.signals
        while self.server_rc is None and time.monotonic() < deadline and self.signals == seen:
            time.sleep(0.1)
            self._reap()
        if self.server_rc is None:
            log("tritonserver did not stop in time: killing it")
            self._kill_server()
        return self.server_rc

    def _kill_server(self):
        processes.kill_group(self.server.pid)
        deadline = time.monotonic() + 10
        while self.server_rc is None and time.monotonic() < deadline:
            time.sleep(0.05)
            self._reap()

    def _signal_server(self, sig):
        try:
            os.kill(self.server.pid, sig)
        except ProcessLookupError:
            pass

    def _clean_up(self):
        """Nothing of this server outlives it: its process group (stubs, tensor-parallel workers),
        orphans re-parented to us, and its shared-memory regions."""
        processes.kill_group(self.server.pid)
        time.sleep(0.1)
        self._reap()
        keep = {c.proc.pid for c in self.companions if c.proc is not None and c.exit_code is None}
        for pid in processes.children_of(os.getpid()) - keep:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._reap()
        removed = processes.remove_shm_regions(self.shm_prefix) if self.shm_prefix else []
        if removed:
            log(f"removed {len(removed)} shared-memory region(s) left by the server")

    def _stop_companions(self):
        for companion in self.companions:
            companion.stop()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(c.proc and c.exit_code is None for c in self.companions):
            time.sleep(0.05)
            self._reap()
        for companion in self.companions:
            if companion.proc is not None and companion.exit_code is None:
                processes.kill_group(companion.proc.pid)
        self._reap()

    # ------------------------------------------------------------------ health

    def _is_ready(self):
        try:
            with urllib.request.urlopen(self.ready_url, timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _dead_stub(self, zombies):
        """The pid of a stub that has been a zombie for zombie_grace_s, else None."""
        now = time.monotonic()
        states = processes.stubs_of(self.server.pid)
        for pid in list(zombies):
            if states.get(pid) != "Z":
                del zombies[pid]         # reaped by Triton: it stopped that stub itself
        for pid, state in states.items():
            if state == "Z":
                zombies.setdefault(pid, now)
                if now - zombies[pid] >= self.zombie_grace_s:
                    return pid
        return None

    def _may_restart(self):
        now = time.monotonic()
        while self.restarts and now - self.restarts[0] > self.restart_window_s:
            self.restarts.popleft()
        if len(self.restarts) >= self.max_restarts:
            return False
        self.restarts.append(now)
        return True

    def _install_signal_handlers(self):
        def on_signal(signum, frame):
            self.signals += 1
            if self.signals > 1 and self.server is not None:   # asked twice: no more waiting
                processes.kill_group(self.server.pid)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, on_signal)
