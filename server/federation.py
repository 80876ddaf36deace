"""The ServerApp's work: build the initial adapters, run the rounds, keep the best, log, checkpoint, resume.

:func:`run_federation` is what ``server.app``'s ``@app.main()`` calls.  Per round the
:class:`server.round_log.RoundLog` listener logs the round to MLflow, ranks its federated
validation, writes a checkpoint and appends a JSON line to the progress file
(:mod:`server.events`) that ``nearl-server`` streams to the terminal.  :mod:`server.loop`
runs the rounds (stopping early with ``patience``) and the evaluations after them;
:mod:`server.outputs` writes what the run leaves: the selected round's adapters as the
final ones, the last round's beside them.
"""

from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from nearl_core.adapter_io import shared_schema, shared_state
from nearl_core.config import NearlConfig, config_sha256
from nearl_core.errors import NearlError
from nearl_core.fingerprint import model_fingerprint
from nearl_core.model import NearlCLIP, build_model
from nearl_core.transport import wire_schema
from nearl_protocol.messages import instruction_config
from nearl_protocol.schema import Schema, parameter_count, payload_bytes
from server.central_dp import NearlServerSideDP
from server.checkpoint import Checkpoint, CheckpointError, check_schema, complete_rounds, load_latest
from server.events import ErrorEvent, ProgressWriter, StartEvent
from server.loop import Kept, finish, run_rounds
from server.outputs import save_outputs
from server.quick_grid import QuickPollGrid
from server.round_log import RoundLog, numpy_to_arrays
from server.screening import load_registry
from server.selection import Selection
from server.settings import FederationSettings
from server.strategy import make_strategy
from server.tracking import Tracker, resolve_tracking_uri

log = logging.getLogger("nearl.federation")


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


def resumed_selection(ckpt: Checkpoint | None, settings: FederationSettings, schema) -> dict[str, Any]:
    """The best-so-far a checkpoint kept (``selection`` and ``best`` of :class:`RoundLog`); none for a new run."""
    if ckpt is None:
        return {}
    kept = ckpt.meta.get("selection") or {}
    if kept.get("by") not in (None, settings.select_by):
        raise CheckpointError(f"{ckpt.path} selects rounds by {kept['by']}, not {settings.select_by}; resume with "
                              f"--select-by {kept['by']}")
    if ckpt.best is None:
        return {"selection": Selection(settings.select_by)}
    check_schema(ckpt.best, schema, f"{ckpt.path} (best adapters)")
    return {"selection": Selection.from_state(kept, settings.select_by), "best": numpy_to_arrays(ckpt.best)}


def build_server_model(settings: FederationSettings) -> NearlCLIP:
    cfg = settings.nearl_config()
    return build_model(cfg, cfg.task.classes)


def starting_point(settings: FederationSettings, model: NearlCLIP, schema: Schema
                   ) -> tuple[Checkpoint | None, ArrayRecord]:
    """The checkpoint a resumed run continues (None for a new run) and the global adapters it starts from."""
    root = settings.checkpoint_path()
    if not settings.resume:
        if root is not None and complete_rounds(root):
            raise CheckpointError(f"{root} already holds checkpoints of an earlier run; resume it or choose "
                                  "another checkpoint directory")
        return None, ArrayRecord({k: v.contiguous() for k, v in shared_state(model).items()})
    if root is None:
        raise CheckpointError("resume needs a checkpoint directory")
    ckpt = load_latest(root)
    check_schema(ckpt.arrays, schema, str(ckpt.path))
    if ckpt.meta.get("strategy") not in (None, settings.strategy):
        raise CheckpointError(f"{ckpt.path} was written by strategy {ckpt.meta.get('strategy')}, "
                              f"not {settings.strategy}; resume with the same strategy")
    return ckpt, numpy_to_arrays(ckpt.arrays)


def open_tracker(settings: FederationSettings, model: NearlCLIP, schema: Schema, fingerprint: str,
                 ckpt: Checkpoint | None, workdir: str | Path | None) -> tuple[Tracker | None, str]:
    """The run's MLflow run (the checkpoint's, when resuming) with its params; None without a tracking URI."""
    cfg = model.cfg
    uri = resolve_tracking_uri((ckpt.meta.get("mlflow_uri") if ckpt else None) or settings.mlflow_uri, workdir)
    if not uri:
        return None, uri
    tracker = Tracker(uri, settings.mlflow_experiment, run_id=ckpt.mlflow_run_id if ckpt else None,
                      run_name=f"federation-{time.strftime('%Y%m%d-%H%M%S')}",
                      tags={"nearl.strategy": settings.strategy, "nearl.backbone": cfg.model.name})
    tracker.log_params({**cfg.flat(), **settings.params(), "config.sha256": config_sha256(cfg),
                        "backbone": cfg.model.name, "backbone_source": model.backbone_source,
                        "backbone_fingerprint": fingerprint, "strategy": settings.strategy,
                        "trainable_parameters": parameter_count(schema), **privacy_params(cfg, settings)})
    return tracker, uri


def federate(grid: Grid, settings: FederationSettings, cfg: NearlConfig, fingerprint: str, listener: RoundLog,
             ckpt: Checkpoint | None, initial: ArrayRecord) -> Kept:
    """The remaining rounds (stopping early with patience), the last round's validation and the final evaluation
    of the selected adapters; a resumed run with nothing left to run keeps what its checkpoint holds."""
    start_round = ckpt.round if ckpt else 0
    resumed_stop = listener.selection.stop_reason(settings.patience) if ckpt else ""
    if start_round >= settings.num_rounds or resumed_stop:
        return Kept.held(listener, resumed_stop)
    strategy = make_strategy(
        settings.strategy, schema=listener.schema, min_nodes=settings.min_nodes,
        fraction_train=settings.fraction_train, listener=listener, round_offset=start_round,
        total_rounds=settings.num_rounds, evaluate_in_train=settings.evaluate_in_train,
        wait_timeout=settings.wait_timeout, options=settings.strategy_options(), client_lr=cfg.train.lr,
        transport=settings.transport_dtype, registry=load_registry(settings.site_registry, settings.roster),
        secure=settings.secagg_settings())
    if ckpt is not None:
        strategy.load_strategy_state(ckpt.strategy_state)
    runner: Any = strategy
    if settings.central_dp:
        runner = NearlServerSideDP(strategy, noise_multiplier=settings.server_dp_noise,
                                   clipping_norm=settings.server_dp_clip, delta=settings.server_dp_delta,
                                   releases_so_far=start_round)
    config = instruction_config(nearl_config=cfg.to_dict(), transport=settings.transport_dtype, backbone=fingerprint,
                                local_epochs=settings.local_epochs, total_rounds=settings.num_rounds)
    quick = QuickPollGrid(grid, on_arrival=strategy.replies_arrived)  # screened while the round waits
    run = run_rounds(runner, quick, initial=initial, start_round=start_round,
                     rounds=settings.num_rounds - start_round, timeout=settings.round_timeout, train_config=config,
                     evaluate_config=config, stop_reason=lambda: listener.selection.stop_reason(settings.patience))
    return finish(strategy, quick, listener, run, evaluate_config=config, timeout=settings.round_timeout,
                  validated=not settings.evaluate_in_train)


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
        ckpt, initial = starting_point(settings, model, schema)
        start_round = ckpt.round if ckpt else 0
        tracker, uri = open_tracker(settings, model, schema, fingerprint, ckpt, workdir)
        ckpt_meta = {"mlflow_run_id": tracker.run_id if tracker else None, "mlflow_uri": uri,
                     "strategy": settings.strategy, "num_rounds": settings.num_rounds, "config": cfg.to_dict(),
                     "schema": {k: [list(s), d] for k, (s, d) in schema.items()}}
        listener = RoundLog(settings, tracker, progress, schema, ckpt_meta, initial=initial, start_round=start_round,
                            **resumed_selection(ckpt, settings, schema))
        progress.emit(StartEvent(
            rounds=settings.num_rounds, start_round=start_round + 1, strategy=settings.strategy,
            min_nodes=settings.min_nodes, run_id=tracker.run_id if tracker else None, mlflow_uri=uri,
            payload_bytes=payload_bytes(wire_schema(schema, settings.transport_dtype)),
            trainable_parameters=parameter_count(schema), backbone=fingerprint, resumed=ckpt is not None,
            settings=settings.to_run_config(), config=cfg.to_dict(), config_sha256=config_sha256(cfg)))
        kept = federate(grid, settings, cfg, fingerprint, listener, ckpt, initial)
        return save_outputs(model, schema, kept, settings=settings, listener=listener, tracker=tracker,
                            progress=progress, fingerprint=fingerprint, workdir=workdir)
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
