"""The strategy's listener: MLflow, checkpoints, progress and the best round after each round.

:class:`RoundLog` receives every federated evaluation and every finished round from
:class:`server.strategy.NearlStrategyMixin`.  Besides logging, it keeps the global
adapters of the best round so far (:class:`server.selection.Selection`): an evaluation
at step *t* describes the adapters after round *t*, which the listener still holds (the
round just finished and the one before it; with in-train evaluation step *t* arrives
during round *t + 1*).  Each checkpoint carries the selection and the best adapters, so
a resumed run continues with its best-so-far.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from nearl_protocol import keys
from nearl_protocol.schema import Schema
from server.checkpoint import Checkpoint, save_checkpoint
from server.events import EvalEvent, ProgressWriter, RoundEvent
from server.rounds import RoundReport
from server.screening import DUPLICATE
from server.selection import Selection
from server.settings import FederationSettings
from server.tracking import Tracker

FINAL_PREFIXES = (keys.MLFLOW_TEST_PREFIX, keys.MLFLOW_PERSONAL_PREFIX)  # what the final evaluation adds


def arrays_to_numpy(arrays: ArrayRecord, schema: Schema) -> dict[str, np.ndarray]:
    return {k: arrays[k].numpy().astype(schema[k][1], copy=False) for k in schema}


def numpy_to_arrays(values: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in values.items()})


class RoundLog:
    """Listener of :class:`NearlStrategyMixin`: MLflow, checkpoints, progress and the best round after each round.

    ``start_round`` is the last round already done (a resume's checkpoint, else 0) and
    ``initial`` its global adapters; ``selection`` and ``best`` are what that checkpoint kept.
    """

    def __init__(self, settings: FederationSettings, tracker: Tracker | None, progress: ProgressWriter,
                 schema: Schema, ckpt_meta: dict[str, Any], *, initial: ArrayRecord, start_round: int = 0,
                 selection: Selection | None = None, best: ArrayRecord | None = None):
        self.settings, self.tracker, self.progress, self.schema = settings, tracker, progress, schema
        self.ckpt_meta = ckpt_meta
        self.first_round = start_round + 1
        self.last_eval: tuple[int, dict[str, float]] | None = None
        self.final_arrays: ArrayRecord = initial  # the latest global adapters
        self.last_round = start_round
        self.selection = selection or Selection(settings.select_by)
        held = self.selection.best_round
        self.best: tuple[int, ArrayRecord] | None = (held, best) if held is not None and best is not None else None
        self.recent: dict[int, ArrayRecord] = {start_round: initial}  # the adapters an evaluation may still name
        self.final_test: dict[str, float] = {}  # the selected adapters on the sites' test splits
        self.seen_sites: set[str] = set()
        self.final_epsilon: dict[str, float] = {}  # site -> the last epsilon it reported (DP)
        self.contributors: set[str] = set()  # sites whose update was aggregated at least once

    # -- evaluations -------------------------------------------------------------------------------
    def evaluated(self, step: int, metrics: dict[str, float], per_site: dict[str, dict[str, float]]) -> None:
        """The federated validation of the adapters after round ``step``: logged, and ranked."""
        self._log_step(step, metrics, per_site)
        self.last_eval = (step, metrics)
        self.progress.emit(EvalEvent(step=step, metrics=metrics, sites=per_site))
        self.selection.observe(step, metrics)
        self._keep_best()

    def tested(self, step: int, metrics: dict[str, float], per_site: dict[str, dict[str, float]]) -> None:
        """The final evaluation of the selected adapters (round ``step``): its test and personalized metrics,
        logged at that step (its validation metrics are already there)."""
        final = lambda values: {k: v for k, v in values.items() if k.startswith(FINAL_PREFIXES)}  # noqa: E731
        self.final_test = final(metrics)
        self._log_step(step, self.final_test, {site: final(v) for site, v in per_site.items()})

    def _log_step(self, step: int, metrics: dict[str, float], per_site: dict[str, dict[str, float]]) -> None:
        if self.tracker is None:
            return
        flat = dict(metrics)
        for site, values in per_site.items():
            flat.update({f"{site}/{k}": v for k, v in values.items()})
        self.tracker.log_metrics(flat, step=step)

    # -- the best round ----------------------------------------------------------------------------
    def _keep_best(self) -> None:
        """Hold the best round's adapters as soon as both its validation and its adapters are known."""
        best = self.selection.best_round
        if best is not None and best in self.recent:
            self.best = (best, self.recent[best])

    def selected(self) -> tuple[int, ArrayRecord]:
        """The round the federation keeps and its adapters: the best validated one, else the last round."""
        if self.best is not None and self.best[0] == self.selection.best_round:
            return self.best
        return self.last_round, self.final_arrays

    # -- rounds ------------------------------------------------------------------------------------
    def round_finished(self, report: RoundReport, strategy: Any) -> None:
        """Log the round, update the best round, checkpoint both, emit the round's progress line."""
        self.seen_sites.update(report.answered)
        self.seen_sites.update(report.missing)
        self.contributors.update(report.payload_sha256)
        for site, values in report.per_site.items():
            if keys.MLFLOW_EPSILON in values:
                self.final_epsilon[site] = values[keys.MLFLOW_EPSILON]
        if self.tracker is not None:
            self._track_round(report)
        self.final_arrays, self.last_round = report.arrays, report.round
        self.recent = {r: a for r, a in self.recent.items() if r >= report.round - 1}
        self.recent[report.round] = report.arrays
        self._keep_best()
        ckpt_path = self._checkpoint(report, strategy)
        eval_step, eval_metrics = self.last_eval if self.last_eval else (None, {})
        self.progress.emit(RoundEvent(
            round=report.round, rounds=self.settings.num_rounds, answered=report.answered,
            missing=report.missing, rejected=report.rejected, declined=report.declined, sampled=report.sampled,
            aggregated=report.aggregated, not_applied=report.not_applied, payload_sha256=report.payload_sha256,
            seconds=report.seconds, bytes_sent=report.bytes_sent, bytes_received=report.bytes_received,
            train=report.train_metrics, eval_step=eval_step, eval=eval_metrics, checkpoint=ckpt_path))

    def _checkpoint(self, report: RoundReport, strategy: Any) -> str | None:
        root = self.settings.checkpoint_path()
        if root is None:
            return None
        held, arrays = self.selected()  # the selection and the adapters it names, as one consistent pair
        selection = self.selection.state() if self.best is not None and held == self.best[0] else None
        ckpt = Checkpoint(round=report.round, arrays=arrays_to_numpy(report.arrays, self.schema),
                          strategy_state=strategy.strategy_state(), meta={**self.ckpt_meta, "selection": selection},
                          best=arrays_to_numpy(arrays, self.schema) if selection else None)
        return str(save_checkpoint(root, ckpt, keep=self.settings.keep_checkpoints))

    def _track_round(self, report: RoundReport) -> None:
        """The round's metrics (train, per site, traffic, who answered) and its tags in MLflow."""
        assert self.tracker is not None
        flat: dict[str, float] = dict(report.train_metrics)
        flat.update({keys.MLFLOW_ROUND_SECONDS: report.seconds, keys.MLFLOW_BYTES_SENT: report.bytes_sent,
                     keys.MLFLOW_BYTES_RECEIVED: report.bytes_received,
                     keys.MLFLOW_SITES_ANSWERED: len(report.answered), keys.MLFLOW_SITES_MISSING: len(report.missing),
                     keys.MLFLOW_SITES_REJECTED: len(report.rejected), keys.MLFLOW_SITES_DECLINED: len(report.declined),
                     keys.MLFLOW_SITES_DUPLICATE: sum(DUPLICATE in why for why in report.rejected.values())})
        for site, values in report.per_site.items():
            flat.update({f"{site}/{k}": v for k, v in values.items()})
        for site in sorted(self.seen_sites):
            flat[f"{site}/{keys.MLFLOW_ANSWERED}"] = 1.0 if site in report.answered else 0.0
        self.tracker.log_metrics(flat, step=report.round)
        if report.round == self.first_round:
            self.tracker.log_params({"num_sites": report.sampled})
        self.tracker.set_tags(round_tags(report))


def round_tags(report: RoundReport) -> dict[str, str]:
    """MLflow tags of one round: what each site sent (as its audit trail records it), who declined, who was
    missing or rejected, and why an aggregate was not applied."""
    r, tags = report.round, {}
    tags.update({keys.payload_tag(r, site): digest for site, digest in report.payload_sha256.items()})
    if report.declined:
        tags[f"round_{r:04d}_declined"] = "; ".join(f"{s}: {why}" for s, why in report.declined.items())
    if report.not_applied:
        tags[keys.round_tag(r, "not_applied")] = report.not_applied
    if report.missing or report.rejected:
        tags[f"round_{r:04d}_missing"] = ",".join(report.missing) or "-"
        tags[f"round_{r:04d}_rejected"] = "; ".join(f"{s}: {why}" for s, why in report.rejected.items()) or "-"
    return tags
