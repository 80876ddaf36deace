"""The site's verdict on a run: did joining the federation beat what the site had without it?

At the end of every run a site writes ``<state-dir>/reports/<run>.json`` and a human
``<run>.md`` beside it (``<run>``: the Flower run id its audit trail records).  On the
site's own test split (val when it has none) it compares four models:

* ``zero-shot``: the frozen CLIP with the adapters as built, before any training;
* ``federated``: the federation's final adapters, as the site's last evaluate measured them;
* ``personalized``: the site's own adapters after the last round (only when the run personalizes);
* ``local-only``: adapters the site trains alone on its own data for the same epochs
  (rounds x local epochs), cached by :mod:`client.local_baseline`.

and adds what the run cost the site: epsilon spent (its DP ledger), bytes sent and received
and seconds of work (totalled from its audit trail, :mod:`client.audit`).

The JSON's keys are a contract with the site console: keys may be added, never renamed.
A metric without a value (AUROC of a split holding one class) is ``null``.  Nothing of the
verdict is sent to the coordinator (``sent_to_coordinator: false``).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from nearl_protocol import keys

MODELS = ("zero-shot", "federated", "personalized", "local-only")  # the table's order
REPORTS_DIR = "reports"
METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc")


@dataclass(frozen=True)
class Row:
    """One model's metrics on the verdict's split."""

    model: str
    accuracy: float
    balanced_accuracy: float
    macro_f1: float
    auroc: float
    examples: int

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, **{m: _finite(getattr(self, m)) for m in METRICS}, "examples": self.examples}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "Row":
        return cls(str(raw["model"]), *(_number(raw.get(m)) for m in METRICS), int(raw.get("examples") or 0))


def _finite(value: float) -> float | None:
    """JSON has no NaN: a metric without a value is written as null."""
    return float(value) if value is not None and math.isfinite(value) else None


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan


def row_from_metrics(model: str, metrics: Mapping[str, Any]) -> Row:
    """A row from :func:`nearl_core.train.evaluate`'s result (``accuracy``, ..., ``examples``)."""
    return Row(model, *(_number(metrics.get(m)) for m in METRICS), int(metrics.get("examples") or 0))


def row_from_reply(model: str, metrics: Mapping[str, float], prefix: str, examples_key: str) -> Row | None:
    """A row from the wire metrics a reply carried (``test-accuracy``, ...); None when it carried none."""
    values = [metrics.get(keys.wire_metric(prefix, m)) for m in METRICS]
    if values[0] is None:
        return None
    return Row(model, *(_number(v) for v in values), int(metrics.get(examples_key) or 0))


def reply_split(metrics: Mapping[str, float]) -> str:
    """The split the last evaluate measured for the verdict: test when the site has one (it then reports it)."""
    return "test" if keys.wire_metric(keys.TEST_PREFIX, "accuracy") in metrics else "val"


def measured_rows(metrics: Mapping[str, float]) -> list[Row]:
    """The federated (and personalized) rows exactly as the site's final evaluate reply reported them."""
    if reply_split(metrics) == "test":
        federated = row_from_reply("federated", metrics, keys.TEST_PREFIX, keys.TEST_EXAMPLES)
    else:  # the val metrics' example count travels as num-examples
        federated = row_from_reply("federated", metrics, keys.EVAL_PREFIX, keys.NUM_EXAMPLES)
    personal = row_from_reply("personalized", metrics, keys.PERSONAL_PREFIX, keys.PERSONAL_EXAMPLES)
    return [r for r in (federated, personal) if r is not None]


@dataclass
class Verdict:
    """What ``reports/<run>.json`` holds; ``extra`` are the added keys (rounds, the local baseline's facts)."""

    run_id: str
    site: str
    time: float
    split: str
    rows: list[Row]
    epsilon_spent: float | None
    bytes_sent: int
    bytes_received: int
    compute_seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        order = {m: i for i, m in enumerate(MODELS)}
        rows = sorted(self.rows, key=lambda r: order.get(r.model, len(order)))
        return {"run_id": self.run_id, "site": self.site, "time": self.time, "split": self.split,
                "rows": [r.to_dict() for r in rows], "epsilon_spent": self.epsilon_spent,
                "bytes_sent": int(self.bytes_sent), "bytes_received": int(self.bytes_received),
                "compute_seconds": float(self.compute_seconds), **self.extra}

    def row(self, model: str) -> Row | None:
        return next((r for r in self.rows if r.model == model), None)


def run_totals(lines: Iterable[Mapping[str, Any]], run_id: int) -> tuple[int, int, float]:
    """(bytes sent, bytes received, seconds of work) of one run, from the site's audit lines."""
    sent = received = 0
    seconds = 0.0
    for line in lines:
        if line.get("run_id") == run_id:
            sent += int(line.get("bytes_sent") or 0)
            received += int(line.get("bytes_received") or 0)
            seconds += float(line.get("seconds") or 0.0)
    return sent, received, seconds


def report_paths(state_dir: Path, run_id: str) -> tuple[Path, Path]:
    folder = state_dir / REPORTS_DIR
    return folder / f"{run_id}.json", folder / f"{run_id}.md"


def write_verdict(state_dir: Path, verdict: Verdict) -> Path:
    """Write ``<state-dir>/reports/<run>.json`` and ``.md`` (each replaced atomically); returns the JSON's path."""
    json_path, md_path = report_paths(state_dir, verdict.run_id)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    _replace(json_path, json.dumps(verdict.to_dict(), indent=2, allow_nan=False) + "\n")
    _replace(md_path, render_markdown(verdict))
    return json_path


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _cell(value: float) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.3f}"


def render_table(rows: Iterable[Row]) -> str:
    """The verdict's table in Markdown (also readable as plain text)."""
    lines = ["| model | accuracy | balanced accuracy | macro F1 | AUROC | images |",
             "|---|---:|---:|---:|---:|---:|"]
    order = {m: i for i, m in enumerate(MODELS)}
    for r in sorted(rows, key=lambda r: order.get(r.model, len(order))):
        lines.append(f"| {r.model} | {_cell(r.accuracy)} | {_cell(r.balanced_accuracy)} | {_cell(r.macro_f1)} | "
                     f"{_cell(r.auroc)} | {r.examples} |")
    return "\n".join(lines)


def _delta(a: Row | None, b: Row | None, metric: str) -> str | None:
    if a is None or b is None:
        return None
    diff = getattr(a, metric) - getattr(b, metric)
    return None if not math.isfinite(diff) else f"{diff:+.3f}"


def comparison(verdict: Verdict) -> list[str]:
    """One line per model of the federation: its balanced accuracy against each baseline's."""
    out = []
    for model in ("federated", "personalized"):
        ours = verdict.row(model)
        gains = [f"{diff} vs {other}" for other in ("local-only", "zero-shot")
                 if (diff := _delta(ours, verdict.row(other), "balanced_accuracy")) is not None]
        if gains:
            out.append(f"- {model}: balanced accuracy {', '.join(gains)}")
    examples = max((r.examples for r in verdict.rows), default=0)
    if out and examples:
        out.append(f"- {examples} {verdict.split} images: one image moves accuracy by {1 / examples:.3f}, so a "
                   "difference of an image or two is noise")
    return out


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"



def _cost_lines(verdict: Verdict) -> list[str]:
    eps = ("no differential privacy in this run: its updates carry no DP guarantee" if verdict.epsilon_spent is None
           else f"{verdict.epsilon_spent:.3f} (this site's DP ledger, every DP step it ever took on this data)")
    return [f"- epsilon spent: {eps}",
            f"- sent {_size(verdict.bytes_sent)}, received {_size(verdict.bytes_received)} "
            "(this run's lines of the audit trail)",
            f"- {verdict.compute_seconds:.1f} s answering the coordinator's messages"]


def _baseline_line(extra: Mapping[str, Any]) -> str:
    base = extra.get("local_baseline") or {}
    status = base.get("status")
    if status == "skipped":
        return f"- local-only model: not trained ({base.get('reason')})"
    what = "trained now" if status == "trained" else "reused from an earlier run with the same data and config"
    dp = f", DP-SGD to epsilon {base['epsilon']:.3f} (its own ledger)" if base.get("epsilon") is not None else ""
    return (f"- local-only model: {base.get('epochs')} epoch(s) on this site's own training images, {what}{dp}; "
            f"cache {base.get('folder')}")


def render_markdown(verdict: Verdict) -> str:
    """The human verdict: the table, the gains, the costs, and what left the site."""
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(verdict.time))
    rounds = verdict.extra.get("rounds")
    head = [f"# Site verdict: {verdict.site}, run {verdict.run_id}", "",
            f"Run ended {when}" + (f" after {rounds} round(s)" if rounds else "") +
            f"; every model measured on this site's own {verdict.split} split.", "",
            render_table(verdict.rows), ""]
    body = [*comparison(verdict), *_cost_lines(verdict), _baseline_line(verdict.extra),
            "- nothing of this report was sent to the coordinator"]
    return "\n".join(head + body) + "\n"
