"""Everything the console shows, read from the site's state dir on each request.

The console holds no state of its own: a page is what the files say now.  Each reader
is forgiving (a missing or half-written file is shown as missing, never a server error),
because the site writes these files while the page is open.  Nothing here imports torch:
the privacy ledger is read as the JSON it is stored as.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client.approvals import RunBook
from client.site_state import SITE_FILE, WORKER_FILE, read_json

LEDGER_FILE = "privacy.json"  # nearl_core.privacy.STATE_FILE (read here without importing torch and Opacus)
STATUS_FILE = "status.json"  # client.supervisor.STATUS_FILE, in <state-dir>/runtime/
REPORTS_DIR = "reports"  # <state-dir>/reports/<run>.json: the site's verdict of each run
FRESH_SECONDS = 15.0  # a supervisor's status older than this: the site is not running
MAX_MESSAGES = 200  # the latest audited messages on the page


@dataclass
class SiteView:
    """One snapshot of the state dir, as the page renders it."""

    state_dir: Path
    now: float
    status: dict[str, Any] | None
    worker: dict[str, Any] | None
    site: dict[str, Any] | None
    runs: list[dict[str, Any]]
    messages: list[dict[str, Any]]  # audit lines of answered messages, newest first
    decisions: list[dict[str, Any]]  # audit lines of the operator's decisions, newest first
    ledger: dict[str, Any] | None
    epsilon_by_run: list[tuple[str, float, float]]  # (run, epsilon after it, time), oldest first
    reports: list[dict[str, Any]]
    problems: list[str] = field(default_factory=list)  # files that could not be read

    @property
    def running(self) -> bool:
        return bool(self.status) and self.now - float(self.status.get("time") or 0) < FRESH_SECONDS

    @property
    def pending(self) -> list[dict[str, Any]]:
        return [r for r in self.runs if r.get("status") == "pending"]

    @property
    def ceiling(self) -> float | None:
        """This site's own epsilon ceiling (``--max-epsilon``), else the last one a decline reported."""
        own = (self.site or {}).get("max_epsilon")
        if own is not None:
            return float(own)
        for line in self.messages:
            cap = (line.get("metrics") or {}).get("dp-max-epsilon")
            if cap is not None:
                return float(cap)
        return None


def audit_lines(path: Path) -> tuple[list[dict[str, Any]], int]:
    """(the audit trail's lines, how many lines were not JSON); a missing file is empty."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return [], 0
    lines, bad = [], 0
    for raw in text.splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            bad += 1
            continue
        if isinstance(line, dict):
            lines.append(line)
    return lines, bad


def epsilon_by_run(lines: list[dict[str, Any]]) -> list[tuple[str, float, float]]:
    """The ledger's epsilon after each run (the largest ``epsilon_after`` its messages recorded)."""
    runs: dict[str, tuple[float, float]] = {}
    for line in lines:
        eps = line.get("epsilon_after")
        if eps is None or line.get("decision"):
            continue
        rid = str(line.get("run_id"))
        old = runs.get(rid, (0.0, 0.0))
        runs[rid] = (max(old[0], float(eps)), max(old[1], float(line.get("time") or 0)))
    return sorted(((r, e, t) for r, (e, t) in runs.items()), key=lambda x: x[2])


def verdicts(state_dir: Path) -> list[dict[str, Any]]:
    """Every readable report in ``<state-dir>/reports/``, newest first (written by the site at a run's end)."""
    out = []
    for path in sorted((state_dir / REPORTS_DIR).glob("*.json")):
        report = read_json(path)
        if isinstance(report, dict):
            out.append({**report, "_file": path.name})
    return sorted(out, key=lambda r: float(r.get("time") or 0) if isinstance(r.get("time"), (int, float)) else 0,
                  reverse=True)


def read_view(state_dir: Path) -> SiteView:
    """The whole page's data, read now."""
    state_dir = Path(state_dir)
    problems = []
    lines, bad = audit_lines(state_dir / "audit.jsonl")
    if bad:
        problems.append(f"{bad} line(s) of audit.jsonl are not JSON: the trail was edited or truncated")
    try:
        runs = RunBook(state_dir).runs()
    except Exception as err:  # noqa: BLE001 - the page still shows everything else
        runs = []
        problems.append(str(err))
    messages = [x for x in reversed(lines) if not x.get("decision")]
    return SiteView(
        state_dir=state_dir, now=time.time(), status=read_json(state_dir / "runtime" / STATUS_FILE),
        worker=read_json(state_dir / "runtime" / WORKER_FILE), site=read_json(state_dir / SITE_FILE), runs=runs,
        messages=messages[:MAX_MESSAGES], decisions=[x for x in reversed(lines) if x.get("decision")],
        ledger=read_json(state_dir / LEDGER_FILE), epsilon_by_run=epsilon_by_run(lines),
        reports=verdicts(state_dir), problems=problems)
