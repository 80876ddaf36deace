"""Hostile replies through the real screening, guard and strategies (tests/hostile.py builds the rounds).

Every case x strategy: the hostile site is rejected with a reason (and the aggregate equals
the honest sites' aggregate), or its example claim is clipped to its cap (and the
aggregate equals the one where it claimed the cap).  Then the guard's other promises:
an exception in aggregation rejects only the update that causes it, an out-of-range
aggregate is not applied, equal weights, the outlier switch, and the cap across a resume.
"""

from __future__ import annotations

import functools
import math
import re

import numpy as np
import pytest

from server.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from server.central_dp import NearlServerSideDP
from server.strategy import make_strategy
from tests import hostile
from tests.fed_helpers import ROOT, RoundRecorder, reply_from
from tests.hostile import (CAP, CASES, HONEST, HOSTILE, HOSTILE_NODE, NAMES, SCHEMA, delta, federation,
                           honest_replies, play, plus)


pytestmark = pytest.mark.usefixtures("task_identity")  # strategies build Messages (tests/conftest.py)


@functools.lru_cache(maxsize=None)
def result(case_name: str, strategy: str) -> hostile.Result:
    return hostile.run_case(hostile.BY_NAME[case_name], strategy)


def assert_same(got, want) -> None:
    for k in SCHEMA:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7, err_msg=k)
        assert got[k].dtype == np.float32


@pytest.mark.parametrize("strategy", NAMES)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_hostile_reply_is_rejected_or_clipped_and_cannot_move_the_aggregate(case, strategy):
    r = result(case.name, strategy)
    report = r.report
    assert report.aggregated and not report.not_applied
    assert sorted(HONEST[n][0] for n in HONEST) == [s for s in report.answered if s != HOSTILE]
    if case.clipped:
        assert r.label not in report.rejected and r.label in report.answered
        site = report.per_site[r.label]
        assert site["examples_clipped"] == 1.0 and site["examples_cap"] == CAP and site["train_examples"] == CAP
    else:
        assert case.expect in report.rejected[r.label], report.rejected
        assert r.label not in report.answered and r.label not in report.per_site
    assert_same(r.got, r.reference)


def test_the_security_doc_holds_the_current_table():
    results = [result(c.name, n) for c in CASES for n in NAMES]
    text = (ROOT / "docs" / "security.md").read_text()
    assert hostile.table(results) in text, "regenerate it: python bench/hostile_table.py"


def test_a_clipped_claim_is_logged_with_the_site_and_its_cap(caplog):
    with caplog.at_level("WARNING"):
        hostile.run_case(hostile.BY_NAME["num-examples 1e9"], "fedavg")
    assert re.search(r"site intruder claims 1e\+09 training examples, clipped to 40", caplog.text)


def test_a_first_claim_is_capped_at_max_examples():
    rec = RoundRecorder()
    strategy = make_strategy("fedavg", schema=SCHEMA, min_nodes=1, listener=rec, total_rounds=2,
                             options={"max-examples": 1000})
    g0 = hostile.initial()
    replies = [*honest_replies(g0, 1), reply_from(HOSTILE_NODE, hostile._content(plus(g0, delta(6, 1)), n=1e308))]
    got = play(strategy, 1, g0, replies, [*HONEST, HOSTILE_NODE])
    weights = [n for _, n in HONEST.values()] + [1000]
    steps = [delta(node, 1) for node in [*HONEST, HOSTILE_NODE]]
    for k in SCHEMA:
        want = sum(w * s[k].astype(np.float64) for w, s in zip(weights, steps)) / sum(weights)
        np.testing.assert_allclose(got[k], want, rtol=1e-6)
    assert rec.rounds[-1].per_site[HOSTILE]["examples_cap"] == 1000
    assert strategy.guard.caps.first[HOSTILE] == 1000  # the cap of later rounds: 2000


def test_equal_weights_ignore_the_claims():
    strategy, rec, g1 = federation("fedavg", **{"equal-weights": True})
    got = play(strategy, 2, g1, honest_replies(g1, 2), list(HONEST))
    for k in SCHEMA:
        want = np.mean([plus(g1, delta(n, 2))[k].astype(np.float64) for n in HONEST], axis=0)
        np.testing.assert_allclose(got[k], want, rtol=1e-6)
    assert rec.rounds[-1].train_metrics["train_examples"] == 150  # the claims are still reported


@pytest.mark.parametrize("factor, updates, rejected", [(0.0, 5, False), (10.0, 2, False), (10.0, 5, True)])
def test_the_outlier_check_can_be_switched_off_and_needs_three_updates(factor, updates, rejected):
    strategy, rec, g1 = federation("fedavg", **{"outlier-factor": factor})
    replies = honest_replies(g1, 2)[:updates - 1]
    replies.append(reply_from(HOSTILE_NODE, hostile._content(plus(g1, delta(5, 2), scale=10.0))))
    play(strategy, 2, g1, replies, list(HONEST))
    assert (HOSTILE in rec.rounds[-1].rejected) == rejected


@pytest.mark.parametrize("strategy", NAMES)
def test_an_update_that_makes_aggregation_raise_is_rejected_and_the_round_goes_on(strategy):
    actual, rec, g1 = federation(strategy)
    reference, _, _ = federation(strategy)
    original = actual._aggregate_updates

    def fragile(updates, weights):  # a hostile update that finds a bug in the aggregation code
        if any(u.site == HOSTILE for u in updates):
            raise FloatingPointError("overflow in reduce")
        return original(updates, weights)

    actual._aggregate_updates = fragile
    update = plus(g1, delta(HOSTILE_NODE, 2))
    got = play(actual, 2, g1, [*honest_replies(g1, 2), reply_from(HOSTILE_NODE, hostile._content(update))],
               [*HONEST, HOSTILE_NODE])
    want = play(reference, 2, g1, honest_replies(g1, 2), [*HONEST, HOSTILE_NODE])
    assert_same(got, want)  # FedAdam/FedYogi moments advanced once, as in the reference
    assert "aggregation failed on this update (FloatingPointError: overflow in reduce)" in rec.rounds[-1].rejected[HOSTILE]


def test_a_failure_no_single_update_explains_leaves_the_global_adapters_unchanged():
    strategy, rec, g1 = federation("fedadam")
    moments = dict(strategy.m_t)
    original = strategy._aggregate_updates
    strategy._aggregate_updates = lambda u, w: original(u, w) if len(u) == 1 else 1 / 0
    got = play(strategy, 2, g1, honest_replies(g1, 2), list(HONEST))
    assert all(np.array_equal(got[k], g1[k]) for k in SCHEMA)
    report = rec.rounds[-1]
    assert not report.aggregated and "aggregation failed (ZeroDivisionError" in report.not_applied
    assert report.rejected == {} and strategy.m_t.keys() == moments.keys()
    assert all(np.array_equal(strategy.m_t[k], moments[k]) for k in moments)


def _huge_server_lr(strategy):
    strategy.eta = 1e6  # FedAdam's server learning rate: a step of up to about 1e6


def _infinite_result(strategy):
    original = strategy._aggregate_updates
    strategy._aggregate_updates = lambda u, w: {k: v * np.inf for k, v in original(u, w).items()}


@pytest.mark.parametrize("breaks, reason", [(_huge_server_lr, "beyond max-abs-value 10000"),
                                            (_infinite_result, "holds NaN or Inf values")])
def test_an_out_of_range_or_non_finite_aggregate_is_not_applied(breaks, reason, caplog):
    strategy, rec, g1 = federation("fedadam")
    breaks(strategy)
    moments = (dict(strategy.m_t), dict(strategy.v_t))
    with caplog.at_level("WARNING"):
        got = play(strategy, 2, g1, honest_replies(g1, 2), list(HONEST))
    report = rec.rounds[-1]
    assert all(np.array_equal(got[k], g1[k]) for k in SCHEMA) and not report.aggregated
    assert "the round's aggregate holds" in report.not_applied and reason in report.not_applied and "global adapters unchanged" in caplog.text
    assert report.answered == sorted(s for s, _ in HONEST.values()) and report.rejected == {}
    assert (strategy.m_t, strategy.v_t) == moments  # the optimiser's state is not advanced either


def test_the_example_caps_survive_a_checkpoint_and_resume(tmp_path):
    strategy, _, g1 = federation("fedavg")
    save_checkpoint(tmp_path, Checkpoint(round=1, arrays=g1, strategy_state=strategy.strategy_state()))
    resumed = make_strategy("fedavg", schema=SCHEMA, min_nodes=1, total_rounds=3, round_offset=1)
    resumed.load_strategy_state(load_checkpoint(tmp_path / "round-0001").strategy_state)
    assert resumed.guard.caps.first == {**{s: float(n) for s, n in HONEST.values()}, HOSTILE: 20.0}
    assert resumed.guard.caps.clip(HOSTILE, 1e9) == (CAP, CAP)


def test_server_side_dp_counts_only_the_updates_it_averaged():
    rec = RoundRecorder()
    inner = make_strategy("fedavg", schema=SCHEMA, min_nodes=1, listener=rec, total_rounds=2)
    dp = NearlServerSideDP(inner, noise_multiplier=1.0, clipping_norm=10.0, delta=1e-5)
    original = inner._aggregate_updates
    inner._aggregate_updates = lambda u, w: (_ for _ in ()).throw(RuntimeError("bad")) \
        if any(x.site == HOSTILE for x in u) else original(u, w)
    g0 = hostile.initial()
    replies = [*honest_replies(g0, 1), reply_from(HOSTILE_NODE, hostile._content(plus(g0, delta(6, 1))))]
    play(dp, 1, g0, replies, [*HONEST, HOSTILE_NODE])
    report = rec.rounds[-1]
    assert HOSTILE in report.rejected and report.train_metrics["server_dp_updates"] == 5.0
    assert math.isclose(report.train_metrics["server_dp_noise_std"], 1.0 * 10.0 / 5)
