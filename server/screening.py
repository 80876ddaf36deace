"""What the server decides about each reply before anything is aggregated.

* :class:`SiteIdentities`: which site a reply belongs to.  A reply is attributed by the
  node that sent it, never by the name it carries: the first node to use a name in a run
  owns it (with SuperNode authentication the registry of registered keys decides), and a
  second node claiming a taken name is refused with ``duplicate site name``.
* :func:`read_update`: a train reply is aggregated only when its one flat adapter array
  decodes against its own metadata, has the agreed layout's dtype and length, is finite
  (checked once, on the widened float32 values) and its example count is a positive
  finite number; :func:`check_update` is the same verdict without the values.
* :func:`aggregate_metrics`: example-weighted, NaN-aware means of the sites' metrics
  under their MLflow names (:func:`nearl_protocol.keys.mlflow_name`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping

import numpy as np
from flwr.app import RecordDict

from nearl_core.errors import ConfigError
from nearl_core.transport import wire_schema, widen_flat
from nearl_protocol import keys
from nearl_protocol.arrays import PayloadError
from nearl_protocol.flat import FlatLayout
from nearl_protocol.messages import metrics_of
from nearl_protocol.schema import Schema

DUPLICATE = "duplicate site name"
UNIT_WEIGHT_KEY = "server-dp-weight"  # set to 1 on each received update by server-side DP (equal weights); never logged
MLFLOW_COUNTS = tuple(keys.mlflow_name(k) for k in keys.COUNT_KEYS)  # train_examples, eval_examples, ...
WORKER_FACTS = tuple(keys.mlflow_name(k) for k in keys.WORKER)
WORKER_WARM = keys.mlflow_name(keys.WORKER_WARM)
SPLIT_COUNTS = ((keys.MLFLOW_EVAL_PREFIX, keys.MLFLOW_EVAL_EXAMPLES),  # an evaluation's metrics, and their weight
                (keys.MLFLOW_TEST_PREFIX, keys.MLFLOW_TEST_EXAMPLES),
                (keys.MLFLOW_PERSONAL_PREFIX, keys.MLFLOW_PERSONAL_EXAMPLES))


class SiteIdentities:
    """node id -> site name for one run; ``registered`` comes from the coordinator's key registry."""

    def __init__(self, registered: Mapping[int, str] | None = None):
        self.registered = dict(registered or {})
        self.bound: dict[int, str] = dict(self.registered)
        self.refused: dict[int, str] = {}  # node -> why its replies are refused (told to the node next round)

    def owner(self, name: str) -> int | None:
        return next((n for n, s in self.bound.items() if s == name), None)

    def label(self, node: int) -> str:
        return self.bound.get(node) or f"node-{node}"

    def attribute(self, node: int, claimed: str | None) -> tuple[str, str | None]:
        """(the name this node's reply is recorded under, why it must be refused or None)."""
        if claimed is None:  # an error reply carries no name
            return self.label(node), None
        if node in self.bound:
            own = self.bound[node]
            if claimed == own:
                return own, None
            other = self.owner(claimed)
            why = (f"{DUPLICATE}: {claimed} belongs to node {other}" if other is not None
                   else f"site name {claimed!r} is not this node's ({own})")
            self.refused[node] = why
            return own, why
        other = self.owner(claimed)
        if other is not None:
            why = f"{DUPLICATE}: {claimed} belongs to node {other}"
            self.refused[node] = why
            return f"{claimed}@node-{node}", why
        self.bound[node] = claimed
        return claimed, None


def load_registry(path: str | Path | None, roster: str | Path | None = None) -> dict[int, str]:
    """node id -> site name from the registry file nearl-server writes when it registers site keys.

    With the consortium roster (``nearl-server --roster``) every registered key must be on it
    under the same name: a ConfigError names the first that is not.
    """
    if not path:
        return {}
    raw = json.loads(Path(path).read_text())
    sites = raw.get("sites", {})
    if roster:
        from nearl_protocol.roster import RosterError, check_site_key, load_roster

        pinned = load_roster(Path(roster))
        try:
            for site, entry in sites.items():
                check_site_key(pinned, site, entry["public_key"], f"site registry {path}")
        except RosterError as err:
            raise ConfigError(str(err)) from None
    return {int(entry["node_id"]): site for site, entry in sites.items() if entry.get("node_id")}


def read_update(content: RecordDict, layout: FlatLayout, transport: str = "float32"
                ) -> tuple[np.ndarray | None, str | None]:
    """(the update as one float32 vector in the schema's order, None), or (None, why it must not be aggregated).

    ``layout`` is the wire layout (the schema in the transport dtype).  The array is decoded
    once, in place; only fp16/bf16 payloads are copied, when widened.
    """
    arrays = content.array_records
    if set(arrays) != {keys.ARRAYS}:
        return None, f"expected one ArrayRecord '{keys.ARRAYS}', got {sorted(arrays)}"
    try:
        values = widen_flat(layout.read(arrays[keys.ARRAYS]), transport)
        layout.check_finite(values)
    except PayloadError as err:
        return None, str(err)
    problem = check_metrics(content)
    return (None, problem) if problem else (values, None)


def check_update(content: RecordDict, schema: Schema, transport: str = "float32") -> str | None:
    """Why this train reply (adapters of ``schema`` sent in ``transport``) must not be aggregated, or None."""
    return read_update(content, FlatLayout.of(wire_schema(schema, transport)), transport)[1]


def check_metrics(content: RecordDict) -> str | None:
    if len(content.metric_records) != 1:
        return f"expected one MetricRecord, got {len(content.metric_records)}"
    n = next(iter(content.metric_records.values())).get(keys.NUM_EXAMPLES)
    if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) or n <= 0:
        return f"'{keys.NUM_EXAMPLES}' must be a positive number, got {n!r}"
    return None


def site_metrics(content: RecordDict) -> dict[str, float]:
    """A reply's metrics under their MLflow names (``train_loss``, ``eval_accuracy``, ``dp_steps``)."""
    return {keys.mlflow_name(k): v for k, v in metrics_of(content).items() if k != UNIT_WEIGHT_KEY}


def declined(content: RecordDict) -> bool:
    return metrics_of(content).get(keys.DP_DECLINED) == 1.0


def declined_reason(metrics: Mapping[str, float]) -> str:
    """The one-line reason a site's ledger gives for declining (from its metrics, MLflow names)."""
    return (f"declined: privacy budget (epsilon {metrics.get(keys.MLFLOW_EPSILON, math.nan):.3f} spent, this "
            f"round would reach {metrics.get(keys.MLFLOW_DP_EPSILON_NEXT, math.nan):.3f} > the site's max "
            f"{metrics.get(keys.MLFLOW_DP_MAX_EPSILON, math.nan):g})")


def _weight_key(key: str, sample: Mapping[str, float]) -> str:
    for prefix, count in SPLIT_COUNTS:
        if key.startswith(prefix) and count in sample:
            return count
    return keys.MLFLOW_TRAIN_EXAMPLES


def aggregate_metrics(rows: list[Mapping[str, float]]) -> dict[str, float]:
    """Example-weighted means per key (each key weighted by its own split's count), NaN-aware.

    Count keys are summed; ``epsilon`` becomes ``epsilon_max``, the worst privacy loss over
    sites; the other ``dp_*`` ledger values (steps, sample rate, noise multiplier) are
    per-site facts and are not averaged, nor are ``worker_pid``/``worker_builds``;
    ``worker_warm`` becomes ``sites_warm``, the sites whose worker had the backbone cached.
    """
    out: dict[str, float] = {}
    for key in sorted({k for r in rows for k in r}):
        if key in MLFLOW_COUNTS:
            out[key] = float(sum(r.get(key, 0.0) for r in rows))
        elif key == WORKER_WARM:
            out[keys.MLFLOW_SITES_WARM] = float(sum(r.get(key, 0.0) == 1.0 for r in rows))
        elif key in WORKER_FACTS:  # which process answered, how many builds: per-site, never averaged
            continue
        elif key == keys.MLFLOW_EPSILON:
            eps = [r[key] for r in rows if key in r and math.isfinite(r[key])]
            if eps:
                out[keys.MLFLOW_EPSILON_MAX] = max(eps)
        elif not key.startswith(keys.MLFLOW_DP_PREFIX):
            num = den = 0.0
            for r in rows:
                v, w = r.get(key), r.get(_weight_key(key, r), 0.0)
                if v is not None and math.isfinite(v) and w > 0:
                    num, den = num + w * v, den + w
            out[key] = num / den if den > 0 else math.nan
    return out


def split_metrics(metrics: Mapping[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """(train-side, eval-side) views of one reply's metrics (MLflow names)."""
    evals = {k: v for k, v in metrics.items() if k.startswith(tuple(prefix for prefix, _ in SPLIT_COUNTS))}
    return {k: v for k, v in metrics.items() if k not in evals}, evals
