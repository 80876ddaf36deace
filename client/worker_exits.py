"""What a warm site's supervisor does when its worker exits: answer the message it held, or accept an upgrade.

A worker that dies while it holds a message would leave that message unanswered until
Flower's task heartbeat expires (about 60 s): :func:`answer_for_dead_worker` answers it at
once with an error reply for this site and records it in the audit trail.  A worker that
exits because the installed NEARL code changed (``EXIT_UPGRADED``) is replaced by one on the
new code, and :func:`accept_upgraded_bundle` makes the site accept the new installation's
app bundle in place of the old one's.  Neither imports torch (the supervisor stays small).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from client.worker import write_private_json

Log = Callable[[str], None]


def answer_for_dead_worker(spec: dict[str, Any], task_file: Path, code: int | None, log: Log) -> None:
    """Answer the message the dead worker held (if any) with an error reply, and audit it."""
    try:
        record = json.loads(task_file.read_text())
    except (OSError, ValueError):
        return  # it held no task
    finally:
        task_file.unlink(missing_ok=True)
    site = spec["site"]
    reason = f"the site worker died while running this {record.get('message_type', '')} message (exit {code})"
    try:
        from client import audit
        from client import flower_internals as fi
        from nearl_protocol.messages import refusal

        msg = fi.message_from_header(record["header"])
        reply = None if record.get("phase") == "replied" else refusal(msg, reason, site=site)
        fi.answer_for_dead_worker(spec["runtime_address"], record["token"], reply,
                                  int(record["node_id"]), int(record["run_id"]))
        if reply is None:
            return
        log(f"[{site}] round {record.get('round') or '?'} failed: {reason}")
        audit.append(Path(spec["state_dir"]) / "audit.jsonl", audit.audit_line(
            msg, reply, site=site, coordinator=spec.get("coordinator", ""),
            server_round=_round(record.get("round")), eps_before=None, eps_after=None))
    except Exception as err:  # noqa: BLE001 - Flower's heartbeat expiry still fails the message (~60 s)
        log(f"could not answer the dead worker's message ({type(err).__name__}: {err}); "
            "the SuperNode fails it when its task heartbeat expires")


def accept_upgraded_bundle(spec_file: Path, spec: dict[str, Any], log: Log) -> None:
    """The site upgraded NEARL: accept the bundle of the new installation in place of the old one's."""
    from client.fab_check import own_fab_hash

    old = spec.get("own_fab")
    try:
        new = own_fab_hash(Path(spec["app_dir"]))
    except Exception as err:  # noqa: BLE001 - keep what was accepted; the new worker logs the refusals
        log(f"the installed NEARL code changed but its app bundle cannot be built ({err}); "
            "still accepting the previous bundle(s)")
        return
    extra = [h for h in spec["accepted_fabs"] if h != old]
    spec["accepted_fabs"] = sorted({*extra, *([new] if new else [])})
    spec["own_fab"] = new
    write_private_json(spec_file, spec)
    log(f"the installed NEARL code changed: starting a worker on it; this installation's app bundle sha256 {new}")


def _round(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
