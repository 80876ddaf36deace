"""MLflow tracking of a federation: one MLflow run per federation, one step per round.

Only the ServerApp imports MLflow (nearl_core never does).  Metric keys (named once in
:mod:`nearl_protocol.keys`, its "MLflow metric names" section):

    train_loss, train_accuracy, eval_loss, eval_accuracy, eval_balanced_accuracy,
    eval_macro_f1, eval_auroc (weighted by examples), <site>/<metric> per site,
    epsilon_max (DP), round_seconds, bytes_sent, bytes_received, sites_answered,
    sites_missing, sites_rejected, sites_declined, <site>/answered (1 or 0);
    with DP per site <site>/epsilon, <site>/dp_steps, <site>/dp_sample_rate,
    <site>/dp_noise_multiplier, <site>/dp_delta (and <site>/dp_declined when it declined)

Step = global round number (step 0 holds the zero-shot evaluation of the initial
adapters).  The default store is ``sqlite:///mlflow.db`` in the working directory
(``mlflow ui --backend-store-uri sqlite:///mlflow.db`` shows it); ``http://host:5000``
points at a shared ``mlflow server``.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Mapping

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

log = logging.getLogger("nearl.tracking")

_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-./ ]")
MAX_PARAM_LEN = 6000


def metric_key(key: str) -> str:
    """MLflow accepts alphanumerics, ``_ - . / space``; anything else becomes ``_``."""
    return _BAD_KEY_CHARS.sub("_", key)


def resolve_tracking_uri(uri: str, workdir: str | Path | None = None) -> str:
    """Make a relative sqlite path absolute (the ServerApp's working directory is the SuperLink's)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str((Path(workdir or os.getcwd()) / uri[len(prefix):]).resolve())
    return uri


def flatten_params(params: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    for k, v in params.items():
        if isinstance(v, (list, tuple)):
            v = ",".join(str(x) for x in v)
        out[metric_key(str(k))] = str(v)[:MAX_PARAM_LEN]
    return out


def finite_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Numeric, finite values only (MLflow stores NaN, but it breaks charts and comparisons)."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(float(v)):
            out[metric_key(k)] = float(v)
    return out


class Tracker:
    """A thin wrapper over ``MlflowClient`` bound to one run; every call is logged, never fatal twice."""

    def __init__(self, uri: str, experiment: str = "nearl-federated", *, run_id: str | None = None,
                 run_name: str | None = None, tags: Mapping[str, str] | None = None):
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self._mlflow = mlflow
        self.client = MlflowClient(tracking_uri=uri)
        if run_id:
            run = self.client.get_run(run_id)  # raises when the run is unknown to this store
            self.run_id = run.info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            self.client.set_tag(self.run_id, "resumed", "true")
        else:
            exp = self.client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
            run = self.client.create_run(exp_id, run_name=run_name, tags=dict(tags or {}))
            self.run_id = run.info.run_id

    # -- logging ---------------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        items = [Param(k, v) for k, v in flatten_params(params).items() if k not in existing]
        self._log_batch("params", items, 100)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """All tags of a call in batched requests (a round with 100 sites logs 100+ payload hashes)."""
        from mlflow.entities import RunTag

        items = [RunTag(metric_key(k), str(v)) for k, v in tags.items()]
        self._log_batch("tags", items, 100)

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> dict[str, float]:
        from mlflow.entities import Metric

        values = finite_metrics(metrics)
        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for k, v in values.items()]
        self._log_batch("metrics", items, 500)
        return values

    def _log_batch(self, kind: str, items: list, size: int) -> None:
        """``items`` as ``log_batch(kind=...)`` requests of at most ``size`` (MLflow caps a request's params
        and tags at 100 each and its metrics at 1000)."""
        for i in range(0, len(items), size):
            self.client.log_batch(self.run_id, **{kind: items[i:i + size]})

    def log_adapters(self, folder: str | Path, artifact_path: str = "final_adapters",
                     registered_name: str | None = None, version_tags: Mapping[str, str] | None = None) -> str | None:
        """Upload the adapter folder; register it as a model version when the store supports it."""
        self.client.log_artifacts(self.run_id, str(folder), artifact_path)
        if not registered_name:
            return None
        try:
            from mlflow.exceptions import MlflowException

            try:
                self.client.get_registered_model(registered_name)
            except MlflowException:
                self.client.create_registered_model(registered_name)
            source = f"runs:/{self.run_id}/{artifact_path}"
            mv = self.client.create_model_version(registered_name, source, run_id=self.run_id,
                                                  tags={metric_key(k): str(v) for k, v in (version_tags or {}).items()})
            return str(mv.version)
        except Exception as err:  # noqa: BLE001 - registry support depends on the store
            log.warning("model registry unavailable at %s (%s); adapters are stored as run artifacts only",
                        self.uri, str(err).splitlines()[0][:200])
            return None

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    # -- reading (tests, progress) -----------------------------------------------------------
    def history(self, key: str) -> dict[int, float]:
        return {m.step: m.value for m in self.client.get_metric_history(self.run_id, key)}
