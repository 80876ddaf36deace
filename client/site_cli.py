"""The site operator's commands beside ``nearl-client`` itself: the site's own say and view.

    nearl-client audit      --state-dir DIR [--json]    what this site sent, per run
    nearl-client health     --state-dir DIR             exit 0 while the warm site runs (container probe)
    nearl-client approvals  --state-dir DIR [--all] [--json]   runs waiting for approval (policy: manual)
    nearl-client approve RUN --state-dir DIR            approve the config a waiting run asks for
    nearl-client refuse RUN --reason TEXT --state-dir DIR      refuse a run; the coordinator sees the reason
    nearl-client console    --state-dir DIR [--host 127.0.0.1] [--port 8765]   the site's web console

Each works on the state dir alone, beside a running site or without one.  Errors are one
line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from nearl_core.errors import NearlError

PROG = "nearl-client"


def _state_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", type=Path, required=True,
                   help="the site's state dir (as given to nearl-client; default there ~/.nearl/sites/SITE/state)")


def audit_main(argv: list[str]) -> int:
    """``nearl-client audit --state-dir DIR [--json]``: what this site sent, per run."""
    from client import audit

    p = argparse.ArgumentParser(prog=f"{PROG} audit", description="Summarise a site's audit trail per run.")
    _state_dir(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    args = p.parse_args(argv)
    try:
        runs = audit.summarise(audit.read_lines(args.state_dir.expanduser() / "audit.jsonl"))
    except (OSError, ValueError) as err:
        print(f"{PROG} audit: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(runs, indent=2) if args.json else audit.format_summary(runs))
    return 0


# -- approvals ----------------------------------------------------------------------------------------------
def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def format_run(run: Mapping[str, Any]) -> str:
    """A run as ``approvals`` lists it: who asks, what, and what differs from the last approved config."""
    from client.approvals import flat

    lines = [f"run {run['run_id']} from {run.get('coordinator') or '?'}: {run.get('status') or 'seen'}"
             f"{' - ' + run['reason'] if run.get('reason') else ''}",
             f"  first seen {_when(run.get('first_seen'))}, last message {_when(run.get('last_seen'))}; "
             f"{run.get('refused_messages', 0)} message(s) refused, {run.get('accepted_messages', 0)} answered"]
    if run.get("config_sha256"):
        lines.append(f"  config sha256 {run['config_sha256']} (the coordinator's NEARL config sha256 "
                     f"{(run.get('coordinator_config_sha256') or '?')[:12]})")
        lines.append("  asks for:")
        lines += [f"    {k} = {json.dumps(v)}" for k, v in flat(run.get("asked") or {}).items()]
        diff = run.get("differs_from")
        if diff is None:
            lines.append("  no config approved before at this site: review every key")
        elif not diff["changes"]:
            lines.append(f"  the same config as the last approved one (run {diff['run_id']})")
        else:
            lines.append(f"  differs from the last approved config (run {diff['run_id']}):")
            lines += [f"    {k}: {json.dumps(a)} -> {json.dumps(b)}" for k, a, b in diff["changes"]]
    else:
        lines.append("  config not seen yet (it comes with the run's first train or evaluate instruction)")
    return "\n".join(lines)


def approvals_main(argv: list[str]) -> int:
    """``nearl-client approvals --state-dir DIR``: the runs that wait for this site's approval."""
    from client.approvals import RunBook

    p = argparse.ArgumentParser(prog=f"{PROG} approvals", description="List the runs waiting for approval.")
    _state_dir(p)
    p.add_argument("--all", action="store_true", help="every run the site has seen under its policy")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    args = p.parse_args(argv)
    book = RunBook(args.state_dir.expanduser())
    try:
        runs = book.runs() if args.all else book.pending()
    except NearlError as err:
        print(f"{PROG} approvals: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(runs, indent=2))
    elif not runs:
        print("no run is waiting for approval" if not args.all else "no run seen under a site policy")
    else:
        print("\n\n".join(format_run(r) for r in runs))
    return 0


def decide_main(argv: list[str], decision: str) -> int:
    """``nearl-client approve RUN`` / ``refuse RUN --reason TEXT``: the same functions as the console's buttons."""
    from client.approvals import approve, refuse

    p = argparse.ArgumentParser(prog=f"{PROG} {decision}",
                                description=f"{decision.capitalize()} a run that the coordinator asks this site to join.")
    p.add_argument("run", help="the run id, as nearl-client approvals lists it")
    _state_dir(p)
    if decision == "refuse":
        p.add_argument("--reason", required=True, help="why (one line; the coordinator's log shows it)")
    args = p.parse_args(argv)
    state_dir = args.state_dir.expanduser()
    try:
        run = approve(state_dir, args.run) if decision == "approve" else refuse(state_dir, args.run, args.reason)
    except NearlError as err:
        print(f"{PROG} {decision}: error: {err}", file=sys.stderr)
        return 2
    what = (f"approved config sha256 {run['config_sha256']}: its next round trains" if decision == "approve"
            else f"refused ({run['reason']}): its later messages are answered with this reason")
    print(f"run {run['run_id']}: {what}; recorded in {state_dir / 'audit.jsonl'}")
    return 0


def main(argv: list[str]) -> int:
    command, rest = argv[0], argv[1:]
    if command == "audit":
        return audit_main(rest)
    if command == "health":
        from client import health

        return health.main(rest)
    if command == "approvals":
        return approvals_main(rest)
    if command in ("approve", "refuse"):
        return decide_main(rest, command)
    if command == "console":
        from client.console.serve import console_main

        return console_main(rest)
    raise SystemExit(f"{PROG}: unknown command {command!r}")
