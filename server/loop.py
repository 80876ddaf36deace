"""The rounds and what follows them: Flower's round loop, early stopping, and the evaluations after the last round.

:func:`run_rounds` is the loop of Flower's ``Strategy.start()`` (configure, send, aggregate;
train, then the evaluate phase) with one addition: after each round it asks whether the
run should stop (patience, :mod:`server.selection`), and stops there.  A site is then
simply not asked for the rounds that are not run, so it spends no privacy budget on them.

:func:`finish` then runs the two evaluations that decide and describe the kept model:

1. the federated validation of the last round's adapters, when no round has carried it
   yet (with in-train evaluation a round's validation arrives with the next round's
   train message, and there is no next round);
2. the *final evaluation* of the selected adapters: every site evaluates them on its test
   split and, when the config personalizes, fine-tunes from them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from nearl_protocol import keys
from server.round_log import RoundLog
from server.strategy import NearlStrategyMixin

log = logging.getLogger("nearl.federation")


@dataclass
class Kept:
    """A federation's result: the selected round and its adapters, the last round run and its adapters."""

    round: int
    arrays: ArrayRecord
    last_round: int
    last_arrays: ArrayRecord
    stopped: str = ""  # why the run stopped before its planned rounds ('' = it ran them all)

    @classmethod
    def held(cls, listener: RoundLog, stopped: str = "") -> "Kept":
        """What the listener holds now (a resumed run with no round left to run)."""
        selected, arrays = listener.selected()
        return cls(selected, arrays, listener.last_round, listener.final_arrays, stopped)


@dataclass
class RoundsRun:
    """What the loop leaves: the last round it ran (global number), its global adapters, why it stopped early."""

    last_round: int
    arrays: ArrayRecord
    stopped: str = ""  # '' = every planned round ran


def run_rounds(runner: Any, grid: Grid, *, initial: ArrayRecord, start_round: int, rounds: int, timeout: float,
               train_config: ConfigRecord, evaluate_config: ConfigRecord,
               stop_reason: Callable[[], str]) -> RoundsRun:
    """Rounds 1..``rounds`` after ``start_round`` (Flower's numbering: ``runner`` maps them onto global rounds).

    ``runner`` is the strategy or the server-side DP wrapper around it.  ``stop_reason`` is
    asked after every round but the last; a non-empty answer ends the run there.
    """
    arrays = initial
    for server_round in range(1, rounds + 1):
        replies = grid.send_and_receive(runner.configure_train(server_round, arrays, ConfigRecord(dict(train_config)),
                                                               grid), timeout=timeout)
        aggregated, _ = runner.aggregate_train(server_round, replies)
        arrays = aggregated if aggregated is not None else arrays
        messages = runner.configure_evaluate(server_round, arrays, ConfigRecord(dict(evaluate_config)), grid)
        runner.aggregate_evaluate(server_round, grid.send_and_receive(messages, timeout=timeout))
        why = stop_reason() if server_round < rounds else ""
        if why:
            log.info("stopping after round %d: %s", start_round + server_round, why)
            return RoundsRun(start_round + server_round, arrays, why)
    return RoundsRun(start_round + rounds, arrays)


def evaluate_at_sites(strategy: NearlStrategyMixin, grid: Grid, *, server_round: int, arrays: ArrayRecord,
                      config: ConfigRecord, final: bool, timeout: float
                      ) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """One evaluate message of ``arrays`` to the sites; the weighted means and each site's metrics."""
    config = ConfigRecord({**dict(config), keys.FINAL_EVALUATION: final})
    messages = strategy.evaluation_messages(server_round, arrays, config, grid)
    return strategy.evaluation_results(grid.send_and_receive(messages, timeout=timeout))


def finish(strategy: NearlStrategyMixin, grid: Grid, listener: RoundLog, run: RoundsRun, *,
           evaluate_config: ConfigRecord, timeout: float, validated: bool) -> Kept:
    """Validate the last round when needed (``validated``: a round's own evaluate message did), then evaluate
    the selected adapters at the sites."""
    common = dict(server_round=run.last_round, config=evaluate_config, timeout=timeout)
    if not validated:
        metrics, per_site = evaluate_at_sites(strategy, grid, arrays=run.arrays, final=False, **common)
        if per_site:
            listener.evaluated(run.last_round, metrics, per_site)
    selected, arrays = listener.selected()
    log.info("selected round %d of %d by validation %s", selected, run.last_round, listener.selection.by)
    metrics, per_site = evaluate_at_sites(strategy, grid, arrays=arrays, final=True, **common)
    listener.tested(selected, metrics, per_site)
    return Kept(selected, arrays, run.last_round, run.arrays, run.stopped)
