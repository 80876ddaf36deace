"""The round loop and the evaluations after it, with scripted sites: which messages are sent, with which adapters.

Each scripted site answers at once.  The global adapters after round r hold the value r
everywhere (every train reply returns the received value + 1), and a site's validation of
adapters of value v is ``VAL[v]``: so which round the federation keeps, when patience stops
it, and what the final evaluation carries are known exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from server.events import ProgressWriter
from server.loop import finish, run_rounds
from server.round_log import RoundLog
from server.settings import FederationSettings
from server.strategy import make_strategy
from tests.fed_helpers import FakeGrid, reply_from, train_reply_content

pytestmark = pytest.mark.usefixtures("task_identity")  # strategies build Messages (tests/conftest.py)

SCHEMA = {"a": ((3,), "float32")}
VAL = {0: 0.9, 1: 0.5, 2: 0.7, 3: 0.6, 4: 0.65, 5: 0.7, 6: 0.8, 7: 0.8, 8: 0.8}  # zero-shot's 0.9 is no candidate


def record(value: float) -> ArrayRecord:
    return ArrayRecord({"a": Array(np.full(3, value, np.float32))})


class ScriptedSites(FakeGrid):
    """Two sites that answer every message at once (see the module docstring); ``sent`` keeps every message."""

    def __init__(self):
        super().__init__([1, 2])
        self.sent = []

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.sent += messages
        return [self.answer(m) for m in messages]

    def answer(self, m):
        node, value = m.metadata.dst_node_id, float(m.content["arrays"]["adapters"].numpy()[0])
        site = {"site": f"site{node}"}
        if m.metadata.message_type == "train":
            content = train_reply_content(site["site"], {"a": np.full(3, value + 1, np.float32)}, n=10,
                                          **{"eval-balanced-accuracy": VAL[int(value)], "eval-examples": 5})
            return reply_from(node, content)
        metrics = {"num-examples": 5, "eval-balanced-accuracy": VAL[int(value)]}
        if m.content["config"]["final-evaluation"]:
            metrics.update({"test-accuracy": value / 10, "test-examples": 4})
        content = RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"name": site["site"]})})
        return reply_from(node, content, message_type="evaluate")

    def of(self, kind: str) -> list[tuple[int, float, bool]]:
        """(round, adapter value, final?) of every message of one type, in order."""
        return [(m.content["config"]["server-round"], float(m.content["arrays"]["adapters"].numpy()[0]),
                 bool(m.content["config"].get("final-evaluation", False)))
                for m in self.sent if m.metadata.message_type == kind]


def federate(patience: int, in_train: bool, rounds: int = 8):
    settings = FederationSettings.from_run_config({"num-server-rounds": rounds, "patience": patience,
                                                   "checkpoint-dir": "", "evaluate-in-train": in_train})
    listener = RoundLog(settings, None, ProgressWriter(None), SCHEMA, {}, initial=record(0))
    strategy = make_strategy("fedavg", schema=SCHEMA, min_nodes=2, listener=listener, total_rounds=rounds,
                             evaluate_in_train=in_train)
    grid = ScriptedSites()
    run = run_rounds(strategy, grid, initial=record(0), start_round=0, rounds=rounds, timeout=5,
                     train_config=ConfigRecord(), evaluate_config=ConfigRecord(),
                     stop_reason=lambda: listener.selection.stop_reason(patience))
    kept = finish(strategy, grid, listener, run, evaluate_config=ConfigRecord(), timeout=5, validated=not in_train)
    return kept, grid, listener


def test_in_train_evaluation_patience_stops_one_round_late_and_the_final_evaluation_carries_the_best_round():
    kept, grid, listener = federate(patience=2, in_train=True)
    # validation known after round r: rounds <= r-1; round 2 (0.7) is best, rounds 3 and 4 are worse:
    # known after round 5, so rounds 6..8 are never asked for
    assert [r for r, _, _ in grid.of("train")] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert (kept.round, kept.last_round) == (2, 5)
    assert kept.stopped == ("validation balanced accuracy has not improved for 2 round(s) since round 2 (0.7); "
                            "patience 2")
    # round 5 is validated after the loop (0.7: a tie keeps round 2), then round 2's adapters are tested
    assert grid.of("evaluate") == [(5, 5.0, False), (5, 5.0, False), (5, 2.0, True), (5, 2.0, True)]
    assert np.array_equal(kept.arrays["a"].numpy(), np.full(3, 2.0)) and kept.last_arrays["a"].numpy()[0] == 5.0
    assert listener.final_test == {"test_accuracy": pytest.approx(0.2), "test_examples": 8.0}


def test_a_separate_evaluate_message_per_round_lets_patience_stop_right_after_the_round():
    kept, grid, _ = federate(patience=2, in_train=False)
    assert [r for r, _, _ in grid.of("train")][-1] == 4  # rounds 3 and 4 validated worse than round 2 by then
    assert (kept.round, kept.last_round) == (2, 4)
    assert grid.of("evaluate") == [(r, float(r), False) for r in (1, 2, 3, 4) for _ in (1, 2)] + [(4, 2.0, True)] * 2


def test_without_patience_every_round_runs_and_the_best_validation_is_kept():
    kept, grid, listener = federate(patience=0, in_train=True)
    assert len(grid.of("train")) == 16 and (kept.round, kept.last_round, kept.stopped) == (6, 8, "")  # 6..8 tie
    assert [v for _, v, final in grid.of("evaluate") if final] == [6.0, 6.0]
    assert listener.selection.best_value == 0.8
