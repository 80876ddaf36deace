"""The console's one page, rendered on the server from a :class:`client.console.readers.SiteView`.

Every value that comes from a file is passed through :func:`h` (HTML-escaped, quotes
too): run ids, config keys and values, reasons and tensor names are the coordinator's to
choose, so any of them may hold markup.  The page runs no script; its forms post to the
console itself, with the token when the console has one.
"""

from __future__ import annotations

import json
import time
from html import escape
from typing import Any, Iterable, Mapping
from urllib.parse import quote

from client.approvals import flat
from client.console.chart import ledger_svg
from client.console.readers import SiteView

REFRESH_SECONDS = 10
VERDICT_COLUMNS = ("model", "accuracy", "balanced_accuracy", "macro_f1", "auroc", "examples")
VERDICT_SCALARS = ("epsilon_spent", "bytes_sent", "bytes_received", "compute_seconds")
SPLIT_ORDER = ("train", "val", "test")


def h(value: Any) -> str:
    """Text for HTML: escaped, quotes included (safe in element text and in attribute values)."""
    return escape("" if value is None else str(value), quote=True)


def when(t: Any, now: float) -> str:
    if not isinstance(t, (int, float)) or not t:
        return "-"
    ago = max(0.0, now - float(t))
    age = f"{ago:.0f} s ago" if ago < 120 else f"{ago / 60:.0f} min ago" if ago < 7200 else f"{ago / 3600:.0f} h ago"
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(float(t)))} ({age})"


def table(head: Iterable[str], rows: Iterable[Iterable[str]], cls: str = "") -> str:
    """A table; ``rows`` hold HTML already escaped by the caller."""
    th = "".join(f"<th>{h(x)}</th>" for x in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{h(cls)}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def section(title: str, anchor: str, body: str) -> str:
    return f'<section id="{h(anchor)}"><h2>{h(title)}</h2>{body}</section>'


def _num(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return h(value if value is not None else "-")
    return h(f"{value:,}" if isinstance(value, int) else f"{value:.{digits}f}")


# -- sections -----------------------------------------------------------------------------------------------
def status_section(v: SiteView) -> str:
    s, w, last = v.status or {}, v.worker or {}, (v.worker or {}).get("last") or {}
    reach = s.get("connection") == "connected"  # the supervisor's view of the SuperNode's link (client.connection)
    connected = "connected" if v.running and reach else "not connected" if v.running else "site not running"
    message = v.messages[0] if v.messages else {}
    rows = [("site", h((v.site or {}).get("site") or s.get("site") or "-")),
            ("status", f'<span class="pill {"ok" if v.running and reach else "bad"}">{h(connected)}</span>'
                       f"{'' if v.running else ' (no fresh runtime/status.json: is nearl-client running?)'}"),
            ("coordinator", h(s.get("coordinator") or (v.site or {}).get("coordinator") or "-")),
            ("run", h(last.get("run_id") or message.get("run_id") or "-")),
            ("round", h(last.get("round") or message.get("round") or "-")),
            ("worker", h(f"pid {s.get('worker_pid')}, {'warm (backbone built)' if w.get('warm') else 'starting'}, "
                         f"{s.get('worker_restarts', 0)} restart(s)") if s.get("worker_pid") else "not running"),
            ("last message", h(f"{last.get('message_type') or message.get('message_type') or '-'}: "
                               f"{last.get('answer') or message.get('refused') or 'replied'}") + " — "
                             + h(when(last.get("time") or message.get("time"), v.now)))]
    body = table(("", ""), ([f"<b>{k}</b>", val] for k, val in rows), "facts")
    if v.problems:
        body += "".join(f'<p class="warn">{h(p)}</p>' for p in v.problems)
    return section("Status", "status", body)


def _action(path: str, token: str | None) -> str:
    """A form's target: the console's token travels in it (a decision never relies on the cookie alone)."""
    return h(f"{path}?token={quote(token, safe='')}" if token else path)


def pending_section(v: SiteView, token: str | None) -> str:
    if not v.pending:
        return section("Waiting for approval", "approvals", "<p>No run is waiting for this site's approval.</p>")
    cards = []
    for run in v.pending:
        rid = str(run["run_id"])
        path = quote(rid, safe="")
        diff = run.get("differs_from")
        if diff is None:
            change = "<p>No config was approved before at this site: review every key.</p>"
        elif not diff.get("changes"):
            change = f"<p>The same config as the last approved one (run {h(diff.get('run_id'))}).</p>"
        else:
            change = (f"<p>Differs from the last approved config (run {h(diff.get('run_id'))}):</p>"
                      + table(("key", "approved", "asked now"),
                              ([h(k), h(json.dumps(a)), h(json.dumps(b))] for k, a, b in diff["changes"]), "diff"))
        asked = table(("key", "value"), ([h(k), h(json.dumps(val))] for k, val in flat(run.get("asked") or {}).items()))
        cards.append(
            f'<div class="card pending" id="run-{h(rid)}"><h3>run {h(rid)}</h3>'
            f"<p>from {h(run.get('coordinator') or '?')}, waiting since {h(when(run.get('first_seen'), v.now))}; "
            f"{h(run.get('refused_messages', 0))} message(s) answered &quot;waiting for approval&quot;</p>"
            f"<p>config sha256 <code>{h(run.get('config_sha256'))}</code></p>{change}"
            f"<details><summary>the config the coordinator asks for</summary>{asked}</details>"
            f'<form method="post" action="{_action(f"/runs/{path}/approve", token)}" class="inline">'
            f'<button type="submit" class="approve" name="approve" value="{h(rid)}">Approve run {h(rid)}</button></form>'
            f'<form method="post" action="{_action(f"/runs/{path}/refuse", token)}" class="inline">'
            f'<input type="text" name="reason" required placeholder="reason (the coordinator sees it)">'
            f'<button type="submit" class="refuse">Refuse</button></form></div>')
    return section("Waiting for approval", "approvals", "".join(cards))


def runs_section(v: SiteView, audit_runs: list[dict[str, Any]]) -> str:
    rows = [[h(r["run_id"]), f'<span class="pill {h(r.get("status") or "seen")}">{h(r.get("status") or "seen")}</span>',
             h(r.get("reason") or ("by the operator" if r.get("by") == "operator" else
                                   "within the site policy" if r.get("by") == "auto" else "")),
             h(r.get("coordinator")), h(when(r.get("first_seen"), v.now)), h(when(r.get("last_seen"), v.now)),
             h(f"{r.get('accepted_messages', 0)} / {r.get('refused_messages', 0)}"),
             f"<code>{h((r.get('config_sha256') or '-')[:16])}</code>"] for r in v.runs]
    booked = {str(r["run_id"]) for r in v.runs}
    rows += [[h(r["run_id"]), '<span class="pill seen">answered</span>',
              h("; ".join(r["refusals"]) or "no site policy: every message answered"), h(r.get("coordinator")),
              "-", "-", h(f"{r['messages'] - len(r['refusals'])} / {len(r['refusals'])}"), "-"]
             for r in audit_runs if str(r["run_id"]) not in booked]
    body = table(("run", "status", "why", "coordinator", "first seen", "last message", "answered / refused",
                  "config sha256"), rows) if rows else "<p>No run yet.</p>"
    if v.decisions:
        body += "<h3>Decisions</h3>" + table(("time", "run", "decision", "reason", "config sha256", "by"), (
            [h(when(d.get("time"), v.now)), h(d.get("run_id")), h(d.get("decision")), h(d.get("reason") or ""),
             f"<code>{h(d.get('config_sha256'))}</code>", h(d.get("by"))] for d in v.decisions))
    return section("Runs accepted and refused", "runs", body)


def _tensors(arrays: Any) -> str:
    names = [str(a[0]) for a in arrays or [] if isinstance(a, (list, tuple)) and a]
    if not names:
        return "-"
    return f"<details><summary>{len(names)} tensor(s)</summary>{'<br>'.join(h(n) for n in names)}</details>"


def egress_section(v: SiteView) -> str:
    rows = [[h(when(m.get("time"), v.now)), h(m.get("run_id")), h(m.get("round")), h(m.get("message_type")),
             _num(int(m.get("bytes_sent") or 0)), _tensors(m.get("arrays")),
             f'<code title="{h(m.get("payload_sha256"))}">{h((m.get("payload_sha256") or "-")[:16])}</code>',
             h(m.get("refused") and f"refused: {m['refused']}" or m.get("declined") or "sent")] for m in v.messages]
    body = (table(("time", "run", "round", "kind", "bytes", "tensors", "payload sha256", "answer"), rows, "egress")
            if rows else "<p>Nothing has left this site yet (audit.jsonl is empty).</p>")
    total = sum(int(m.get("bytes_sent") or 0) for m in v.messages)
    return section("What left the site", "egress", f"<p>{len(rows)} message(s), {total:,} bytes in all "
                   "(the latest first; only adapter tensors and scalar metrics ever leave).</p>" + body)


def ledger_section(v: SiteView) -> str:
    ledger = v.ledger or {}
    facts = (f"<p>ledger epsilon {_num(ledger.get('epsilon'))} at delta {_num(ledger.get('delta'), 8)} after "
             f"{_num(ledger.get('steps'))} DP steps in {_num(ledger.get('rounds'))} round(s); updated "
             f"{h(ledger.get('updated') or '-')}</p>") if ledger else "<p>No privacy ledger yet (no DP round).</p>"
    ceiling = v.ceiling
    note = (f"<p>ceiling: epsilon {_num(ceiling, 2)} (this site's own --max-epsilon)</p>" if ceiling is not None
            else "<p>No ceiling of this site's own (nearl-client --max-epsilon); the federation config's applies.</p>")
    chart = ledger_svg(v.epsilon_by_run, ceiling) if v.epsilon_by_run else ""
    return section("Privacy ledger", "ledger", chart + facts + note)


def data_section(v: SiteView) -> str:
    site = v.site or {}
    counts: Mapping[str, Mapping[str, int]] = site.get("counts") or {}
    if not counts:
        return section("This site's data", "data", "<p>No data summary yet (written when nearl-client starts).</p>")
    splits = sorted(counts, key=lambda x: (SPLIT_ORDER.index(x) if x in SPLIT_ORDER else len(SPLIT_ORDER), x))
    classes = list(site.get("classes") or next(iter(counts.values()), {}).keys())
    rows = [[h(c), *(_num(int(counts[s].get(c, 0))) for s in splits),
             _num(sum(int(counts[s].get(c, 0)) for s in splits))] for c in classes]
    rows.append(["<b>total</b>", *(_num(sum(counts[s].values())) for s in splits),
                 _num(sum(sum(x.values()) for x in counts.values()))])
    notes = "".join(f'<p class="warn">{h(n)}</p>' for n in site.get("notes") or [])
    return section("This site's data", "data",
                   f"<p>{h(site.get('data'))}: {h(site.get('check'))} (checked {h(when(site.get('checked'), v.now))})</p>"
                   + table(("class", *splits, "total"), rows, "counts") + notes)


def policy_section(v: SiteView) -> str:
    policy = (v.site or {}).get("policy")
    if not policy:
        return section("Site policy", "policy", "<p>No site policy: the site answers every run of an accepted app "
                       "bundle (nearl-client --policy FILE sets one).</p>")
    rows = ([h(k), h(json.dumps(val))] for k, val in policy.items() if val not in (None, False))
    return section("Site policy", "policy", table(("key", "value"), rows, "facts"))


def verdict_section(v: SiteView) -> str:
    if not v.reports:
        return section("Verdict", "verdict", "<p>No verdict yet: the site writes one at the end of every run "
                       "(reports/&lt;run&gt;.json).</p>")
    cards = []
    for r in v.reports:
        rows = [x for x in r.get("rows") or [] if isinstance(x, dict)]
        cols = list(dict.fromkeys([*VERDICT_COLUMNS, *(k for x in rows for k in x)]))
        body = table(cols, ([_num(x.get(c)) for c in cols] for x in rows), "verdict")
        scalars = table(("", ""), ([h(k), _num(r.get(k))] for k in VERDICT_SCALARS), "facts")
        cards.append(f'<div class="card"><h3>run {h(r.get("run_id"))} at {h(r.get("site"))}, {h(r.get("split"))} '
                     f'split, {h(when(r.get("time"), v.now))}</h3>{body}{scalars}</div>')
    return section("Verdict", "verdict", "".join(cards))


def render(v: SiteView, *, token: str | None, audit_runs: list[dict[str, Any]], flash: str = "") -> str:
    """The whole page."""
    site = h((v.site or {}).get("site") or (v.status or {}).get("site") or "site")
    sections = [status_section(v), pending_section(v, token), runs_section(v, audit_runs), egress_section(v),
                ledger_section(v), data_section(v), policy_section(v), verdict_section(v)]
    css = f"/static/console.css{'?token=' + quote(token) if token else ''}"
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">'
            f"<title>NEARL site console - {site}</title>"
            f'<link rel="stylesheet" href="{h(css)}"></head><body>'
            f"<header><h1>NEARL site console: {site}</h1><p>state {h(v.state_dir)} - read "
            f"{h(time.strftime('%H:%M:%S', time.localtime(v.now)))}, refreshed every {REFRESH_SECONDS} s</p>"
            f'<nav>{"".join(f"<a href=#{a}>{t}</a>" for a, t in NAV)}</nav></header>'
            f"{f'<p class=flash>{h(flash)}</p>' if flash else ''}<main>{''.join(sections)}</main></body></html>")


NAV = (("status", "status"), ("approvals", "approvals"), ("runs", "runs"), ("egress", "what left"),
       ("ledger", "privacy"), ("data", "data"), ("policy", "policy"), ("verdict", "verdict"))
