"""Server-side (client-level) DP: Flower's fixed-clipping wrapper around the NEARL strategy, without processes."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord
from opacus.accountants import RDPAccountant

from server.central_dp import NearlServerSideDP, check_central_dp
from server.settings import FederationSettings
from server.strategy import make_strategy
from nearl_core.errors import ConfigError
from tests.fed_helpers import FakeGrid, reply_from, train_reply_content
from tests.test_strategy import Recorder, declined_content

SCHEMA = {"a.weight": ((20, 30), "float32"), "b.bias": ((40,), "float32")}


pytestmark = pytest.mark.usefixtures("task_identity")  # strategies build Messages (tests/conftest.py)


def full(value: float) -> dict[str, np.ndarray]:
    return {k: np.full(shape, value, dtype=dtype) for k, (shape, dtype) in SCHEMA.items()}


def norm(values: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in values.values())))


def dp_round(wrapper, replies, nodes, server_round=1, start=0.0):
    initial = ArrayRecord({k: Array(v) for k, v in full(start).items()})
    list(wrapper.configure_train(server_round, initial, ConfigRecord(), FakeGrid(nodes)))
    agg, metrics = wrapper.aggregate_train(server_round, replies)
    list(wrapper.configure_evaluate(server_round, agg or initial, ConfigRecord(), FakeGrid(nodes)))
    wrapper.aggregate_evaluate(server_round, [])
    return agg, metrics


def wrapped(noise: float, clip: float, rec: Recorder, **kw):
    inner = make_strategy("fedavg", schema=SCHEMA, min_nodes=1, listener=rec, total_rounds=3)
    return NearlServerSideDP(inner, noise_multiplier=noise, clipping_norm=clip, delta=1e-5, **kw)


def test_without_noise_the_result_is_the_equal_weight_mean_of_clipped_updates():
    rec = Recorder()
    dp = wrapped(0.0, 1.0, rec)
    small, big = full(0.01), full(5.0)  # norm of small < 1 (kept), big is scaled to norm 1
    replies = [reply_from(1, train_reply_content("siteA", small, n=10)),
               reply_from(2, train_reply_content("siteB", big, n=1000))]  # 100x the examples: ignored under DP
    agg, _ = dp_round(dp, replies, [1, 2])
    big_clipped = {k: v / norm(big) for k, v in big.items()}
    assert norm(big_clipped) == pytest.approx(1.0)
    for k in SCHEMA:
        np.testing.assert_allclose(agg[k].numpy(), (small[k] + big_clipped[k]) / 2, rtol=1e-5)
    report = rec.rounds[-1]
    assert report.answered == ["siteA", "siteB"]
    assert report.per_site["siteB"]["train_examples"] == 1000  # the real counts are still reported
    assert not any("server-dp-weight" in k or "server_dp_weight" in k for s in report.per_site.values() for k in s)


def test_the_guard_judges_the_clipped_update_even_when_the_reply_was_read_on_arrival():
    """Facts taken on arrival (distance to the global adapters) describe the raw update: clipping drops them.

    siteD's raw update is 50x the others' distance (an outlier); clipped to norm 0.05 it is 1.6x.
    """
    results = {}
    for arrival in (False, True):
        rec = Recorder()
        dp = wrapped(0.0, 0.05, rec)
        replies = [reply_from(n, train_reply_content(f"site{s}", full(0.01), n=10)) for n, s in ((1, "A"), (2, "B"), (3, "C"))]
        replies.append(reply_from(4, train_reply_content("siteD", full(0.5), n=10)))
        initial = ArrayRecord({k: Array(v) for k, v in full(0.0).items()})
        list(dp.configure_train(1, initial, ConfigRecord(), FakeGrid([1, 2, 3, 4])))
        if arrival:
            dp.strategy.replies_arrived(replies)
        agg, _ = dp.aggregate_train(1, replies)
        dp.aggregate_evaluate(1, [])
        results[arrival] = (agg, rec.rounds[-1])
    for arrival, (agg, report) in results.items():
        assert report.answered == ["siteA", "siteB", "siteC", "siteD"] and not report.rejected, (arrival, report.rejected)
    for k in SCHEMA:
        np.testing.assert_array_equal(results[True][0][k].numpy(), results[False][0][k].numpy())


def test_noise_has_the_calibrated_std_and_reaches_the_report_and_checkpoint():
    rec = Recorder()
    dp = wrapped(2.0, 0.5, rec)
    replies = [reply_from(n, train_reply_content(f"site{n}", full(0.0), n=10)) for n in (1, 2, 3, 4)]
    replies.append(reply_from(5, declined_content("site5")))  # declined: not averaged, does not count in n
    np.random.seed(0)
    agg, metrics = dp_round(dp, replies, [1, 2, 3, 4, 5])
    noise = np.concatenate([agg[k].numpy().ravel() for k in SCHEMA])  # the updates are zero: all noise
    assert noise.std() == pytest.approx(2.0 * 0.5 / 4, rel=0.08)  # z * C / n with n = 4 averaged updates
    report = rec.rounds[-1]
    for k in SCHEMA:  # what is logged and checkpointed is the noisy release, never the raw mean
        np.testing.assert_array_equal(report.arrays[k].numpy(), agg[k].numpy())
        assert report.arrays[k].numpy().dtype == np.float32
    assert report.train_metrics["server_dp_updates"] == 4.0 and "site5" in report.declined
    assert metrics["server_dp_noise_std"] == pytest.approx(0.25)


def test_rejected_updates_are_not_clipped_into_the_mean():
    rec = Recorder()
    dp = wrapped(0.0, 100.0, rec)  # norm of the update is sqrt(640): not clipped
    bad = full(1.0)
    bad["b.bias"][0] = np.nan
    replies = [reply_from(1, train_reply_content("siteA", full(1.0))), reply_from(2, train_reply_content("siteB", bad)),
               reply_from(3, error="ClientApp raised an error")]
    agg, _ = dp_round(dp, replies, [1, 2, 3])
    np.testing.assert_allclose(agg["a.weight"].numpy(), 1.0)  # siteA alone; the round was not cancelled
    assert set(rec.rounds[-1].rejected) == {"siteB", "node-3"}


def test_client_level_epsilon_matches_opacus_and_continues_after_resume():
    rec = Recorder()
    dp = wrapped(1.5, 1.0, rec, releases_so_far=2)
    replies = [reply_from(1, train_reply_content("siteA", full(0.1)))]
    _, metrics = dp_round(dp, replies, [1], server_round=1)
    reference = RDPAccountant()
    for _ in range(3):  # two releases before the resume, one now
        reference.step(noise_multiplier=1.5, sample_rate=1.0)
    assert metrics["server_dp_epsilon"] == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-9)
    assert rec.rounds[-1].train_metrics["server_dp_epsilon"] == metrics["server_dp_epsilon"]


@pytest.mark.parametrize("strategy, noise, clip, match", [
    ("fedavg", 1.0, 0.0, "both server-dp-noise"),
    ("fedmedian", 1.0, 1.0, "plain mean"),
    ("fedadam", 1.0, 1.0, "fedavg or fedprox"),
])
def test_bad_server_dp_settings_are_refused_early(strategy, noise, clip, match):
    assert match in check_central_dp(strategy, noise, clip, 1e-5)
    with pytest.raises(ConfigError, match=match):
        FederationSettings.from_run_config({"strategy": strategy, "server-dp-noise": noise, "server-dp-clip": clip})
    assert check_central_dp(strategy, 0.0, 0.0, 1e-5) is None  # off is always fine
