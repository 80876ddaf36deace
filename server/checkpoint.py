"""Round checkpoints: global adapters + round number + strategy state + MLflow run id.

Layout of a checkpoint directory::

    DIR/round-0003/adapters.safetensors   global adapter tensors after round 3
    DIR/round-0003/strategy.safetensors   the strategy's arrays (e.g. FedAdam moments), may be empty
    DIR/round-0003/best.safetensors       the global adapters of the best round so far by federated
                                          validation (server.selection), once one is known
    DIR/round-0003/state.json             round, MLflow run id and URI, strategy name, config, schema,
                                          the selection (which round is best, by what, how long ago)

Each round carries its own copy of the best adapters, so the newest complete round alone
is enough to resume with the best-so-far (a damaged newest round falls back to the one
before, best adapters included).

A round is written into a hidden temporary directory first (files fsync'ed), and only
then renamed to ``round-NNNN``: a rename within one file system is atomic, so a crash
leaves either the complete checkpoint or a ``.tmp-`` directory that is never loaded.
``state.json`` is written last and must parse, so a directory without it is skipped too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from safetensors.numpy import load_file, save_file

from nearl_core.errors import NearlError
from nearl_protocol.schema import Schema, schema_problem

ROUND_DIR = re.compile(r"^round-(\d{4,})$")
STATE_FILE = "state.json"
ADAPTERS_FILE = "adapters.safetensors"
STRATEGY_FILE = "strategy.safetensors"
BEST_FILE = "best.safetensors"
FORMAT = "nearl-checkpoint/1"


class CheckpointError(NearlError):
    """A checkpoint directory is missing, empty or does not fit this federation."""


@dataclass
class Checkpoint:
    round: int
    arrays: dict[str, np.ndarray]
    strategy_state: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    best: dict[str, np.ndarray] | None = None  # the best round's global adapters (meta["selection"] says which)

    @property
    def mlflow_run_id(self) -> str | None:
        return self.meta.get("mlflow_run_id")


def round_dir(root: Path, server_round: int) -> Path:
    return Path(root) / f"round-{server_round:04d}"


def save_checkpoint(root: str | Path, ckpt: Checkpoint, *, keep: int = 3) -> Path:
    """Write ``ckpt`` atomically; keep the ``keep`` most recent rounds (0 = keep all)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = round_dir(root, ckpt.round)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-round-{ckpt.round:04d}-"))
    try:
        save_file({k: np.asarray(v, order="C") for k, v in ckpt.arrays.items()}, str(tmp / ADAPTERS_FILE))
        flat_state = {f"{attr}/{k}": np.asarray(v, order="C")
                      for attr, values in ckpt.strategy_state.items() for k, v in values.items()}
        save_file(flat_state, str(tmp / STRATEGY_FILE))
        if ckpt.best is not None:
            save_file({k: np.asarray(v, order="C") for k, v in ckpt.best.items()}, str(tmp / BEST_FILE))
        meta = {"format": FORMAT, **ckpt.meta, "round": ckpt.round,
                "strategy_attrs": sorted(ckpt.strategy_state)}
        (tmp / STATE_FILE).write_text(json.dumps(meta, indent=2, default=str))
        for f in tmp.iterdir():
            _fsync(f)
        if final.exists():  # the same round written again (e.g. a resumed run): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep > 0:
        for old in complete_rounds(root)[:-keep]:
            shutil.rmtree(round_dir(root, old), ignore_errors=True)
    return final


def complete_rounds(root: str | Path) -> list[int]:
    """Round numbers of the complete checkpoints under ``root``, ascending."""
    root = Path(root)
    if not root.is_dir():
        return []
    rounds = []
    for child in root.iterdir():
        m = ROUND_DIR.match(child.name)
        if m and child.is_dir() and all((child / f).is_file() for f in (STATE_FILE, ADAPTERS_FILE, STRATEGY_FILE)):
            rounds.append(int(m.group(1)))
    return sorted(rounds)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read one ``round-NNNN`` directory."""
    path = Path(path)
    try:
        meta = json.loads((path / STATE_FILE).read_text())
        arrays = load_file(str(path / ADAPTERS_FILE))
        flat = load_file(str(path / STRATEGY_FILE))
        best = load_file(str(path / BEST_FILE)) if (path / BEST_FILE).is_file() else None
    except (OSError, json.JSONDecodeError, Exception) as err:  # safetensors raises its own error type
        raise CheckpointError(f"{path}: unreadable checkpoint ({str(err).splitlines()[0]})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a NEARL checkpoint (format {meta.get('format')!r})")
    state: dict[str, dict[str, np.ndarray]] = {a: {} for a in meta.get("strategy_attrs", [])}
    for key, value in flat.items():
        attr, _, name = key.partition("/")
        state.setdefault(attr, {})[name] = value
    return Checkpoint(round=int(meta["round"]), arrays=arrays, strategy_state=state, meta=meta, path=path, best=best)


def load_latest(root: str | Path) -> Checkpoint:
    """The last complete round under ``root``; a clear error when there is none."""
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint directory {root} not found; give the --checkpoint-dir of the earlier run")
    rounds = complete_rounds(root)
    if not rounds:
        raise CheckpointError(f"{root} holds no complete checkpoint; start a new run without --resume")
    errors = []
    for r in reversed(rounds):  # a damaged newest round falls back to the one before
        try:
            return load_checkpoint(round_dir(root, r))
        except CheckpointError as err:
            errors.append(str(err))
    raise CheckpointError("; ".join(errors))


def check_schema(arrays: Mapping[str, np.ndarray], schema: Schema, source: str) -> None:
    """Refuse a checkpoint made for other adapter dimensions."""
    problem = schema_problem(arrays, schema, dtypes=False)
    if problem:
        raise CheckpointError(f"{source}: {problem}; resume with the config of the original run")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync(path)
    except OSError:  # some file systems refuse fsync on directories
        pass
