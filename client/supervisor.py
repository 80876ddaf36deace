"""What ``nearl-client`` becomes: the parent of the site's SuperNode and, on a warm site, of its worker.

It starts the SuperNode (``python -m client.supernode``: Flower's, ending when its connection
does; on a warm site with process isolation, Runtime API on loopback with a shared secret),
then the site worker (:mod:`client.worker`) once the Runtime API is up, and watches both:

* the connection (:mod:`client.connection`): the SuperNode's log says when it is connected
  and when it retries; a site without a working connection for ``--connect-timeout``
  seconds in a row stops its worker and SuperNode and exits with ``EXIT_DISCONNECTED`` and
  one line, so that its service manager starts it again (``--connect-timeout 0``: never);
* the SuperNode (:mod:`client.supernode_watch`): one that exits on its own (a coordinator
  that restarted no longer knows it; a crash; SIGKILL), gives up, or stops answering on its
  Runtime API is replaced by a new one after 1, 2, 4 ... 30 s; the worker keeps running and
  picks up the new SuperNode at the same address;
* the worker dies -> the message it was running is answered with an error reply for this site
  (``<site>: the site worker died ...``), recorded in the site's log and audit trail, and a new
  worker is started (with a growing delay when it keeps dying at start-up); the next message
  is served by the new worker;
* SIGTERM/SIGINT -> both are stopped; the exit code is the SuperNode's.

It imports no torch: it stays small while the worker holds the model.  Every second it
writes ``status.json`` next to the spec (pids, restarts, the connection), read by
``nearl-client health``, deploy/docker/healthcheck.py and the site's console.  A cold site
(``--cold``) runs the same supervisor without a worker.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from client import worker_exits
from client.connection import EXIT_DISCONNECTED, Connection
from client.supernode_watch import DEFAULT_HANG_SECONDS, SuperNodeWatch
from client.worker import EXIT_UPGRADED

PROG = "nearl-client"
STATUS_FILE = "status.json"
FORWARD_GRACE = 2.0  # seconds a signalled supervisor waits before passing SIGTERM on to its SuperNode


def log(line: str) -> None:
    print(f"{PROG}: {line}", flush=True)


def port_open(address: str) -> bool:
    import socket

    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=0.5):
            return True
    except OSError:
        return False


class Supervisor:
    def __init__(self, spec_file: Path):
        self.spec_file = spec_file
        self.spec: dict[str, Any] = json.loads(spec_file.read_text())
        self.runtime_dir = spec_file.parent
        self.task_file = Path(self.spec.get("task_file") or self.runtime_dir / "task-none.json")
        self.warm = self.spec.get("mode", "warm") == "warm"
        self.link = Connection(self.spec.get("coordinator", "?"), self.spec.get("connect_timeout"))
        self.events: queue.Queue = queue.Queue()
        self.supernode: SuperNodeWatch | None = None
        self.generation = 0
        self.restart_at = 0.0
        self.worker: subprocess.Popen | None = None
        self.worker_started = 0.0
        self.worker_due = 0.0
        self.restarts = 0
        self.stopping = False
        self.stop_asked = 0.0
        self.forwarded = False
        self.crash_delay = 0.0

    # -- processes -------------------------------------------------------------------------------------
    def start_supernode(self) -> None:
        if self.generation:
            self.link.supernode_started()
        self.generation += 1
        self.supernode = SuperNodeWatch(self.spec["supernode_cmd"], self.spec["runtime_address"], self.events,
                                        self.generation, float(self.spec.get("hang_seconds") or DEFAULT_HANG_SECONDS))

    def start_worker(self) -> None:
        cmd = [sys.executable, "-m", "client.worker", str(self.spec_file), "--watch-pid", str(os.getpid())]
        self.worker = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        self.worker_started = time.monotonic()
        self.write_status()

    def write_status(self) -> None:
        supernode = self.supernode.pid if self.supernode and self.supernode.poll() is None else None
        status = {"time": time.time(), "supervisor_pid": os.getpid(), "site": self.spec["site"],
                  "mode": "warm" if self.warm else "cold", "supernode_pid": supernode,
                  "worker_pid": self.worker.pid if self.worker and self.worker.poll() is None else None,
                  "worker_restarts": self.restarts, **self.link.status()}
        tmp = self.runtime_dir / f".{STATUS_FILE}.{os.getpid()}"
        tmp.write_text(json.dumps(status))
        os.replace(tmp, self.runtime_dir / STATUS_FILE)

    def on_signal(self, signum, _frame) -> None:
        """Stop: the SuperNode gets SIGTERM from us only if it has not stopped within a grace period.

        A signal sent to the whole process group (a terminal's Ctrl-C, ``kill -- -PGID``) reaches
        the SuperNode too; Flower's handler exits on the first signal and restores the default
        action, so forwarding a second one at once would kill it mid-shutdown (exit 143).
        """
        if not self.stopping:
            self.stopping = True
            self.stop_asked = time.monotonic()

    def forward_stop(self) -> None:
        """The SuperNode still runs ``FORWARD_GRACE`` seconds after our signal and has not logged its graceful
        exit: it was not told; tell it."""
        if self.forwarded or time.monotonic() - self.stop_asked < FORWARD_GRACE:
            return
        self.forwarded = True
        node = self.supernode
        if node is not None and node.poll() is None and not node.shutting_down:
            node.signal(signal.SIGTERM)

    def stop(self, timeout: float = 20.0) -> None:
        self.stopping = True
        if self.worker is not None and self.worker.poll() is None:
            self.worker.terminate()
            try:
                self.worker.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.worker.kill()
                self.worker.wait(timeout=10)
        if self.supernode is not None:
            self.supernode.end(timeout)

    # -- the SuperNode and the connection --------------------------------------------------------------
    def read_events(self) -> None:
        """Connection events from the current SuperNode's log; lines of a replaced one change nothing."""
        while True:
            try:
                generation, event = self.events.get_nowait()
            except queue.Empty:
                return
            if generation != self.generation:
                continue
            if event == "gave-up" and self.supernode is not None:
                self.replace_supernode(f"the SuperNode (pid {self.supernode.pid}) gave up reconnecting")
                continue
            line = self.link.on_event(event)
            if line:
                log(line)

    def check_supernode(self) -> None:
        """Replace a SuperNode that ended on its own or hangs; start the next one when its delay is over."""
        node = self.supernode
        if node is None:
            if time.monotonic() >= self.restart_at:
                self.start_supernode()
            return
        if node.poll() is not None:
            time.sleep(0.3)  # a SIGTERM to the whole group reaches us too: let its handler run first
            if not self.stopping:
                self.read_events()  # its last lines first: a 'gave up' among them has already replaced it
                if self.supernode is node:
                    self.replace_supernode(node.exit_reason())
        elif node.answered and not node.announced:
            node.announced = True
            self.link.supernode_up()
        elif node.hung():
            self.replace_supernode(f"the SuperNode (pid {node.pid}) has not answered on its Runtime API "
                                   f"({node.url}) for {node.unanswered_for():.0f}s; killed it", kill=True)

    def replace_supernode(self, why: str, *, kill: bool = False) -> None:
        if self.supernode is not None:
            self.supernode.end(10.0, kill=kill)
        self.supernode = None
        line, delay = self.link.supernode_ended(why)
        log(line)
        self.restart_at = time.monotonic() + delay

    def give_up(self) -> int:
        """No connection for --connect-timeout: stop everything and exit non-zero with one line."""
        print(f"{PROG}: error: {self.link.give_up_line()}", file=sys.stderr, flush=True)
        self.stop()
        self.cleanup()
        return EXIT_DISCONNECTED

    # -- main loop -------------------------------------------------------------------------------------
    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.on_signal)
        signal.signal(signal.SIGINT, self.on_signal)
        self.start_supernode()
        last_status = 0.0
        while True:
            if self.stopping:
                code = self.supernode.poll() if self.supernode is not None else 0
                if code is not None:
                    self.stop()
                    self.cleanup()
                    return code if code >= 0 else 128 - code
                self.forward_stop()
                time.sleep(0.2)
                continue
            self.read_events()
            self.check_supernode()
            if self.stopping:
                continue
            if self.link.over_limit():
                return self.give_up()
            self.check_worker()
            line = self.link.status_line()
            if line:
                log(line)
            if time.monotonic() - last_status >= 1.0:
                self.write_status()
                last_status = time.monotonic()
            time.sleep(0.2)

    def check_worker(self) -> None:
        """Start the worker when it is due and the Runtime API is up; handle its exit."""
        if not self.warm:
            return
        if self.worker is not None and self.worker.poll() is not None:
            time.sleep(0.3)  # a SIGTERM to the whole group reaches us too: let its handler run first
            if not self.stopping:
                self.worker_exited()
            return
        if self.worker is None and time.monotonic() >= self.worker_due and self.supernode is not None \
                and self.supernode.poll() is None and port_open(self.spec["runtime_address"]):
            self.start_worker()

    def worker_exited(self) -> None:
        """Schedule the next worker: at once after an upgrade, with a growing delay when it keeps dying early."""
        code, pid, lived = self.worker.returncode, self.worker.pid, time.monotonic() - self.worker_started
        self.worker = None
        if code == EXIT_UPGRADED:
            self.accept_upgraded_bundle()
            self.worker_due = 0.0
            return
        log(f"site worker pid {pid} exited with code {code} after {lived:.0f}s; starting a new one")
        worker_exits.answer_for_dead_worker(self.spec, self.task_file, code, log)
        self.crash_delay = min(30.0, max(1.0, self.crash_delay * 2)) if lived < 15 else 0.0
        self.worker_due = time.monotonic() + self.crash_delay
        self.restarts += 1

    def accept_upgraded_bundle(self) -> None:
        worker_exits.accept_upgraded_bundle(self.spec_file, self.spec, log)

    def cleanup(self) -> None:
        for path in (self.task_file, Path(self.spec.get("secret_file", "")), self.spec_file,
                     self.runtime_dir / STATUS_FILE):
            if path and path.name:
                path.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return Supervisor(Path(argv[0])).run()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
