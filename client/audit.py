"""The site's own record of everything it sent: ``<state-dir>/audit.jsonl``.

One JSON line per message the site answers, appended, flushed and fsynced *before* the
reply is handed to Flower, so a reply that left is always on record.  A line holds the
time, run id, round, coordinator address, message type, each outgoing tensor's name,
shape and dtype (the split of the one flat array the adapters travel as), the sha256 of
the payload bytes (the server logs the same hash for what it received), bytes sent and received, the
seconds the site spent answering, the scalar metrics sent, epsilon before and after, and
whether the site declined (privacy budget) or refused (e.g. another backbone) and why.
The operator's decisions on runs (``nearl-client approve`` / ``refuse``, the console's
buttons) are lines too, marked by their ``decision`` key, with the sha256 of the config
they were about (:mod:`client.approvals`).
The site's verdict (:mod:`client.verdict`) totals a run's bytes and seconds from these lines,
and ``nearl-client verify`` (:mod:`client.verify`) matches the hashes against the coordinator's record.
``nearl-client audit --state-dir DIR`` summarises the file per run.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping

from flwr.app import Message

from nearl_protocol import keys
from nearl_protocol.arrays import payload_sha256
from nearl_protocol.messages import metrics_of, record_bytes
from nearl_protocol.schema import Schema


def audit_line(msg: Message, reply: Message, *, site: str, coordinator: str, server_round: int | None,
               eps_before: float | None, eps_after: float | None, schema: Schema | None = None,
               seconds: float | None = None) -> dict[str, Any]:
    """What the audit trail records for one answered message (``server_round`` None: unreadable instruction).

    ``schema``: the layout the reply's flat adapter array was packed with (checked by the
    egress gate); the line lists its tensors.  Without it the line lists the record's arrays.
    ``seconds``: how long the site worked on the message (None: not measured).
    """
    line: dict[str, Any] = {"time": time.time(), "run_id": int(msg.metadata.run_id), "round": server_round,
                            "site": site, "coordinator": coordinator, "message_type": msg.metadata.message_type,
                            "arrays": [], "payload_sha256": None, "bytes_sent": 0,
                            "bytes_received": _received(msg), "seconds": seconds, "metrics": {},
                            "epsilon_before": eps_before, "epsilon_after": eps_after,
                            "declined": None, "refused": None}
    if reply.has_error():
        line["refused"] = reply.error.reason.removeprefix(f"{site}: ")
        return line
    arrays = reply.content.array_records.get(keys.ARRAYS)
    metrics = metrics_of(reply.content)
    line.update(metrics=metrics, bytes_sent=record_bytes(reply.content))
    if arrays is not None:
        line["arrays"] = _listed(arrays, schema)
        line["payload_sha256"] = payload_sha256(arrays)
    if metrics.get(keys.DP_DECLINED) == 1.0:
        line["declined"] = (f"privacy budget: epsilon {metrics.get(keys.EPSILON, math.nan):.3f} spent, the round "
                            f"would reach {metrics.get(keys.DP_EPSILON_NEXT, math.nan):.3f} > "
                            f"{metrics.get(keys.DP_MAX_EPSILON, math.nan):g}")
    return line


def _received(msg: Message) -> int:
    """The instruction's size as the site received it (0 for a message without content).

    Flower's own count refuses a config record holding an empty string; such a record is
    then counted by the length of its values' text (the adapters dominate either way).
    """
    if not msg.has_content():
        return 0
    try:
        return record_bytes(msg.content)
    except ValueError:
        return sum(_record_size(rec) for rec in msg.content.values())


def _record_size(rec: Any) -> int:
    try:
        return int(rec.count_bytes())
    except ValueError:
        return sum(len(str(k)) + len(str(v)) for k, v in rec.items())


def _listed(arrays: Mapping[str, Any], schema: Schema | None) -> list[list[Any]]:
    """[name, shape, dtype] of every tensor sent: the schema's split of the flat array, else the arrays as they are."""
    if schema:
        return [[name, list(shape), dtype] for name, (shape, dtype) in schema.items()]
    return [[name, list(a.shape), a.dtype] for name, a in arrays.items()]


def append(path: Path, line: dict[str, Any]) -> None:
    """Append one line durably (flush + fsync) before the reply leaves."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(_finite(line), sort_keys=True, allow_nan=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _finite(value: Any) -> Any:
    """JSON has no NaN: a metric without a value (e.g. AUROC of a one-class split) is recorded as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def read_lines(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"no audit trail at {path}; give the site's --state-dir (default ~/.nearl/sites/SITE/state)")
    out = []
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            out.append(json.loads(text))
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{number} is not a JSON line; the audit trail was edited or truncated") from None
    return out


def summarise(lines: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per run: rounds answered, messages, bytes sent, max epsilon, declines and refusals."""
    runs: dict[int, dict[str, Any]] = defaultdict(lambda: {"rounds": set(), "messages": 0, "bytes_sent": 0,
                                                            "max_epsilon": None, "declined": 0, "refusals": []})
    for line in lines:
        if line.get("decision"):  # an operator's decision, not a message answered
            continue
        run = runs[line.get("run_id")]
        run["messages"] += 1
        run["bytes_sent"] += int(line.get("bytes_sent") or 0)
        run.setdefault("coordinator", line.get("coordinator"))
        run.setdefault("site", line.get("site"))
        if line.get("refused"):
            run["refusals"].append(f"round {line.get('round')}: {line['refused']}")
        else:
            run["rounds"].add(line.get("round"))
        run["declined"] += 1 if line.get("declined") else 0
        eps = line.get("epsilon_after")
        if eps is not None:
            run["max_epsilon"] = eps if run["max_epsilon"] is None else max(run["max_epsilon"], eps)
    return [{"run_id": rid, **{k: (sorted(r for r in v if r is not None) if k == "rounds" else v)
                               for k, v in run.items()}} for rid, run in runs.items()]


def format_summary(runs: list[dict[str, Any]]) -> str:
    lines = [f"{'run':>20}  {'site':<10} {'rounds':>6} {'msgs':>5} {'MB sent':>8} {'max eps':>8} "
             f"{'declined':>8} {'refused':>7}  coordinator"]
    for r in runs:
        eps = "-" if r["max_epsilon"] is None else f"{r['max_epsilon']:.3f}"
        lines.append(f"{r['run_id']:>20}  {str(r.get('site')):<10} {len(r['rounds']):>6} {r['messages']:>5} "
                     f"{r['bytes_sent'] / 1e6:>8.3f} {eps:>8} {r['declined']:>8} {len(r['refusals']):>7}  "
                     f"{r.get('coordinator') or '-'}")
        lines += [f"{'':>22}refused {why}" for why in r["refusals"]]
    return "\n".join(lines)
