"""What a federation leaves behind: the kept adapters, the last round's, the registered version, the done event.

``<checkpoint-dir>/final`` holds the adapters of the round selected by federated
validation (:mod:`server.selection`), the run's product: MLflow registers them as a
version of ``nearl-adapters`` whose tags say which round was selected, by what and with
which value.  ``<checkpoint-dir>/last`` holds the last round's adapters, for comparison or
to continue from; both are adapter folders that ``nearl evaluate`` and ``nearl predict`` load.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from nearl_core.adapter_io import package_version, save_adapters, set_shared_state
from nearl_core.model import NearlCLIP
from nearl_protocol import keys
from nearl_protocol.schema import Schema
from server.events import DoneEvent, ProgressWriter
from server.loop import Kept
from server.round_log import RoundLog, arrays_to_numpy
from server.settings import FederationSettings
from server.tracking import Tracker

REGISTERED_MODEL = keys.MLFLOW_REGISTERED_MODEL


def adapter_folders(root: Path | None, workdir: str | Path | None) -> tuple[Path, Path]:
    """(kept, last): under the checkpoint directory, else in the working directory."""
    if root is not None:
        return root / "final", root / "last"
    base = Path(workdir or os.getcwd())
    return base / "final_adapters", base / "last_adapters"


def selected_value(listener: RoundLog, kept: Kept) -> float | None:
    """The selection metric of the kept round (None when it was kept for want of any finite value)."""
    s = listener.selection
    return s.best_value if kept.round == s.best_round and s.best_value is not None else None


def selection_tags(settings: FederationSettings, listener: RoundLog, kept: Kept) -> dict[str, str]:
    """Which round was kept and why: tags of the MLflow run and of the registered version."""
    value = selected_value(listener, kept)
    tags = {"selected_round": str(kept.round), "select_by": settings.select_by,
            "selected_value": "n/a" if value is None else f"{value:.6g}", "rounds": str(kept.last_round)}
    if kept.stopped:
        tags["stopped_early"] = kept.stopped
    return tags


def provenance(fingerprint: str, settings: FederationSettings, listener: RoundLog, kept: Kept) -> dict[str, str]:
    """Tags of a registered ``nearl-adapters`` version: where the model came from, which round it is, what it cost."""
    tags = {"backbone_fingerprint": fingerprint, "code_version": package_version(), "strategy": settings.strategy,
            "sites": ",".join(sorted(listener.contributors)) or "-", **selection_tags(settings, listener, kept)}
    tags.update({f"epsilon/{site}": f"{eps:.6g}" for site, eps in sorted(listener.final_epsilon.items())})
    return tags


def write_adapters(model: NearlCLIP, schema: Schema, arrays: ArrayRecord, folder: Path, extra: dict[str, Any]) -> Path:
    set_shared_state(model, {k: np.array(v) for k, v in arrays_to_numpy(arrays, schema).items()})
    save_adapters(model, folder, extra, overwrite=True)
    return folder


def save_outputs(model: NearlCLIP, schema: Schema, kept: Kept, *, settings: FederationSettings, listener: RoundLog,
                 tracker: Tracker | None, progress: ProgressWriter, fingerprint: str,
                 workdir: str | Path | None) -> dict[str, Any]:
    """Write ``final`` and ``last``, log and register them, end the MLflow run and emit the done event."""
    final_dir, last_dir = adapter_folders(settings.checkpoint_path(), workdir)
    run_id = tracker.run_id if tracker else None
    value = selected_value(listener, kept)
    common = {"federation_rounds": kept.last_round, "strategy": settings.strategy, "mlflow_run_id": run_id}
    write_adapters(model, schema, kept.last_arrays, last_dir, {**common, "round": kept.last_round})
    write_adapters(model, schema, kept.arrays, final_dir, {**common, "round": kept.round, "selected_round": kept.round,
                                                           "select_by": settings.select_by, "selected_value": value})
    version = None
    if tracker is not None:
        tracker.set_tags(selection_tags(settings, listener, kept))
        tracker.log_adapters(last_dir, "last_adapters")
        version = tracker.log_adapters(final_dir, "final_adapters", registered_name=REGISTERED_MODEL,
                                       version_tags=provenance(fingerprint, settings, listener, kept))
        tracker.end("FINISHED")
    progress.emit(DoneEvent(round=kept.last_round, adapters=str(final_dir.resolve()), run_id=run_id,
                            model_version=version, selected_round=kept.round, select_by=settings.select_by,
                            selected_value=value if value is not None and math.isfinite(value) else None,
                            last_adapters=str(last_dir.resolve()), stopped=kept.stopped, test=listener.final_test))
    return {"adapters": final_dir, "last_adapters": last_dir, "run_id": run_id, "rounds": kept.last_round,
            "selected_round": kept.round}
