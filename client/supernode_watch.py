"""One SuperNode as the site's supervisor sees it: its process, what its log says, whether it answers.

The supervisor (:mod:`client.supervisor`) must tell a SuperNode that works from one that
only looks alive.  Three signs, each read here without touching Flower's internals:

* the process ended (exit code or signal);
* its log: the SuperNode's stderr passes through this process unchanged, and the lines in
  which Flower reports its connection (:func:`client.flower_internals.supernode_event`) are
  queued for the supervisor, tagged with this SuperNode's generation so that a late line of
  a replaced SuperNode changes nothing;
* its Runtime API's ``/health`` (loopback, the address the worker uses): a SuperNode that
  stops answering for ``hang_seconds`` is hung (stopped, deadlocked) and is killed; one that
  never answers gets :data:`STARTUP_SECONDS` first (importing Flower takes seconds, more on
  a busy machine).
"""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request

from client import flower_internals as fi

PROBE_EVERY = 5.0  # seconds between two /health requests to the SuperNode's Runtime API
PROBE_TIMEOUT = 5.0
DEFAULT_HANG_SECONDS = 60.0  # seconds without an answer, once it has answered, before a SuperNode counts as hung
STARTUP_SECONDS = 120.0  # seconds a new SuperNode may take to answer for the first time


class SuperNodeWatch:
    """A started SuperNode with its log reader and its liveness probe (both daemon threads)."""

    def __init__(self, cmd: list[str], runtime_address: str, events: queue.Queue, generation: int,
                 hang_seconds: float = DEFAULT_HANG_SECONDS):
        self.generation = generation
        self.events = events
        self.hang_seconds = hang_seconds
        self.url = f"http://{runtime_address}/health"
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.started = time.monotonic()
        self.answered: float | None = None  # when its Runtime API last answered
        self.shutting_down = False  # it logged its graceful exit: a signal reached it
        self.announced = False  # the supervisor has been told that it is up
        threading.Thread(target=self._read_log, name="nearl-supernode-log", daemon=True).start()
        threading.Thread(target=self._probe, name="nearl-supernode-probe", daemon=True).start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def _read_log(self) -> None:
        """Pass every line on to our stderr; queue the connection events."""
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            try:
                sys.stderr.buffer.write(raw)
                sys.stderr.flush()
            except (OSError, ValueError):
                pass  # our stderr is gone; keep draining so that the SuperNode never blocks on a full pipe
            event = fi.supernode_event(raw.decode("utf-8", "replace"))
            if event == "stopping":
                self.shutting_down = True
            elif event is not None:
                self.events.put((self.generation, event))

    def _probe(self) -> None:
        while self.proc.poll() is None:
            try:
                with self.opener.open(self.url, timeout=PROBE_TIMEOUT) as resp:
                    if resp.status == 200:
                        self.answered = time.monotonic()
            except OSError:
                pass
            time.sleep(PROBE_EVERY if self.answered else 1.0)  # every second until it first answers

    def unanswered_for(self) -> float:
        return time.monotonic() - (self.answered or self.started)

    def hung(self) -> bool:
        allowed = self.hang_seconds if self.answered else max(self.hang_seconds, STARTUP_SECONDS)
        return self.proc.poll() is None and self.unanswered_for() > allowed

    def signal(self, sig: int) -> None:
        try:
            self.proc.send_signal(sig)
        except ProcessLookupError:
            pass

    def end(self, timeout: float = 20.0, *, kill: bool = False) -> None:
        """SIGTERM (SIGKILL at once with ``kill``: a hung process handles no signal), SIGKILL after ``timeout``."""
        if self.proc.poll() is not None:
            return
        self.signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def exit_reason(self) -> str:
        """The SuperNode's exit, as the supervisor's log line says it."""
        code = self.proc.returncode
        who = f"the SuperNode (pid {self.pid})"
        if code is None:
            return f"{who} is still running"
        if code < 0:
            try:
                return f"{who} was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"{who} was killed by signal {-code}"
        if code == 0:
            return (f"{who} exited (code 0: Flower stops a SuperNode whose coordinator no longer knows it, "
                    "e.g. one that restarted)")
        from client.supernode import EXIT_LOOP_ENDED

        if code == EXIT_LOOP_ENDED:
            return f"{who} stopped talking to the coordinator and exited (code {code})"
        return f"{who} exited with code {code}"
