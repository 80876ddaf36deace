"""Which round's global adapters the federation keeps: the best federated validation, and when to stop.

Each round's global adapters are evaluated on every site's ``val`` split; the server's
example-weighted mean of one metric (``select-by``) ranks the rounds.  The rule, kept
here without Flower or MLflow so that it is tested on its own:

* only trained rounds compete (step 0, the zero-shot adapters, is the baseline, not a
  candidate);
* a round wins only when it is strictly better than the best so far: a tie keeps the
  earlier round (fewer rounds, the same validation);
* a value that is missing or not finite never wins, but the round still counts as seen;
* ``patience`` N > 0: the run may stop once the latest validated round is N rounds past
  the best one; without any finite value the run never stops early.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping

from nearl_protocol import keys

# select-by value -> (the MLflow name of the validation metric, True when higher is better)
SELECT_BY: dict[str, tuple[str, bool]] = {
    "balanced-accuracy": (keys.MLFLOW_EVAL_BALANCED_ACCURACY, True),
    "accuracy": (keys.MLFLOW_EVAL_ACCURACY, True),
    "macro-f1": (keys.MLFLOW_EVAL_MACRO_F1, True),
    "auroc": (keys.MLFLOW_EVAL_AUROC, True),
    "loss": (keys.MLFLOW_EVAL_LOSS, False),
}


def label(select_by: str) -> str:
    """``balanced-accuracy`` -> ``balanced accuracy``: how the terminal and the reports name it."""
    return select_by.replace("-", " ")


@dataclass
class Selection:
    """The best round so far by one validation metric; what a checkpoint keeps of it (:meth:`state`)."""

    by: str = "balanced-accuracy"
    best_round: int | None = None
    best_value: float | None = None
    latest: int = 0  # the latest round whose validation was seen

    def __post_init__(self) -> None:
        if self.by not in SELECT_BY:
            raise ValueError(f"select-by must be one of {', '.join(SELECT_BY)}, not {self.by!r}")

    @property
    def metric(self) -> str:
        return SELECT_BY[self.by][0]

    def better(self, value: float, than: float) -> bool:
        """Strictly better in this metric's direction (lower for loss)."""
        return value > than if SELECT_BY[self.by][1] else value < than

    def observe(self, step: int, metrics: Mapping[str, Any]) -> bool:
        """Record the federated validation of the adapters after round ``step``; True when it is the new best."""
        if step < 1:
            return False
        self.latest = max(self.latest, step)
        value = metrics.get(self.metric)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if self.best_value is not None:
            tie_before = value == self.best_value and step < (self.best_round or 0)  # a re-evaluated earlier round
            if not (self.better(value, self.best_value) or tie_before):
                return False
        self.best_round, self.best_value = step, float(value)
        return True

    def since_best(self) -> int:
        """Validated rounds after the best one (0 while the latest is the best, or none is known)."""
        return self.latest - self.best_round if self.best_round is not None else 0

    def exhausted(self, patience: int) -> bool:
        """Early stopping: ``patience`` > 0 validated rounds in a row without improvement."""
        return patience > 0 and self.best_round is not None and self.since_best() >= patience

    def stop_reason(self, patience: int) -> str:
        """Why the run stops early ('' when it does not), in the words nearl-server prints."""
        if not self.exhausted(patience):
            return ""
        return (f"validation {label(self.by)} has not improved for {self.since_best()} round(s) since round "
                f"{self.best_round} ({self.best_value:.4g}); patience {patience}")

    def state(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: Mapping[str, Any] | None, by: str) -> "Selection":
        """A checkpoint's selection, or a fresh one when it has none or ranked by another metric."""
        if not state or state.get("by") != by:
            return cls(by)
        best = state.get("best_round")
        value = state.get("best_value")
        return cls(by, None if best is None else int(best), None if value is None else float(value),
                   int(state.get("latest", 0)))
