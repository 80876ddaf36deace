"""The rule that picks the round the federation keeps, and when patience stops a run: exact values."""

from __future__ import annotations

import math

import pytest

from nearl_core.errors import ConfigError
from server.selection import SELECT_BY, Selection
from server.settings import FederationSettings

BAL, LOSS = "eval_balanced_accuracy", "eval_loss"


def feed(selection: Selection, values: dict[int, float], metric: str = BAL) -> list[bool]:
    """Observe ``step -> value`` in order; which steps became the best."""
    return [selection.observe(step, {metric: v}) for step, v in values.items()]


def test_the_highest_balanced_accuracy_wins_and_a_tie_keeps_the_earlier_round():
    s = Selection("balanced-accuracy")
    assert feed(s, {1: 0.50, 2: 0.75, 3: 0.75, 4: 0.60}) == [True, True, False, False]
    assert (s.best_round, s.best_value, s.latest, s.since_best()) == (2, 0.75, 4, 2)


def test_loss_selects_the_lowest_value():
    s = Selection("loss")
    assert feed(s, {1: 1.10, 2: 0.40, 3: 0.40, 4: 0.90}, LOSS) == [True, True, False, False]
    assert (s.best_round, s.best_value) == (2, 0.40)
    assert Selection("balanced-accuracy").better(0.9, 0.8) and Selection("loss").better(0.8, 0.9)
    assert not Selection("loss").better(0.9, 0.9)


def test_zero_shot_is_no_candidate_and_a_missing_or_nan_value_never_wins_but_counts_as_seen():
    s = Selection("balanced-accuracy")
    assert s.observe(0, {BAL: 0.99}) is False and s.best_round is None and s.latest == 0
    assert s.observe(1, {BAL: math.nan}) is False and s.observe(2, {}) is False
    assert (s.best_round, s.latest, s.since_best()) == (None, 2, 0)
    assert not s.exhausted(1)  # nothing to improve on: no early stop
    assert s.observe(3, {BAL: 0.2}) and (s.best_round, s.since_best()) == (3, 0)


def test_an_earlier_round_evaluated_again_keeps_its_place_on_a_tie():
    s = Selection("accuracy")
    feed(s, {1: 0.5, 2: 0.7}, "eval_accuracy")
    assert s.observe(2, {"eval_accuracy": 0.7}) is False  # the same round again changes nothing
    assert s.observe(1, {"eval_accuracy": 0.7}) is True and s.best_round == 1  # the earlier round on a tie


def test_patience_counts_validated_rounds_after_the_best():
    s = Selection("balanced-accuracy")
    feed(s, {1: 0.50, 2: 0.75, 3: 0.75})
    assert [s.exhausted(p) for p in (0, 1, 2)] == [False, True, False]  # 0 = off
    assert s.stop_reason(2) == ""
    s.observe(4, {BAL: 0.70})
    assert s.exhausted(2) and not s.exhausted(3)
    assert s.stop_reason(2) == ("validation balanced accuracy has not improved for 2 round(s) since round 2 "
                                "(0.75); patience 2")
    s.observe(5, {BAL: 0.80})  # an improvement resets the count
    assert (s.best_round, s.since_best(), s.exhausted(1)) == (5, 0, False)


def test_the_state_a_checkpoint_keeps_gives_back_the_same_selection():
    s = Selection("loss")
    feed(s, {1: 0.9, 2: 0.3, 3: 0.5}, LOSS)
    again = Selection.from_state(s.state(), "loss")
    assert again == s and again.exhausted(1)
    assert Selection.from_state(None, "loss") == Selection("loss")
    assert Selection.from_state(s.state(), "accuracy") == Selection("accuracy")


def test_select_by_and_patience_are_validated_in_one_line():
    s = FederationSettings.from_run_config({"select-by": "LOSS", "patience": "2"})
    assert (s.select_by, s.patience) == ("loss", 2)
    assert FederationSettings().select_by == "balanced-accuracy" and FederationSettings().patience == 0
    with pytest.raises(ConfigError, match=r"^run config: select-by must be one of balanced-accuracy, accuracy, "
                                          r"macro-f1, auroc, loss$"):
        FederationSettings.from_run_config({"select-by": "f1"})
    with pytest.raises(ConfigError, match=r"^run config: patience must be >= 0"):
        FederationSettings.from_run_config({"patience": -1})
    assert set(SELECT_BY) == {"balanced-accuracy", "accuracy", "macro-f1", "auroc", "loss"}
