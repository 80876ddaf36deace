"""The site's book of runs: what each coordinator run asked for and what the site said, ``<state-dir>/runs.json``.

The site worker writes it on every message under a policy (:mod:`client.gate`); a person
decides with ``nearl-client approve RUN`` / ``refuse RUN --reason TEXT`` or the console's
buttons, which call :func:`approve` and :func:`refuse` here.  One lock file serialises
the worker and the person; every write replaces the file atomically, so a reader (the
console) never sees half of it.  Each decision is also a line of the audit trail, with
the sha256 of the config it was about.

What a run *asks* (:func:`asked_config`) is the coordinator's resolved NEARL config plus
its local epochs, rounds and transport dtype: everything every instruction of the run
carries.  Approving a run approves that config; a coordinator that later sends another
config in the same run waits for approval again.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import yaml

from client import audit
from nearl_core.errors import NearlError
from nearl_protocol import keys
from nearl_protocol.messages import Instruction

BOOK_FILE = "runs.json"
LOCK_FILE = ".runs.lock"
PENDING, APPROVED, ACCEPTED, REFUSED = "pending", "approved", "accepted", "refused"
MAX_EVENTS = 40  # per run: the latest messages and what the site answered


class ApprovalError(NearlError):
    """A decision that cannot be taken (an unknown run, one that does not wait)."""


# -- what a run asks ----------------------------------------------------------------------------------------
def asked_config(instruction: Instruction) -> dict[str, Any]:
    """The part of an instruction that every message of a run repeats: what the site approves."""
    return {"nearl-config": instruction.nearl_config, keys.LOCAL_EPOCHS: instruction.local_epochs,
            keys.TOTAL_ROUNDS: instruction.total_rounds, keys.TRANSPORT: instruction.transport}


def asked_sha256(asked: Mapping[str, Any]) -> str:
    """The name of an asked config in decisions and the audit trail (canonical JSON, sorted keys)."""
    return hashlib.sha256(json.dumps(asked, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def coordinator_sha256(nearl_config: Mapping[str, Any]) -> str:
    """The sha256 the coordinator prints on its start line for the same NEARL config (``config sha256``)."""
    return hashlib.sha256(yaml.safe_dump(dict(nearl_config), sort_keys=False).encode()).hexdigest()


def flat(asked: Mapping[str, Any]) -> dict[str, Any]:
    """``section.key`` -> value for the NEARL config, the run's own keys as they are (for lists and diffs)."""
    out = {k: v for k, v in asked.items() if k != "nearl-config"}
    for section, values in (asked.get("nearl-config") or {}).items():
        if isinstance(values, Mapping):
            out.update({f"{section}.{k}": v for k, v in values.items()})
        else:
            out[section] = values
    return dict(sorted(out.items()))


def differences(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, old value, new value) for every key that differs; old None: nothing was approved before."""
    if old is None:
        return []
    a, b = flat(old), flat(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


# -- the book ---------------------------------------------------------------------------------------------
class RunBook:
    """``runs.json`` of one state dir; every change under the lock, written atomically."""

    def __init__(self, state_dir: Path):
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / BOOK_FILE

    def read(self) -> dict[str, Any]:
        """The whole book (empty when the site has seen no run under a policy)."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"runs": {}, "last_approved": None}
        except (OSError, ValueError) as err:
            raise NearlError(f"{self.path}: unreadable run book ({err}); restore it or move it aside") from None
        data.setdefault("runs", {})
        data.setdefault("last_approved", None)
        return data

    @contextmanager
    def changing(self) -> Iterator[dict[str, Any]]:
        """The book to change in place; written back when the block ends without an error."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / LOCK_FILE, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = self.read()
            yield data
            tmp = self.path.with_name(f".{BOOK_FILE}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
            os.replace(tmp, self.path)

    def get(self, run_id: int | str) -> dict[str, Any] | None:
        return self.read()["runs"].get(str(run_id))

    def runs(self) -> list[dict[str, Any]]:
        """Every run, the latest seen first."""
        return sorted(self.read()["runs"].values(), key=lambda r: r.get("last_seen") or 0, reverse=True)

    def pending(self) -> list[dict[str, Any]]:
        return [r for r in self.runs() if r.get("status") == PENDING]

    def note(self, run_id: int, *, site: str, coordinator: str, server_round: int | None, kind: str,
             asked: Mapping[str, Any] | None, status: str | None, reason: str | None, by: str | None) -> dict:
        """One message of a run and what the site answered (``reason``: why it refused, None: it went on);
        ``status`` None keeps the run's status."""
        now = time.time()
        with self.changing() as data:
            run = data["runs"].setdefault(str(run_id), {
                "run_id": str(run_id), "site": site, "coordinator": coordinator, "first_seen": now,
                "status": None, "reason": None, "by": None, "approved": [], "asked": None, "config_sha256": None,
                "accepted_messages": 0, "refused_messages": 0, "events": []})
            run.update(last_seen=now, coordinator=coordinator or run.get("coordinator"), site=site)
            if asked is not None:
                sha = asked_sha256(asked)
                if sha != run.get("config_sha256"):
                    run.update(asked=dict(asked), config_sha256=sha,
                               coordinator_config_sha256=coordinator_sha256(asked.get("nearl-config") or {}),
                               differs_from=_diff_from(data.get("last_approved"), asked))
            if status is not None:
                run.update(status=status, reason=reason, by=by)
            run["refused_messages" if reason else "accepted_messages"] += 1
            run["events"] = (run["events"] + [{"time": now, "round": server_round, "kind": kind,
                                                "answer": reason or "accepted"}])[-MAX_EVENTS:]
            return dict(run)


def _diff_from(last: Mapping[str, Any] | None, asked: Mapping[str, Any]) -> dict[str, Any] | None:
    """What an asked config changes from the last one the site approved (None: none approved yet)."""
    if not last:
        return None
    return {"run_id": last.get("run_id"), "config_sha256": last.get("config_sha256"),
            "changes": [[k, a, b] for k, a, b in differences(last.get("asked"), asked)]}


# -- decisions ----------------------------------------------------------------------------------------------
def _decision_line(run: Mapping[str, Any], decision: str, reason: str | None, by: str) -> dict[str, Any]:
    rid = run["run_id"]
    return {"time": time.time(), "run_id": int(rid) if str(rid).isdigit() else rid, "site": run.get("site"),
            "coordinator": run.get("coordinator"), "decision": decision, "config_sha256": run.get("config_sha256"),
            "reason": reason, "by": by}


def _known_run(data: dict[str, Any], run_id: str, listing: str) -> dict[str, Any]:
    """The run book's entry of ``run_id``, or the one-line error that says how to list the runs."""
    run = data["runs"].get(str(run_id))
    if run is None:
        raise ApprovalError(f"run {run_id} is unknown at this site; list {listing}")
    return run


def approve(state_dir: Path, run_id: str, *, by: str = "nearl-client approve") -> dict[str, Any]:
    """Approve the config a waiting run asks for: its next message trains.  Audited with the config's sha256."""
    book = RunBook(state_dir)
    with book.changing() as data:
        run = _known_run(data, run_id, f"the waiting runs with nearl-client approvals --state-dir {state_dir}")
        if run.get("status") != PENDING or not run.get("config_sha256"):
            raise ApprovalError(f"run {run_id} is not waiting for approval (it is {run.get('status')}); "
                                "nothing to approve")
        run.update(status=APPROVED, reason=None, by="operator", decided=time.time(),
                   approved=sorted({*run.get("approved", []), run["config_sha256"]}))
        data["last_approved"] = {"run_id": run["run_id"], "asked": run["asked"],
                                 "config_sha256": run["config_sha256"], "time": run["decided"]}
        audit.append(book.state_dir / "audit.jsonl", _decision_line(run, APPROVED, None, by))
        return dict(run)


def refuse(state_dir: Path, run_id: str, reason: str, *, by: str = "nearl-client refuse") -> dict[str, Any]:
    """Refuse a run for good: every later message of it is answered with the reason.  Audited."""
    reason = " ".join(str(reason).split())[:300]
    if not reason:
        raise ApprovalError("give the reason for refusing the run: --reason TEXT (the coordinator sees it)")
    book = RunBook(state_dir)
    with book.changing() as data:
        run = _known_run(data, run_id, f"the runs with nearl-client approvals --all --state-dir {state_dir}")
        run.update(status=REFUSED, reason=f"{keys.REFUSED_BY_SITE}: {reason}", by="operator", decided=time.time())
        audit.append(book.state_dir / "audit.jsonl", _decision_line(run, REFUSED, reason, by))
        return dict(run)
