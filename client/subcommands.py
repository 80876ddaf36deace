"""``nearl-client audit`` and ``nearl-client health``: reading a site's own records, no federation needed.

``audit`` summarises the site's audit trail (:mod:`client.audit`) per run; ``health`` is
the warm site's container probe (the supervisor's ``status.json``, :mod:`client.supervisor`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

PROG = "nearl-client"


def audit_main(argv: list[str]) -> int:
    """``nearl-client audit --state-dir DIR [--json]``: what this site sent, per run."""
    from client import audit

    p = argparse.ArgumentParser(prog=f"{PROG} audit", description="Summarise a site's audit trail per run.")
    p.add_argument("--state-dir", type=Path, required=True, help="the site's state dir (holds audit.jsonl)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    args = p.parse_args(argv)
    try:
        runs = audit.summarise(audit.read_lines(args.state_dir.expanduser() / "audit.jsonl"))
    except (OSError, ValueError) as err:
        print(f"{PROG} audit: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(runs, indent=2) if args.json else audit.format_summary(runs))
    return 0


def health_main(argv: list[str]) -> int:
    """``nearl-client health --state-dir DIR``: exit 0 when the warm site's supervisor and worker are alive."""
    p = argparse.ArgumentParser(prog=f"{PROG} health", description="Health check of a warm site (container probe).")
    p.add_argument("--state-dir", type=Path, required=True, help="the site's state dir (as given to nearl-client)")
    p.add_argument("--max-age", type=float, default=15.0, help="seconds the supervisor's status may be old")
    args = p.parse_args(argv)
    from client.worker import pid_alive

    path = args.state_dir.expanduser() / "runtime" / "status.json"
    try:
        status = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        print(f"unhealthy: no status at {path} ({type(err).__name__})")
        return 1
    age = time.time() - float(status.get("time", 0))
    problems = []
    if age > args.max_age:
        problems.append(f"status {age:.0f}s old")
    for what in ("supervisor_pid", "supernode_pid", "worker_pid"):
        pid = status.get(what)
        if not pid or not pid_alive(int(pid)):
            problems.append(f"{what.removesuffix('_pid')} not running")
    if problems:
        print(f"unhealthy: {', '.join(problems)}")
        return 1
    print(f"healthy: site {status.get('site')} worker pid {status['worker_pid']} "
          f"({status.get('worker_restarts', 0)} restarts)")
    return 0
