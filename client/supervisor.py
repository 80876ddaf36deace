"""What ``nearl-client`` becomes on a warm site: the parent of the SuperNode and of the site worker.

It starts the SuperNode (process isolation, Runtime API on loopback with a shared secret),
then the site worker (:mod:`client.worker`) once the Runtime API is up, and watches both:

* the SuperNode exits -> the worker is stopped and this process exits with the SuperNode's code;
* the worker dies -> the message it was running is answered with an error reply for this site
  (``<site>: the site worker died ...``), recorded in the site's log and audit trail, and a new
  worker is started (with a growing delay when it keeps dying at start-up); the next message
  is served by the new worker;
* SIGTERM/SIGINT -> both are stopped; the exit code is the SuperNode's.

It imports no torch: it stays small while the worker holds the model.  Every second it
writes ``status.json`` next to the spec (pids, restarts, whether the coordinator's port
answers), read by ``nearl-client health`` and the site's console.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from client.worker import EXIT_UPGRADED, write_private_json

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
        self.task_file = Path(self.spec["task_file"])
        self.supernode: subprocess.Popen | None = None
        self.worker: subprocess.Popen | None = None
        self.worker_started = 0.0
        self.restarts = 0
        self.stopping = False
        self.stop_asked = 0.0
        self.forwarded = False
        self.crash_delay = 0.0
        self.reachable: bool | None = None  # the coordinator's port answered at the last look

    # -- processes -------------------------------------------------------------------------------------
    def start_supernode(self) -> None:
        self.supernode = subprocess.Popen(self.spec["supernode_cmd"], stdin=subprocess.DEVNULL)

    def start_worker(self) -> None:
        cmd = [sys.executable, "-m", "client.worker", str(self.spec_file), "--watch-pid", str(os.getpid()),
               "--watch-pid", str(self.supernode.pid)]
        self.worker = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        self.worker_started = time.monotonic()
        self.write_status()

    def write_status(self) -> None:
        status = {"time": time.time(), "supervisor_pid": os.getpid(), "site": self.spec["site"],
                  "supernode_pid": self.supernode.pid if self.supernode else None,
                  "worker_pid": self.worker.pid if self.worker and self.worker.poll() is None else None,
                  "worker_restarts": self.restarts, "coordinator": self.spec.get("coordinator"),
                  "coordinator_reachable": self.reachable}
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
        """The SuperNode still runs ``FORWARD_GRACE`` seconds after our signal: it was not told; tell it."""
        if self.forwarded or time.monotonic() - self.stop_asked < FORWARD_GRACE:
            return
        self.forwarded = True
        if self.supernode is not None and self.supernode.poll() is None:
            try:
                self.supernode.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 20.0) -> None:
        self.stopping = True
        for proc in (self.worker, self.supernode):
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    # -- a dead worker's message -----------------------------------------------------------------------
    def answer_for_dead_worker(self, code: int | None) -> None:
        """Answer the message the dead worker held (if any) with an error reply, and audit it."""
        try:
            record = json.loads(self.task_file.read_text())
        except (OSError, ValueError):
            return  # it held no task
        finally:
            self.task_file.unlink(missing_ok=True)
        site = self.spec["site"]
        reason = f"the site worker died while running this {record.get('message_type', '')} message (exit {code})"
        try:
            from client import audit
            from client import flower_internals as fi
            from nearl_protocol.messages import refusal

            msg = fi.message_from_header(record["header"])
            reply = None if record.get("phase") == "replied" else refusal(msg, reason, site=site)
            fi.answer_for_dead_worker(self.spec["runtime_address"], record["token"], reply,
                                      int(record["node_id"]), int(record["run_id"]))
            if reply is None:
                return
            log(f"[{site}] round {record.get('round') or '?'} failed: {reason}")
            audit.append(Path(self.spec["state_dir"]) / "audit.jsonl", audit.audit_line(
                msg, reply, site=site, coordinator=self.spec.get("coordinator", ""),
                server_round=_round(record.get("round")), eps_before=None, eps_after=None))
        except Exception as err:  # noqa: BLE001 - Flower's heartbeat expiry still fails the message (~60 s)
            log(f"could not answer the dead worker's message ({type(err).__name__}: {err}); "
                "the SuperNode fails it when its task heartbeat expires")

    def watch_coordinator(self, interval: float = 30.0) -> None:
        """Look at the coordinator's port now and then (a thread: a slow DNS answer must not stall the loop);
        the console shows whether this site can reach it.  Seldom: each look is a TCP connection there."""
        import threading

        address = self.spec.get("coordinator")
        if not address:
            return

        def loop() -> None:
            while not self.stopping:
                self.reachable = port_open(address)
                time.sleep(interval)

        threading.Thread(target=loop, name="nearl-coordinator-watch", daemon=True).start()

    # -- main loop -------------------------------------------------------------------------------------
    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.on_signal)
        signal.signal(signal.SIGINT, self.on_signal)
        self.start_supernode()
        self.watch_coordinator()
        address = self.spec["runtime_address"]
        while not self.stopping and self.supernode.poll() is None and not port_open(address):
            time.sleep(0.2)
        if not self.stopping and self.supernode.poll() is None:
            self.start_worker()
        last_status = time.monotonic()
        while True:
            code = self.supernode.poll()
            if code is not None:
                if not self.stopping:
                    log(f"the SuperNode exited with code {code}; stopping the site worker")
                self.stop()
                self.cleanup()
                return code if code >= 0 else 128 - code
            if self.stopping:
                self.forward_stop()
                time.sleep(0.2)
                continue
            if self.worker is not None and self.worker.poll() is not None:
                time.sleep(0.3)  # a SIGTERM to the whole group reaches us too: let its handler run first
                if self.stopping or self.supernode.poll() is not None:
                    continue
                self.restart_worker()
            if time.monotonic() - last_status >= 1.0:
                self.write_status()
                last_status = time.monotonic()
            time.sleep(0.2)

    def restart_worker(self) -> None:
        code = self.worker.returncode
        lived = time.monotonic() - self.worker_started
        if code == EXIT_UPGRADED:
            self.accept_upgraded_bundle()
            self.start_worker()
            return
        log(f"site worker pid {self.worker.pid} exited with code {code} after {lived:.0f}s; starting a new one")
        self.answer_for_dead_worker(code)
        self.crash_delay = min(30.0, max(1.0, self.crash_delay * 2)) if lived < 15 else 0.0
        deadline = time.monotonic() + self.crash_delay
        while time.monotonic() < deadline and not self.stopping:
            time.sleep(0.2)
        if not self.stopping:
            self.restarts += 1
            self.start_worker()

    def accept_upgraded_bundle(self) -> None:
        """The site upgraded NEARL: accept the bundle of the new installation in place of the old one's."""
        from client.fab_check import own_fab_hash

        old = self.spec.get("own_fab")
        try:
            new = own_fab_hash(Path(self.spec["app_dir"]))
        except Exception as err:  # noqa: BLE001 - keep what was accepted; the new worker logs the refusals
            log(f"the installed NEARL code changed but its app bundle cannot be built ({err}); "
                "still accepting the previous bundle(s)")
            return
        extra = [h for h in self.spec["accepted_fabs"] if h != old]
        self.spec["accepted_fabs"] = sorted({*extra, *([new] if new else [])})
        self.spec["own_fab"] = new
        write_private_json(self.spec_file, self.spec)
        log(f"the installed NEARL code changed: starting a worker on it; this installation's app bundle sha256 {new}")

    def cleanup(self) -> None:
        for path in (self.task_file, Path(self.spec.get("secret_file", "")), self.spec_file,
                     self.runtime_dir / STATUS_FILE):
            if path and path.name:
                path.unlink(missing_ok=True)


def _round(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return Supervisor(Path(argv[0])).run()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
