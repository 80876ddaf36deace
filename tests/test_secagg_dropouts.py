"""The dropout matrix: 5 sites, threshold 3; 0..2 sites vanish at each stage (recovered), 3 abort the round.

A site that vanishes before its masked update arrived (setup, share-keys, collect) is left
out of the sum; one that vanishes at unmask still counts (its masked update is in, and the
other survivors' shares remove its masks).  One dropout past the threshold aborts the round
cleanly: no new adapters, the reason in the round's report, and the next round runs.

The signed matrix runs the same with every site pinning a roster (tests/secagg_fakes.py's
``with_roster``), which adds the consistency stage: a site that vanishes there still counts.
"""

from __future__ import annotations

import numpy as np
import pytest

from server.secagg import SecAggSettings
from tests.secagg_fakes import flat_of, make_sites, plain_mean, run_round, with_roster

SITES, SETTINGS = 5, SecAggSettings(threshold=0.6, clip=0.1)  # threshold_for(5, 0.6) = 3
STAGES = ("setup", "share-keys", "collect", "unmask")
CASES = [(stage, k) for stage in STAGES for k in range(0, SITES - 3 + 2)]
SIGNED_STAGES = ("setup", "share-keys", "collect", "consistency", "unmask")
SIGNED_CASES = [(stage, k) for stage in SIGNED_STAGES for k in range(0, SITES - 3 + 2)]


pytestmark = pytest.mark.usefixtures("task_identity")  # strategies build Messages (tests/conftest.py)


def included(sites, drop: dict[str, set[int]]):
    """The sites whose update the sum holds: those that did not vanish before their masked update arrived."""
    gone = set().union(*(drop.get(s, set()) for s in ("setup", "share-keys", "collect")))
    return [s for s in sites if s.node not in gone]


def check(sites, drop, arrays, report, strategy) -> str:
    lost = sum(len(v) for v in drop.values())
    if lost > SITES - 3:
        assert arrays is None and not report.aggregated
        assert "secure aggregation aborted at stage" in report.not_applied and "threshold is 3" in report.not_applied
        return f"aborted: {report.not_applied.split(': ')[0].removeprefix('secure aggregation aborted at ')}"
    kept = included(sites, drop)
    expected = plain_mean(kept)
    rnd = strategy.secure.current
    bound = rnd.params.error_bound(int(rnd.total[-2]), len(kept)) + np.spacing(np.abs(expected).astype(np.float32))
    err = np.abs(flat_of(arrays) - expected)
    assert report.aggregated and np.all(err <= bound), (err.max(), bound.max())
    assert report.train_metrics["train_examples"] == sum(s.examples for s in kept)
    return f"recovered: {len(kept)} updates summed, max error {err.max():.1e}"


@pytest.mark.parametrize("stage, k", CASES, ids=[f"{s}-{k}-dropped" for s, k in CASES])
def test_dropout_matrix(tmp_path, stage, k):
    sites = make_sites(tmp_path, SITES, seed=11)
    drop = {stage: {s.node for s in sites[1: 1 + k]}}
    arrays, report, _, strategy = run_round(sites, drop=drop, secure=SETTINGS)
    print(f"MATRIX {stage:<10} {k} dropped -> {check(sites, drop, arrays, report, strategy)}")


@pytest.mark.parametrize("stage, k", SIGNED_CASES, ids=[f"{s}-{k}-dropped" for s, k in SIGNED_CASES])
def test_signed_dropout_matrix(tmp_path, stage, k):
    sites = make_sites(tmp_path, SITES, seed=11)
    with_roster(tmp_path, sites)
    drop = {stage: {s.node for s in sites[1: 1 + k]}}
    arrays, report, _, strategy = run_round(sites, drop=drop, secure=SETTINGS)
    assert not any(s.refusals() for s in sites)
    assert strategy.secure.current.signed or (stage, k) == ("setup", 3)  # an abort at setup comes before the keys
    print(f"MATRIX signed {stage:<11} {k} dropped -> {check(sites, drop, arrays, report, strategy)}")


@pytest.mark.parametrize("drop_plan", [
    {"setup": [0], "collect": [1]},
    {"share-keys": [0], "unmask": [1]},
    {"setup": [0], "share-keys": [1], "unmask": [2]},
    {"collect": [0], "unmask": [1, 2]},
], ids=["setup+collect", "share-keys+unmask", "one-at-three-stages-aborts", "collect+2-unmask-aborts"])
def test_dropouts_spread_over_stages(tmp_path, drop_plan):
    sites = make_sites(tmp_path, SITES, seed=5)
    drop = {stage: {sites[i].node for i in idx} for stage, idx in drop_plan.items()}
    arrays, report, _, strategy = run_round(sites, drop=drop, secure=SETTINGS)
    print(f"MATRIX {'+'.join(drop_plan)} -> {check(sites, drop, arrays, report, strategy)}")


def test_after_an_aborted_round_the_next_one_runs_from_unchanged_adapters(tmp_path):
    sites = make_sites(tmp_path, SITES, seed=2)
    arrays, report, grid, _ = run_round(sites, drop={"share-keys": {s.node for s in sites[:3]}}, secure=SETTINGS)
    assert arrays is None and "stage share-keys: 2 of 5 sites remain" in report.not_applied
    grid.drop = {}
    arrays, report, _, strategy = run_round(sites, secure=SETTINGS, grid=grid, server_round=2)
    assert report.aggregated
    rnd = strategy.secure.current
    expected = plain_mean(sites)
    assert np.all(np.abs(flat_of(arrays) - expected) <= rnd.params.error_bound(int(rnd.total[-2]))
                  + np.spacing(np.abs(expected).astype(np.float32)))
