"""What a round leaves behind: the per-site data of a reply, the round's report and who listens to it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from flwr.app import ArrayRecord

from nearl_protocol import keys
from server.screening import aggregate_metrics, split_metrics


class NotEnoughSites(RuntimeError):
    """Fewer than ``min_nodes`` sites connected before the wait timeout."""


@dataclass
class SiteReply:
    node_id: int
    site: str
    metrics: dict[str, float]
    nbytes: int
    declined: str | None = None  # the site declined to train (its privacy budget); no update
    payload: str | None = None  # sha256 of the adapter bytes received


@dataclass
class RoundReport:
    """Everything the listener needs to log and checkpoint one global round."""

    round: int
    arrays: ArrayRecord
    train_metrics: dict[str, float] = field(default_factory=dict)
    per_site: dict[str, dict[str, float]] = field(default_factory=dict)
    answered: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)  # site -> reason
    declined: dict[str, str] = field(default_factory=dict)  # site -> reason (DP budget; not an error)
    sampled: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0
    aggregated: bool = False  # False when no update was accepted (global adapters unchanged)
    not_applied: str = ""  # why the round's aggregate was rejected (global adapters unchanged)
    payload_sha256: dict[str, str] = field(default_factory=dict)  # site -> hash of the update it sent


class RoundListener(Protocol):
    def evaluated(self, step: int, metrics: dict[str, float], per_site: dict[str, dict[str, float]]) -> None: ...

    def round_finished(self, report: RoundReport, strategy: Any) -> None: ...




def record_site_metrics(report: RoundReport, sites: list[SiteReply], listener: RoundListener | None, r: int, *,
                        unweighted: bool = False) -> None:
    """The sites' clear metrics of a train round: per site into ``report``, their mean as its train metrics.

    Each reply's evaluation of the incoming global adapters (the model after round r-1) goes to
    the listener at step r-1.  ``unweighted``: every site counts once (a secure round, where the
    example counts are masked).  The round's ``train_examples`` is left to the caller.
    """
    rows_train, rows_eval, evals_per_site = [], [], {}
    for s in sites:
        train_m, eval_m = split_metrics(s.metrics)
        rows_train.append({**train_m, keys.MLFLOW_TRAIN_EXAMPLES: 1.0} if unweighted else train_m)
        report.per_site[s.site] = dict(train_m)
        if eval_m:
            rows_eval.append(eval_m)
            evals_per_site[s.site] = eval_m
    report.train_metrics = aggregate_metrics(rows_train)
    report.train_metrics.pop(keys.MLFLOW_TRAIN_EXAMPLES, None)
    if rows_eval and listener is not None:
        listener.evaluated(r - 1, aggregate_metrics(rows_eval), evals_per_site)
