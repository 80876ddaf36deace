"""``nearl-client health --state-dir DIR``: is the site running, and is it connected to its coordinator?

The site's supervisor (:mod:`client.supervisor`) rewrites ``DIR/runtime/status.json`` every
second: its own pid, the SuperNode's and (warm sites) the worker's, and where the
connection stands (:meth:`client.connection.Connection.status`).  A site is unhealthy when
that file is missing or stale, when one of its processes is gone, or when it has been
without its coordinator for longer than ``--max-offline`` (by default the site's own
``--connect-timeout``, or 180 s for a site that reconnects without a limit).  Within that
time a site that is reconnecting is healthy: it is doing what it should, and its report
says so.  deploy/docker/healthcheck.py applies the same :func:`problems` for containers.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

PROG = "nearl-client health"
DEFAULT_MAX_AGE = 15.0  # seconds the supervisor's status may be old
DEFAULT_MAX_OFFLINE = 180.0  # seconds offline before a site without a --connect-timeout is reported unhealthy


def status_path(state_dir: Path) -> Path:
    return state_dir.expanduser() / "runtime" / "status.json"


def read_status(path: Path) -> tuple[dict[str, Any] | None, str]:
    """The status and '' , or None and why it cannot be read."""
    try:
        return json.loads(path.read_text()), ""
    except (OSError, ValueError) as err:
        return None, f"no status at {path} ({type(err).__name__})"


def offline_for(status: dict[str, Any], now: float) -> float:
    since = status.get("offline_since")
    return 0.0 if status.get("connection", "connected") == "connected" or since is None else now - float(since)


def allowed_offline(status: dict[str, Any], max_offline: float | None) -> float:
    if max_offline is not None:
        return max_offline
    return float(status.get("connect_timeout") or DEFAULT_MAX_OFFLINE)


def problems(status: dict[str, Any], now: float, *, max_age: float = DEFAULT_MAX_AGE,
             max_offline: float | None = None) -> list[str]:
    """Why the site is unhealthy (empty: healthy)."""
    from client.worker import pid_alive

    found = []
    age = now - float(status.get("time", 0))
    if age > max_age:
        found.append(f"status {age:.0f}s old")
    reconnecting = status.get("connection", "connected") != "connected"
    watched = ["supervisor_pid", "supernode_pid"] + (["worker_pid"] if status.get("mode", "warm") == "warm" else [])
    for what in watched:
        pid = status.get(what)
        if what == "supernode_pid" and not pid and reconnecting:
            continue  # between two SuperNodes: the supervisor starts the next one
        if not pid or not pid_alive(int(pid)):
            found.append(f"{what.removesuffix('_pid')} not running")
    offline, allowed = offline_for(status, now), allowed_offline(status, max_offline)
    if offline > allowed:
        found.append(f"no connection to the coordinator at {status.get('coordinator', '?')} for {offline:.0f}s "
                     f"(more than {allowed:g}s)")
    return found


def connection_text(status: dict[str, Any], now: float) -> str:
    state, where = status.get("connection"), status.get("coordinator", "?")
    if state is None:
        return ""
    if state == "connected":
        return f"; connected to {where}"
    limit = status.get("connect_timeout")
    bound = f"limit {limit:g}s" if limit else "no limit"
    doing = "connecting to" if state == "connecting" else "reconnecting to"
    return f"; {doing} {where} for {offline_for(status, now):.0f}s ({bound})"


def summary(status: dict[str, Any], now: float) -> str:
    """The healthy line (its start is what deploy/docker/healthcheck.py and older tools read)."""
    n = status.get("supernode_restarts")
    restarts = f"{n} SuperNode restart{'s' if n != 1 else ''}" if n is not None else ""
    if status.get("mode", "warm") == "warm":
        head = (f"healthy: site {status.get('site')} worker pid {status['worker_pid']} "
                f"({status.get('worker_restarts', 0)} restarts)")
    else:
        head = f"healthy: site {status.get('site')} (cold) SuperNode pid {status.get('supernode_pid')}"
    return head + connection_text(status, now) + (f"; {restarts}" if restarts else "")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog=PROG, description="Health check of a site (container probe).")
    p.add_argument("--state-dir", type=Path, required=True, help="the site's state dir (as given to nearl-client)")
    p.add_argument("--max-age", type=float, default=DEFAULT_MAX_AGE, help="seconds the supervisor's status may be old")
    p.add_argument("--max-offline", type=float, default=None, metavar="S",
                   help="seconds without the coordinator before the site counts as unhealthy (default: the site's "
                        f"--connect-timeout, or {DEFAULT_MAX_OFFLINE:g} when it has none)")
    args = p.parse_args(argv)
    status, why = read_status(status_path(args.state_dir))
    if status is None:
        print(f"unhealthy: {why}")
        return 1
    now = time.time()
    found = problems(status, now, max_age=args.max_age, max_offline=args.max_offline)
    if found:
        print(f"unhealthy: {', '.join(found)}")
        return 1
    print(summary(status, now))
    return 0
