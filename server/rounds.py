"""What a round leaves behind: the per-site data of a reply, the round's report and who listens to it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from flwr.app import ArrayRecord


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


