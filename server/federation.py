"""The ServerApp's work: build the initial adapters, run the strategy, log, checkpoint, resume.

:func:`run_federation` is what ``server.app``'s ``@app.main()`` calls.  Per round the
:class:`RoundLog` listener logs the round to MLflow, writes a checkpoint and appends a
JSON line to the progress file (:mod:`server.events`) that ``nearl-server`` streams to the terminal.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.serverapp import Grid

from nearl_core.adapter_io import package_version, save_adapters, set_shared_state, shared_schema, shared_state
from nearl_core.config import config_sha256
from nearl_core.errors import NearlError
from nearl_core.fingerprint import model_fingerprint
from nearl_core.model import NearlCLIP, build_model
from nearl_core.transport import wire_schema
from nearl_protocol import keys
from nearl_protocol.messages import instruction_config
from nearl_protocol.schema import parameter_count, payload_bytes
from server.central_dp import NearlServerSideDP
from server.checkpoint import Checkpoint, CheckpointError, check_schema, complete_rounds, load_latest, save_checkpoint
from server.events import DoneEvent, ErrorEvent, EvalEvent, ProgressWriter, RoundEvent, StartEvent
from server.quick_grid import QuickPollGrid
from server.screening import DUPLICATE, load_registry
from server.settings import FederationSettings
from server.strategy import NearlStrategyMixin, RoundReport, make_strategy
from server.tracking import Tracker, resolve_tracking_uri

log = logging.getLogger("nearl.federation")
REGISTERED_MODEL = "nearl-adapters"


def arrays_to_numpy(arrays: ArrayRecord, schema) -> dict[str, np.ndarray]:
    return {k: arrays[k].numpy().astype(schema[k][1], copy=False) for k in schema}


def numpy_to_arrays(values: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in values.items()})


class RoundLog:
    """Listener of :class:`NearlStrategyMixin`: MLflow, checkpoints and progress after each round."""

    def __init__(self, settings: FederationSettings, tracker: Tracker | None, progress: ProgressWriter,
                 model: NearlCLIP, ckpt_meta: dict[str, Any]):
        self.settings, self.tracker, self.progress, self.model = settings, tracker, progress, model
        self.ckpt_meta = ckpt_meta
        self.schema = shared_schema(model)
        self.last_eval: tuple[int, dict[str, float]] | None = None
        self.final_arrays: ArrayRecord | None = None
        self.seen_sites: set[str] = set()
        self.final_epsilon: dict[str, float] = {}  # site -> the last epsilon it reported (DP)
        self.contributors: set[str] = set()  # sites whose update was aggregated at least once

    def evaluated(self, step: int, metrics: dict[str, float], per_site: dict[str, dict[str, float]]) -> None:
        flat = dict(metrics)
        for site, values in per_site.items():
            flat.update({f"{site}/{k}": v for k, v in values.items()})
        if self.tracker is not None:
            self.tracker.log_metrics(flat, step=step)
        self.last_eval = (step, metrics)
        self.progress.emit(EvalEvent(step=step, metrics=metrics, sites=per_site))

    def round_finished(self, report: RoundReport, strategy: NearlStrategyMixin) -> None:
        self.seen_sites.update(report.answered)
        self.seen_sites.update(report.missing)
        flat: dict[str, float] = dict(report.train_metrics)
        flat.update({keys.MLFLOW_ROUND_SECONDS: report.seconds, keys.MLFLOW_BYTES_SENT: report.bytes_sent,
                     keys.MLFLOW_BYTES_RECEIVED: report.bytes_received,
                     keys.MLFLOW_SITES_ANSWERED: len(report.answered), keys.MLFLOW_SITES_MISSING: len(report.missing),
                     keys.MLFLOW_SITES_REJECTED: len(report.rejected), keys.MLFLOW_SITES_DECLINED: len(report.declined),
                     keys.MLFLOW_SITES_DUPLICATE: sum(DUPLICATE in why for why in report.rejected.values())})
        for site, values in report.per_site.items():
            flat.update({f"{site}/{k}": v for k, v in values.items()})
            if keys.MLFLOW_EPSILON in values:
                self.final_epsilon[site] = values[keys.MLFLOW_EPSILON]
        self.contributors.update(report.payload_sha256)
        for site in sorted(self.seen_sites):
            flat[f"{site}/{keys.MLFLOW_ANSWERED}"] = 1.0 if site in report.answered else 0.0
        if self.tracker is not None:
            self.tracker.log_metrics(flat, step=report.round)
            if report.round == self.settings_first_round:
                self.tracker.log_params({"num_sites": report.sampled})
            if report.payload_sha256:  # what each site sent, as its own audit trail records it
                self.tracker.set_tags({f"payload_sha256/round_{report.round:04d}/{site}": digest
                                       for site, digest in report.payload_sha256.items()})
            if report.declined:
                self.tracker.set_tags({f"round_{report.round:04d}_declined":
                                       "; ".join(f"{s}: {r}" for s, r in report.declined.items())})
            if report.not_applied:
                self.tracker.set_tags({f"round_{report.round:04d}_not_applied": report.not_applied})
            if report.missing or report.rejected:
                self.tracker.set_tags({f"round_{report.round:04d}_missing": ",".join(report.missing) or "-",
                                       f"round_{report.round:04d}_rejected":
                                           "; ".join(f"{s}: {r}" for s, r in report.rejected.items()) or "-"})
        self.final_arrays = report.arrays
        ckpt_path = None
        root = self.settings.checkpoint_path()
        if root is not None:
            ckpt = Checkpoint(round=report.round, arrays=arrays_to_numpy(report.arrays, self.schema),
                              strategy_state=strategy.strategy_state(), meta=self.ckpt_meta)
            ckpt_path = str(save_checkpoint(root, ckpt, keep=self.settings.keep_checkpoints))
        eval_step, eval_metrics = self.last_eval if self.last_eval else (None, {})
        self.progress.emit(RoundEvent(
            round=report.round, rounds=self.settings.num_rounds, answered=report.answered,
            missing=report.missing, rejected=report.rejected, declined=report.declined, sampled=report.sampled,
            aggregated=report.aggregated, not_applied=report.not_applied, payload_sha256=report.payload_sha256,
            seconds=report.seconds, bytes_sent=report.bytes_sent, bytes_received=report.bytes_received,
            train=report.train_metrics, eval_step=eval_step, eval=eval_metrics, checkpoint=ckpt_path))

    settings_first_round = 1


def privacy_params(cfg, settings: FederationSettings) -> dict[str, Any]:
    """Run parameters that say which guarantees were asked for: sample-level at the sites, client-level here."""
    p, out = cfg.privacy, {}
    if p.enabled:
        out.update(dp="client-side DP-SGD (sample-level)",
                   dp_delta=p.delta if p.delta is not None else "per site, below 1/N",
                   dp_target_epsilon=p.target_epsilon if p.target_epsilon is not None else "-",
                   dp_max_grad_norm=p.max_grad_norm)
    if settings.central_dp:
        out.update(server_dp="server-side fixed clipping (client-level)", server_dp_delta=settings.server_dp_delta)
    return out or {"dp": "off"}


def provenance(fingerprint: str, settings: FederationSettings, listener: RoundLog) -> dict[str, str]:
    """Tags of a registered ``nearl-adapters`` version: where the model came from and what it cost."""
    tags = {"backbone_fingerprint": fingerprint, "code_version": package_version(),
            "rounds": str(settings.num_rounds), "strategy": settings.strategy,
            "sites": ",".join(sorted(listener.contributors)) or "-"}
    tags.update({f"epsilon/{site}": f"{eps:.6g}" for site, eps in sorted(listener.final_epsilon.items())})
    return tags


def build_server_model(settings: FederationSettings) -> NearlCLIP:
    cfg = settings.nearl_config()
    return build_model(cfg, cfg.task.classes)


def run_federation(grid: Grid, run_config: dict[str, Any], workdir: str | Path | None = None) -> dict[str, Any]:
    """Run (or resume) a federation; returns a summary. Raises on failure after recording it."""
    progress = ProgressWriter(str(run_config.get("progress-file") or "") or None)  # so that a bad key is reported too
    tracker: Tracker | None = None
    try:
        settings = FederationSettings.from_run_config(run_config)
        model = build_server_model(settings)
        cfg = model.cfg
        schema = shared_schema(model)  # without the groups federation.local keeps at the sites
        fingerprint = model_fingerprint(model)
        start_round, ckpt = 0, None
        root = settings.checkpoint_path()
        if settings.resume:
            if root is None:
                raise CheckpointError("resume needs a checkpoint directory")
            ckpt = load_latest(root)
            check_schema(ckpt.arrays, schema, str(ckpt.path))
            if ckpt.meta.get("strategy") not in (None, settings.strategy):
                raise CheckpointError(f"{ckpt.path} was written by strategy {ckpt.meta.get('strategy')}, "
                                      f"not {settings.strategy}; resume with the same strategy")
            start_round = ckpt.round
            initial = numpy_to_arrays(ckpt.arrays)
        else:
            if root is not None and complete_rounds(root):
                raise CheckpointError(f"{root} already holds checkpoints of an earlier run; resume it or choose "
                                      "another checkpoint directory")
            initial = ArrayRecord({k: v.contiguous() for k, v in shared_state(model).items()})
        uri = resolve_tracking_uri((ckpt.meta.get("mlflow_uri") if ckpt else None) or settings.mlflow_uri, workdir)
        if uri:
            tracker = Tracker(uri, settings.mlflow_experiment, run_id=ckpt.mlflow_run_id if ckpt else None,
                              run_name=f"federation-{time.strftime('%Y%m%d-%H%M%S')}",
                              tags={"nearl.strategy": settings.strategy, "nearl.backbone": cfg.model.name})
            tracker.log_params({**cfg.flat(), **settings.params(), "config.sha256": config_sha256(cfg),
                                "backbone": cfg.model.name,
                                "backbone_source": model.backbone_source, "backbone_fingerprint": fingerprint,
                                "strategy": settings.strategy, "trainable_parameters": parameter_count(schema),
                                **privacy_params(cfg, settings)})
        payload = payload_bytes(wire_schema(schema, settings.transport_dtype))
        ckpt_meta = {"mlflow_run_id": tracker.run_id if tracker else None, "mlflow_uri": uri,
                     "strategy": settings.strategy, "num_rounds": settings.num_rounds, "config": cfg.to_dict(),
                     "schema": {k: [list(s), d] for k, (s, d) in schema.items()}}
        listener = RoundLog(settings, tracker, progress, model, ckpt_meta)
        listener.settings_first_round = start_round + 1
        remaining = settings.num_rounds - start_round
        progress.emit(StartEvent(
            rounds=settings.num_rounds, start_round=start_round + 1, strategy=settings.strategy,
            min_nodes=settings.min_nodes, run_id=tracker.run_id if tracker else None, mlflow_uri=uri,
            payload_bytes=payload, trainable_parameters=parameter_count(schema), backbone=fingerprint,
            resumed=ckpt is not None, settings=settings.to_run_config(), config=cfg.to_dict(),
            config_sha256=config_sha256(cfg)))
        strategy = make_strategy(
            settings.strategy, schema=schema, min_nodes=settings.min_nodes, fraction_train=settings.fraction_train,
            listener=listener, round_offset=start_round, total_rounds=settings.num_rounds,
            evaluate_in_train=settings.evaluate_in_train, wait_timeout=settings.wait_timeout,
            options=settings.strategy_options(), client_lr=cfg.train.lr, transport=settings.transport_dtype,
            registry=load_registry(settings.site_registry, settings.roster), secure=settings.secagg_settings())
        if ckpt is not None:
            strategy.load_strategy_state(ckpt.strategy_state)
        runner = strategy
        if settings.central_dp:
            runner = NearlServerSideDP(strategy, noise_multiplier=settings.server_dp_noise,
                                       clipping_norm=settings.server_dp_clip, delta=settings.server_dp_delta,
                                       releases_so_far=start_round)
        final = initial
        if remaining > 0:
            common = dict(nearl_config=cfg.to_dict(), transport=settings.transport_dtype, backbone=fingerprint)
            train_config = instruction_config(**common, local_epochs=settings.local_epochs,
                                              total_rounds=settings.num_rounds)
            eval_config = instruction_config(**common, local_epochs=settings.local_epochs,
                                             total_rounds=settings.num_rounds)  # the last one personalizes
            quick = QuickPollGrid(grid, on_arrival=strategy.replies_arrived)  # screened while the round waits
            result = runner.start(grid=quick, initial_arrays=initial, num_rounds=remaining,
                                  timeout=settings.round_timeout, train_config=train_config,
                                  evaluate_config=eval_config)
            final = listener.final_arrays or (result.arrays if len(result.arrays) else initial)
        set_shared_state(model, {k: np.array(v) for k, v in arrays_to_numpy(final, schema).items()})
        out_dir = (root / "final") if root is not None else Path(workdir or os.getcwd()) / "final_adapters"
        save_adapters(model, out_dir, {"federation_rounds": settings.num_rounds, "strategy": settings.strategy,
                                       "mlflow_run_id": tracker.run_id if tracker else None}, overwrite=True)
        version = None
        if tracker is not None:
            version = tracker.log_adapters(out_dir, "final_adapters", registered_name=REGISTERED_MODEL,
                                           version_tags=provenance(fingerprint, settings, listener))
            tracker.end("FINISHED")
        progress.emit(DoneEvent(round=settings.num_rounds, adapters=str(out_dir.resolve()),
                                run_id=tracker.run_id if tracker else None, model_version=version))
        return {"adapters": out_dir, "run_id": tracker.run_id if tracker else None, "rounds": settings.num_rounds}
    except BaseException as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        if not isinstance(err, NearlError) and type(err).__name__ != "NotEnoughSites":
            message = f"{type(err).__name__}: {message}"
            log.error("federation failed:\n%s", traceback.format_exc())
        progress.emit(ErrorEvent(message=message))
        if tracker is not None:
            try:
                tracker.set_tags({"error": message[:500]})
                tracker.end("FAILED")
            except Exception:  # noqa: BLE001 - the original error matters more
                pass
        raise
