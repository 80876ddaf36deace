"""How nearl-server shows a federation: one line per progress event, and the final summary table.

The ServerApp writes the events of :mod:`server.events`; ``nearl-server`` follows the
file and prints :func:`format_event` for each, then :func:`format_summary`.
"""

from __future__ import annotations

import math
from typing import Any

from nearl_protocol import keys
from server.events import DoneEvent, ErrorEvent, EvalEvent, Event, RoundEvent, StartEvent, select
from server.selection import label


def _fmt(v: Any, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


SUMMARY = (keys.MLFLOW_EVAL_LOSS, keys.MLFLOW_EVAL_ACCURACY, keys.MLFLOW_EVAL_BALANCED_ACCURACY,
           keys.MLFLOW_EVAL_MACRO_F1, keys.MLFLOW_EVAL_AUROC)  # the rows of the final table


def format_event(e: Event) -> str:
    """The terminal line of one event ('' for an evaluation after round 0: its round line shows it)."""
    if isinstance(e, StartEvent):
        what = "resuming at" if e.resumed else "starting"
        return (f"{what} round {e.start_round}/{e.rounds}: strategy {e.strategy}, at least "
                f"{e.min_nodes} sites, {e.trainable_parameters:,} adapter parameters "
                f"({e.payload_bytes / 1e6:.2f} MB per site per round), config sha256 {e.config_sha256[:12]}, "
                f"MLflow run {e.run_id}")
    if isinstance(e, RoundEvent):
        return format_round(e)
    if isinstance(e, EvalEvent):
        m = e.metrics
        return "" if e.step > 0 else (f"zero-shot (round 0) eval acc {_fmt(m.get(keys.MLFLOW_EVAL_ACCURACY))} "
                                      f"bal_acc {_fmt(m.get(keys.MLFLOW_EVAL_BALANCED_ACCURACY))}")
    if isinstance(e, DoneEvent):
        return format_done(e)
    if isinstance(e, ErrorEvent):
        return f"ServerApp error: {e.message}"
    raise TypeError(f"not a progress event: {e!r}")


def format_round(e: RoundEvent) -> str:
    """One round: sites, losses, the latest evaluation, time and bytes; then one line per site left out."""
    train, ev = e.train, e.eval
    parts = [f"round {e.round}/{e.rounds}", f"sites {len(e.answered)}/{e.sampled}",
             f"train_loss {_fmt(train.get(keys.MLFLOW_TRAIN_LOSS))}"]
    if (warm := train.get(keys.MLFLOW_SITES_WARM)) is not None:
        parts.append(f"warm {int(warm)}/{len(e.answered)}")
    if (eps := train.get(keys.MLFLOW_EPSILON_MAX)) is not None:
        parts.append(f"eps_max {_fmt(eps, 2)}")
    if e.eval_step is not None:
        parts.append(f"eval@{e.eval_step} acc {_fmt(ev.get(keys.MLFLOW_EVAL_ACCURACY))} "
                     f"bal_acc {_fmt(ev.get(keys.MLFLOW_EVAL_BALANCED_ACCURACY))} "
                     f"loss {_fmt(ev.get(keys.MLFLOW_EVAL_LOSS))}")
    parts.append(f"{e.seconds:.1f}s")
    parts.append(f"sent {e.bytes_sent / 1e6:.2f} MB recv {e.bytes_received / 1e6:.2f} MB")
    line = "  ".join(parts)
    if e.missing:
        line += f"  missing: {', '.join(e.missing)}"
    for site, reason in e.declined.items():
        line += f"\n    {site} {reason}"
    for site, reason in e.rejected.items():  # a site's own say (its policy, its approval) is not a fault
        line += f"\n    {site}: {reason}" if reason.startswith(keys.SITE_SAYS) else f"\n    rejected {site}: {reason}"
    if e.not_applied:
        line += f"\n    update not applied: {e.not_applied}"
    elif not e.aggregated:
        line += "\n    no update accepted this round: global adapters unchanged"
    return line


def format_done(e: DoneEvent) -> str:
    """Why the run ended early (if it did) and where the kept and the last adapters are."""
    version = f", model version {e.model_version}" if e.model_version else ""
    line = (f"done: final adapters in {e.adapters} (round {e.selected_round}); the last round's ({e.round}) in "
            f"{e.last_adapters}; MLflow run {e.run_id}{version}")
    return f"stopped early after round {e.round}: {e.stopped}\n{line}" if e.stopped else line


def format_selected(e: DoneEvent) -> str:
    """``selected round N (balanced accuracy X)``, then how the kept adapters did on the sites' test splits."""
    line = f"selected round {e.selected_round} ({label(e.select_by)} {_fmt(e.selected_value)})"
    test = [(name, e.test.get(key)) for name, key in (("accuracy", keys.MLFLOW_TEST_PREFIX + "accuracy"),
            ("balanced accuracy", keys.MLFLOW_TEST_PREFIX + "balanced_accuracy")) if e.test.get(key) is not None]
    if test:
        line += "; on the sites' test splits: " + ", ".join(f"{name} {_fmt(v)}" for name, v in test)
    return line


def format_summary(events: list[Event]) -> str:
    """The validation of round 0, of the selected round and of the last round side by side, then the selected
    round's line ('' without any evaluation or done event)."""
    evals = {e.step: e for e in select(events, EvalEvent)}
    done = select(events, DoneEvent)
    lines = []
    if evals:
        steps = sorted({min(evals), max(evals), *(d.selected_round for d in done[-1:] if d.selected_round in evals)})
        chosen = done[-1].selected_round if done else None
        heads = [f"round {s}" + (" (sel.)" if s == chosen else "") for s in steps]
        lines += [f"{'validation metric':<26}" + "".join(f"{h:>16}" for h in heads), "-" * (26 + 16 * len(steps))]
        for k in SUMMARY:
            lines.append(f"{k:<26}" + "".join(f"{_fmt(evals[s].metrics.get(k)):>16}" for s in steps))
    if done:
        lines.append(format_selected(done[-1]))
    return "\n".join(lines)
