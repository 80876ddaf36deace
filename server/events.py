"""The ServerApp's progress events: one frozen type per event, their JSON-lines file, its one writer and one reader.

:mod:`server.federation` writes the events; ``nearl-server`` (:mod:`server.cli`,
:mod:`server.progress_view`), the simulation (:mod:`simulation.launch`) and the benchmarks
read them back through :class:`ProgressReader` or :func:`read_all`, so each field is named
here once and a reader gets attributes, not string keys.

On disk, one JSON object per line: ``{"event": <kind>, "time": <unix seconds>, <fields>}``.
Other tools read that file, so the field names and their order never change.  Metric values
that are not finite numbers are written as ``null`` (JSON has no NaN).  A reader ignores a
field it does not know (a newer writer may add one) and refuses an unknown kind or a
missing field.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from time import time as _now
from typing import Any, ClassVar, Mapping, TypeVar, Union

log = logging.getLogger("nearl.federation")  # the ServerApp's log, as each event always was

Metrics = dict[str, Union[float, None]]


def clean_metrics(metrics: Mapping[str, Any]) -> Metrics:
    """Finite numbers kept, anything else ``None``: a chart skips a null, while NaN is not JSON."""
    return {k: (v if isinstance(v, (int, float)) and math.isfinite(v) else None) for k, v in metrics.items()}


def _jsonable(value: Any) -> Any:
    """``json.dumps``'s fallback: numpy scalars as Python numbers, anything else as its text."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    import numpy as np  # only a value the writer did not convert gets here

    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


@dataclass(frozen=True, kw_only=True)
class _Event:
    """What every event carries: its kind (a class constant) and when it was written."""

    kind: ClassVar[str] = ""
    time: float = field(default_factory=_now)

    def to_dict(self) -> dict[str, Any]:
        """The on-disk object: ``event`` and ``time`` first, then the fields in their declared order."""
        return {"event": self.kind, **{f.name: getattr(self, f.name) for f in fields(self)}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), default=_jsonable)


@dataclass(frozen=True, kw_only=True)
class StartEvent(_Event):
    """The run began (or resumed): what it will do and where it is tracked."""

    kind: ClassVar[str] = "start"
    rounds: int
    start_round: int
    strategy: str
    min_nodes: int
    run_id: str | None  # MLflow run; None without tracking
    mlflow_uri: str
    payload_bytes: int  # the adapters on the wire, per site per round and direction
    trainable_parameters: int
    backbone: str  # the frozen backbone's fingerprint
    resumed: bool
    settings: dict[str, Any]  # the federation settings as the ServerApp read them (run-config keys)
    config: dict[str, Any]  # the resolved NEARL config: what every instruction carries to the sites
    config_sha256: str  # nearl_core.config.config_sha256 of it, as recorded in MLflow


@dataclass(frozen=True, kw_only=True)
class EvalEvent(_Event):
    """The global adapters of one step evaluated at the sites (step 0: the initial adapters)."""

    kind: ClassVar[str] = "eval"
    step: int
    metrics: Metrics  # example-weighted means over sites, MLflow names
    sites: dict[str, Metrics]

    def __post_init__(self) -> None:
        object.__setattr__(self, "metrics", clean_metrics(self.metrics))
        object.__setattr__(self, "sites", {s: clean_metrics(v) for s, v in self.sites.items()})


@dataclass(frozen=True, kw_only=True)
class RoundEvent(_Event):
    """One global round finished: who answered, what moved, what was logged and checkpointed."""

    kind: ClassVar[str] = "round"
    round: int
    rounds: int
    answered: list[str]
    missing: list[str]
    rejected: dict[str, str]  # site -> reason
    declined: dict[str, str]  # site -> reason (its privacy budget; not an error)
    sampled: int
    aggregated: bool  # False: no update accepted, the global adapters are unchanged
    not_applied: str  # why the round's aggregate was not applied ('' when it was)
    payload_sha256: dict[str, str]  # site -> hash of the update it sent
    seconds: float
    bytes_sent: int
    bytes_received: int
    train: Metrics  # the round's train metrics, MLflow names
    eval_step: int | None  # the step of the latest evaluation, None before any
    eval: Metrics  # ... and its metrics
    checkpoint: str | None

    def __post_init__(self) -> None:
        object.__setattr__(self, "train", clean_metrics(self.train))
        object.__setattr__(self, "eval", clean_metrics(self.eval))


@dataclass(frozen=True, kw_only=True)
class DoneEvent(_Event):
    """The run is over: the kept adapters (the round selected by federated validation) are saved and tested at
    the sites (and registered when tracked), the last round's adapters beside them."""

    kind: ClassVar[str] = "done"
    round: int  # the last round run (before the planned last one when the run stopped early)
    adapters: str  # folder of the final adapters: the selected round's
    run_id: str | None
    model_version: str | None  # of the registered model ``nearl-adapters``
    selected_round: int  # whose global adapters the federation keeps
    select_by: str  # the validation metric that selected it (server.selection.SELECT_BY)
    selected_value: float | None  # its value for that round; None when no round had a finite one
    last_adapters: str  # folder of the last round's adapters
    stopped: str  # why the run stopped before its planned rounds ('' = it ran them all)
    test: Metrics  # the selected adapters on the sites' test splits (and personalized), example-weighted

    def __post_init__(self) -> None:
        object.__setattr__(self, "test", clean_metrics(self.test))


@dataclass(frozen=True, kw_only=True)
class ErrorEvent(_Event):
    """The run failed; ``message`` is the one line nearl-server prints."""

    kind: ClassVar[str] = "error"
    message: str


Event = Union[StartEvent, EvalEvent, RoundEvent, DoneEvent, ErrorEvent]
KINDS: dict[str, type[Event]] = {c.kind: c for c in (StartEvent, EvalEvent, RoundEvent, DoneEvent, ErrorEvent)}
E = TypeVar("E", StartEvent, EvalEvent, RoundEvent, DoneEvent, ErrorEvent)


def parse(line_or_dict: str | Mapping[str, Any]) -> Event:
    """One event from its JSON line (or the decoded object); ValueError for an unknown kind or a missing field."""
    data = json.loads(line_or_dict) if isinstance(line_or_dict, str) else line_or_dict
    if not isinstance(data, Mapping):
        raise ValueError(f"a progress event is a JSON object, got {type(data).__name__}")
    kind = data.get("event")
    cls = KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ValueError(f"unknown progress event kind {kind!r}; expected one of {', '.join(KINDS)}")
    names = [f.name for f in fields(cls)]
    missing = [n for n in names if n not in data]
    if missing:
        raise ValueError(f"progress event {kind!r} lacks {', '.join(missing)}")
    return cls(**{n: data[n] for n in names})


def select(events: list[Event], cls: type[E]) -> list[E]:
    """The events of one type, in file order."""
    return [e for e in events if isinstance(e, cls)]


class ProgressWriter:
    """Appends one JSON line per event, flushed at once (nearl-server follows the file); logs it too.

    Without a path only the log gets the event, so a run without a progress file (and a
    run whose settings failed before the path was known) still reports.
    """

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None

    def emit(self, event: Event) -> None:
        line = event.to_json()
        log.info("%s", line)
        if self.path is not None:
            with open(self.path, "a") as fh:  # closed, so flushed: the reader may be polling
                fh.write(line + "\n")


class ProgressReader:
    """Reads a progress file while it is written: whole lines only, each once.

    The writer appends a line at a time, so a read can end inside the last one; that part
    is left for the next call.  A missing file has no events yet.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.offset = 0  # bytes of complete lines already returned
        self.line = 0  # their number, for error messages

    def read_new(self) -> list[Event]:
        """The events of the lines completed since the last call."""
        if not self.path.exists():
            return []
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            chunk = fh.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        events = []
        for n, line in enumerate(complete.decode("utf-8").split("\n")[:-1], start=self.line + 1):
            if line.strip():
                try:
                    events.append(parse(line))
                except ValueError as err:
                    raise ValueError(f"{self.path}, line {n}: {err}") from None
        self.offset += len(complete)
        self.line += complete.count(b"\n")
        return events


def read_all(path: str | Path) -> list[Event]:
    """Every complete event of a finished (or failed) run's progress file; FileNotFoundError without one."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no progress file at {path}")
    return ProgressReader(path).read_new()
