"""The NEARL site worker: one long-lived process that answers every message of every run.

``nearl-client`` (warm, the default) starts its SuperNode with ``--isolation process``:
the SuperNode then launches nothing itself and waits for an executor to claim each
ClientApp task from its Runtime API (loopback, signed with a shared secret).  This worker
is that executor.  For each task it pulls the message, the run's context and the app
bundle (FAB), checks that the bundle is one the site accepts (:mod:`client.fab_check`),
and answers with the site's *installed* handlers (:func:`client.task.train_reply` /
:func:`client.task.evaluate_reply`); code inside the bundle never runs.  Module-level
caches survive between messages: the frozen backbone, the site index, the DP ledger's
files on disk.  Heartbeats keep each task alive while it runs, as Flower's own
``flwr-clientapp`` does.  After the reply to a run's last evaluate message has been pushed
and its task closed, the worker writes the site's verdict on that run
(:mod:`client.site_report`): its local-only training never delays a reply.

While a task runs, its token and the message header sit in a 0600 file so that the
supervisor (:mod:`client.supervisor`) can answer the message with an error reply if
this process dies.  The worker exits when the supervisor exits.  It outlives its
SuperNode: when the supervisor replaces a SuperNode (the coordinator came back, the old
one died or hung), the new one serves the same Runtime API address and secret, and the
worker goes on with it, its backbone still built.

Flower internals used here live in :mod:`client.flower_internals`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from client import flower_internals as fi
from client.fab_check import FabPolicy, installation_stamp
from client.gate import PolicyGate
from client.site_state import write_worker_state

PROG = "nearl-worker"
EXIT_UPGRADED = 75  # the installed NEARL code changed: the supervisor starts a worker on the new code
UPGRADE_CHECK_SECONDS = 5.0  # how often an idle worker looks at its installation


def log(line: str) -> None:
    print(f"{PROG}[{os.getpid()}]: {line}", flush=True)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, exited but not yet reaped, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rfind(")") + 2] != "Z"
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True


def watch_pids(pids: list[int], interval: float = 0.5) -> None:
    """Exit this process as soon as one of ``pids`` (the supervisor) is gone."""

    def loop() -> None:
        while True:
            for pid in pids:
                if not pid_alive(pid):
                    log(f"process {pid} (the supervisor) is gone; exiting")
                    os._exit(0)
            time.sleep(interval)

    threading.Thread(target=loop, name="nearl-worker-watch", daemon=True).start()


def write_private_json(path: Path, record: dict[str, Any]) -> None:
    """A file only the site's user may read (a task token, the worker's spec): 0600, replaced atomically."""
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(record, fh)
    os.replace(tmp, path)


class Worker:
    def __init__(self, spec: dict[str, Any]):
        self.spec = spec
        self.address = spec["runtime_address"]
        self.site = spec["site"]
        self.policy = FabPolicy(frozenset(spec["accepted_fabs"]))
        self.task_file = Path(spec["task_file"])
        self.poll = float(spec.get("poll_seconds", 0.2))
        secret_file = spec.get("secret_file")
        self.secret = fi.load_secret(secret_file) if secret_file else None
        self.served = 0
        self.app_dir = Path(spec["app_dir"]) if spec.get("app_dir") else None
        self.stamp = installation_stamp(self.app_dir) if self.app_dir else None
        self.checked = time.monotonic()
        self.gate = PolicyGate.from_spec(spec)  # the site's policy (nearl-client --policy), None without one
        self.deferred: list[Any] = []  # site verdict jobs (client.site_report), run after their reply left

    def prewarm(self) -> None:
        """Build the backbone and index the site before the first message (both are cached)."""
        from dataclasses import replace

        from client.task import cached_backbone, cached_site
        from nearl_core.config import load_config
        from nearl_core.data import infer_classes
        from nearl_core.flags import DEFAULT_CONFIG
        from nearl_core.fingerprint import backbone_fingerprint

        t0 = time.perf_counter()
        cfg = load_config(self.spec["config"] or DEFAULT_CONFIG)
        if not self.spec["config"]:  # no --config: the folders' classes, which the coordinator's usually are
            cfg = cfg.with_classes(infer_classes(Path(self.spec["data"])))
        model_cfg = replace(cfg.model, pretrained=self.spec["pretrained"]) if self.spec.get("pretrained") else cfg.model
        backbone = cached_backbone(model_cfg)
        log(f"site {self.site}: backbone fingerprint {backbone_fingerprint(backbone.clip, backbone.name, backbone.source)}")
        cached_site(Path(self.spec["data"]), cfg.task.classes)
        import torch

        threads = torch.get_num_threads()
        log(f"site {self.site}: backbone and site index ready in {time.perf_counter() - t0:.1f}s; "
            f"{threads} CPU thread{'s' if threads != 1 else ''} (nearl-client --threads)")
        self.note_state(warm=True, ready_seconds=round(time.perf_counter() - t0, 1))

    def note_state(self, **fields: Any) -> None:
        """What the site's console shows of this worker (``runtime/worker.json``); never fails a message."""
        try:
            write_worker_state(self.task_file.parent, site=self.site, served=self.served, **fields)
        except OSError as err:
            log(f"cannot write the worker's state file ({err})")

    def run(self) -> None:
        client = fi.executor_client(self.address, self.secret)
        failing_since = None
        while True:
            try:
                task = fi.acquire_clientapp_task(client)
            except Exception as err:  # the SuperNode restarting, or not up yet  # noqa: BLE001
                if failing_since is None:
                    failing_since = time.monotonic()
                    log(f"Runtime API at {self.address} not answering ({type(err).__name__}: {err}); retrying")
                time.sleep(max(self.poll, 1.0))
                continue
            if failing_since is not None:
                log(f"Runtime API at {self.address} answering again after {time.monotonic() - failing_since:.0f}s")
                failing_since = None
            if task is None:
                self.exit_if_upgraded()
                time.sleep(self.poll)
                continue
            self.serve(*task)
            self.run_deferred()

    def run_deferred(self) -> None:
        """The site verdicts of runs that just ended: their replies are already with the coordinator."""
        if self.deferred:
            from client.site_report import run_deferred

            run_deferred(self.deferred, lambda line: log(f"[{self.site}] {line}"))

    def exit_if_upgraded(self) -> None:
        """Between messages: when the site has upgraded its installed NEARL, exit so that new code answers."""
        if self.app_dir is None or time.monotonic() - self.checked < UPGRADE_CHECK_SECONDS:
            return
        self.checked = time.monotonic()
        if installation_stamp(self.app_dir) != self.stamp:
            log(f"site {self.site}: the installed NEARL code in {self.app_dir} changed; exiting so that a worker "
                "on the new code answers the next message")
            sys.exit(EXIT_UPGRADED)

    def serve(self, token: str, task_id: int, run_id: int) -> None:
        client = fi.task_client(self.address, token)
        beat = context = None
        try:
            beat = fi.heartbeat(client)
            task = fi.pull_task_input(client)
            context = task.context
            msg = task.message
            write_private_json(self.task_file, {"round": _server_round(msg),
                "token": token, "task_id": task_id, "run_id": run_id, "node_id": int(context.node_id),
                "header": fi.message_header(msg), "message_type": msg.metadata.message_type,
                "group_id": msg.metadata.group_id, "phase": "running", "pid": os.getpid(), "site": self.site})
            reply, ok, details = self.answer(task)
            fi.push_reply(client, reply, context)
            self._phase("replied")
            fi.finish_task(client, context, ok=ok, details=details)
            self.served += 1
            self.note_state(last={"time": time.time(), "run_id": run_id, "round": _server_round(msg),
                                  "message_type": msg.metadata.message_type,
                                  "answer": reply.error.reason.removeprefix(f"{self.site}: ")
                                  if reply.has_error() else "replied"})
        except Exception as err:  # noqa: BLE001 - a failed task must not end the worker
            log(f"task {task_id} of run {run_id} failed: {type(err).__name__}: {err}")
            try:
                fi.finish_task(client, context, ok=False, details=f"{type(err).__name__}: {err}"[:500])
            except Exception:  # noqa: BLE001
                pass
        finally:
            fi.stop_heartbeat(beat)
            client.close()
            self.task_file.unlink(missing_ok=True)

    def _phase(self, phase: str) -> None:
        try:
            record = json.loads(self.task_file.read_text())
        except (OSError, ValueError):
            return
        record["phase"] = phase
        write_private_json(self.task_file, record)

    def answer(self, task: fi.TaskInput) -> tuple[Any, bool, str]:
        """(reply, task succeeded, details): the site's own handler, or a refusal."""
        from client import audit
        from client.binding import site_binding
        from client.secagg import stage_reply
        from client.task import evaluate_reply, train_reply
        from nearl_protocol.keys import SECAGG_MESSAGE_TYPE
        from nearl_protocol.messages import refusal

        msg, context = task.message, task.context
        try:
            binding = site_binding(context.node_config)
            problem = self.policy.problem(task.fab_content, task.fab_hash)
            kind = msg.metadata.message_type
            if problem is None and kind not in ("train", "evaluate", SECAGG_MESSAGE_TYPE):
                problem = (f"message type {kind!r} is not served by this site (train, evaluate and "
                           f"{SECAGG_MESSAGE_TYPE} only)")
            if problem is not None:
                log(f"[{self.site}] run {msg.metadata.run_id} refused: {problem} "
                    f"(app {task.fab_id or '-'} {task.fab_version or ''})")
            elif self.gate is not None and (problem := self.gate.problem(msg)) is not None:  # before any data
                log(f"[{self.site}] run {msg.metadata.run_id} round {_server_round(msg) or '?'} {kind} refused: "
                    f"{problem}")
            if problem is not None:
                reply = refusal(msg, problem, site=self.site)
                audit.append(binding.audit_file(), audit.audit_line(
                    msg, reply, site=binding.site, coordinator=binding.coordinator,
                    server_round=_server_round(msg), eps_before=None, eps_after=None))
                return reply, True, ""
            handler = {"train": train_reply, SECAGG_MESSAGE_TYPE: stage_reply}.get(kind, evaluate_reply)
            return handler(msg, context), True, ""
        except Exception as err:  # noqa: BLE001 - what Flower's ClientApp process does with an exception
            log(f"[{self.site}] message failed: {type(err).__name__}: {err}")
            return fi.raised_error_reply(msg, err), False, f"{type(err).__name__}: {err}"[:500]


def _server_round(msg: Any) -> int | None:
    """The round an instruction belongs to (its ``server-round``), None when it has none."""
    from nearl_protocol.messages import read_instruction

    try:
        return read_instruction(msg).server_round
    except Exception:  # noqa: BLE001 - a secure-aggregation stage, or a foreign app's message (refused anyway)
        pass
    try:
        from nearl_protocol import keys

        return int(msg.content.config_records[keys.SECAGG][keys.SERVER_ROUND])
    except Exception:  # noqa: BLE001
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description="NEARL site worker (started by nearl-client)")
    p.add_argument("spec", type=Path, help="the JSON spec nearl-client wrote")
    p.add_argument("--watch-pid", type=int, action="append", default=[], help="exit when this process exits")
    args = p.parse_args(argv)
    spec = json.loads(args.spec.read_text())
    watch_pids(args.watch_pid)
    worker = Worker(spec)
    from client import site_report

    site_report.use_runner(worker.deferred.append)
    log(f"site {spec['site']}: warm worker on the SuperNode's Runtime API {spec['runtime_address']}; runs only "
        f"this site's installed NEARL code; accepts app bundle(s) "
        f"{', '.join(h[:12] for h in sorted(spec['accepted_fabs'])) or 'none'}")
    if spec.get("prewarm", True):
        try:
            worker.prewarm()
        except Exception as err:  # noqa: BLE001 - the first message builds it instead
            log(f"prewarm failed ({type(err).__name__}: {err}); the first message builds the backbone")
    worker.run()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
