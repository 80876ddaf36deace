"""How nearl-server shows a federation: one line per progress event, and the final summary table.

The ServerApp writes JSON lines (:class:`server.federation.Progress`); ``nearl-server``
follows the file and prints :func:`format_event` for each, then :func:`format_summary`.
"""

from __future__ import annotations

import json
import math
from typing import Any


def _fmt(v: Any, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def format_event(e: dict[str, Any]) -> str:
    kind = e["event"]
    if kind == "start":
        what = "resuming at" if e.get("resumed") else "starting"
        return (f"{what} round {e['start_round']}/{e['rounds']}: strategy {e['strategy']}, at least "
                f"{e['min_nodes']} sites, {e['trainable_parameters']:,} adapter parameters "
                f"({e['payload_bytes'] / 1e6:.2f} MB per site per round), MLflow run {e.get('run_id')}")
    if kind == "round":
        ev = e.get("eval") or {}
        parts = [f"round {e['round']}/{e['rounds']}", f"sites {len(e['answered'])}/{e['sampled']}",
                 f"train_loss {_fmt((e.get('train') or {}).get('train_loss'))}"]
        if (e.get("train") or {}).get("sites_warm") is not None:
            parts.append(f"warm {int(e['train']['sites_warm'])}/{len(e['answered'])}")
        if (e.get("train") or {}).get("epsilon_max") is not None:
            parts.append(f"eps_max {_fmt(e['train']['epsilon_max'], 2)}")
        if e.get("eval_step") is not None:
            parts.append(f"eval@{e['eval_step']} acc {_fmt(ev.get('eval_accuracy'))} "
                         f"bal_acc {_fmt(ev.get('eval_balanced_accuracy'))} loss {_fmt(ev.get('eval_loss'))}")
        parts.append(f"{e['seconds']:.1f}s")
        parts.append(f"sent {e['bytes_sent'] / 1e6:.2f} MB recv {e['bytes_received'] / 1e6:.2f} MB")
        line = "  ".join(parts)
        if e.get("missing"):
            line += f"  missing: {', '.join(e['missing'])}"
        for site, reason in (e.get("declined") or {}).items():
            line += f"\n    {site} {reason}"
        for site, reason in (e.get("rejected") or {}).items():
            line += f"\n    rejected {site}: {reason}"
        if e.get("not_applied"):
            line += f"\n    update not applied: {e['not_applied']}"
        elif not e.get("aggregated", True):
            line += "\n    no update accepted this round: global adapters unchanged"
        return line
    if kind == "eval":
        return ""  if e["step"] > 0 else (f"zero-shot (round 0) eval acc {_fmt(e['metrics'].get('eval_accuracy'))} "
                                           f"bal_acc {_fmt(e['metrics'].get('eval_balanced_accuracy'))}")
    if kind == "done":
        return f"done: final adapters in {e['adapters']} (MLflow run {e.get('run_id')})"
    if kind == "error":
        return f"ServerApp error: {e['message']}"
    return json.dumps(e)


def format_summary(events: list[dict[str, Any]]) -> str:
    evals = {e["step"]: e for e in events if e["event"] == "eval"}
    if not evals:
        return ""
    keys = ["eval_loss", "eval_accuracy", "eval_balanced_accuracy", "eval_macro_f1", "eval_auroc"]
    first, last = evals[min(evals)], evals[max(evals)]
    lines = [f"{'metric':<26}{'round ' + str(first['step']):>12}{'round ' + str(last['step']):>12}", "-" * 50]
    for k in keys:
        lines.append(f"{k:<26}{_fmt(first['metrics'].get(k)):>12}{_fmt(last['metrics'].get(k)):>12}")
    return "\n".join(lines)
