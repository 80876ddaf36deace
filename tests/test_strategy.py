"""Strategy hooks without processes: reply screening, aggregation, round reports, state, dtype."""

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from server.strategy import (
    STRATEGIES,
    NotEnoughSites,
    aggregate_metrics,
    check_update,
    make_strategy,
)
from tests.fed_helpers import (
    FakeGrid,
    reply_from,
    train_reply_content,
)

SCHEMA = {"a.weight": ((2, 3), "float32"), "b.bias": ((4,), "float32")}


pytestmark = pytest.mark.usefixtures("task_identity")  # strategies build Messages (tests/conftest.py)


def arrays(value: float = 0.0) -> dict[str, np.ndarray]:
    return {k: np.full(shape, value, dtype=dtype) for k, (shape, dtype) in SCHEMA.items()}


class Recorder:
    def __init__(self):
        self.evals, self.rounds = [], []

    def evaluated(self, step, metrics, per_site):
        self.evals.append((step, metrics, per_site))

    def round_finished(self, report, strategy):
        self.rounds.append(report)


def run_round(strategy, replies, grid=None, server_round=1):
    grid = grid or FakeGrid([1, 2, 3])
    initial = ArrayRecord({k: Array(v) for k, v in arrays(0.0).items()})
    list(strategy.configure_train(server_round, initial, ConfigRecord(), grid))
    agg, metrics = strategy.aggregate_train(server_round, replies)
    list(strategy.configure_evaluate(server_round, agg or initial, ConfigRecord(), grid))
    strategy.aggregate_evaluate(server_round, [])
    return agg, metrics


def with_record(content: RecordDict, record: ArrayRecord) -> RecordDict:
    return RecordDict({**dict(content.items()), "arrays": record})


def test_check_update_accepts_sound_and_rejects_bad_updates():
    assert check_update(train_reply_content("s", arrays(1.0)), SCHEMA) is None
    bad_nan = arrays(1.0)
    bad_nan["a.weight"][0, 0] = np.nan
    assert check_update(train_reply_content("s", bad_nan), SCHEMA) == "tensor 'a.weight' holds NaN or Inf values"
    bad_inf = arrays(1.0)
    bad_inf["b.bias"][1] = np.inf
    assert check_update(train_reply_content("s", bad_inf), SCHEMA) == "tensor 'b.bias' holds NaN or Inf values"
    sound = train_reply_content("s", arrays(1.0))
    flat = np.ones(10, np.float32)
    assert "holds 13 values, the adapter schema has 10" in check_update(
        train_reply_content("s", {**arrays(1.0), "clip.visual.proj": np.zeros(3, np.float32)}), SCHEMA)
    assert "holds 6 values" in check_update(train_reply_content("s", {"a.weight": arrays()["a.weight"]}), SCHEMA)
    assert "has shape (2, 5)" in check_update(with_record(sound, ArrayRecord({"adapters": Array(flat.reshape(2, 5))})),
                                               SCHEMA)
    assert "has dtype float64, expected float32" in check_update(
        with_record(sound, ArrayRecord({"adapters": Array(flat.astype(np.float64))})), SCHEMA)
    assert "unexpected ['extra']" in check_update(
        with_record(sound, ArrayRecord({"adapters": Array(flat), "extra": Array(flat)})), SCHEMA)
    per_tensor = ArrayRecord({k: Array(v) for k, v in arrays(1.0).items()})  # the format before flat payloads
    assert "missing ['adapters']" in check_update(with_record(sound, per_tensor), SCHEMA)
    assert "num-examples" in check_update(train_reply_content("s", arrays(1.0), n=0), SCHEMA)


def test_aggregation_rejects_bad_sites_and_logs_their_names(caplog):
    rec = Recorder()
    strategy = make_strategy("fedavg", schema=SCHEMA, min_nodes=1, listener=rec, total_rounds=2)
    bad = arrays(5.0)
    bad["a.weight"][1, 1] = np.nan
    replies = [
        reply_from(1, train_reply_content("siteA", arrays(1.0), n=10)),
        reply_from(2, train_reply_content("siteB", arrays(3.0), n=30)),
        reply_from(3, train_reply_content("siteBad", bad, n=1000)),
    ]
    with caplog.at_level("WARNING"):
        agg, metrics = run_round(strategy, replies)
    # weighted by examples over the two sound sites only: (1*10 + 3*30) / 40 = 2.5
    np.testing.assert_allclose(agg["a.weight"].numpy(), 2.5)
    assert "siteBad" in caplog.text and "NaN" in caplog.text
    report = rec.rounds[-1]
    assert report.answered == ["siteA", "siteB"]
    assert set(report.rejected) == {"siteBad"}
    assert report.missing == ["siteBad"]
    assert report.train_metrics["train_examples"] == 40
    assert report.bytes_sent > 3 * 4 * 10 and report.bytes_received > 0


def test_all_rejected_keeps_global_adapters_and_error_replies_count_as_missing():
    rec = Recorder()
    strategy = make_strategy("fedavg", schema=SCHEMA, min_nodes=1, listener=rec, total_rounds=3)
    replies = [reply_from(1, error="ClientApp raised EgressError: extra tensor"),
               reply_from(2, train_reply_content("siteB", {"a.weight": np.zeros((2, 3), np.float32)}))]
    agg, _ = run_round(strategy, replies)
    assert agg is None
    report = rec.rounds[-1]
    assert not report.aggregated and report.answered == []
    assert "EgressError" in report.rejected["node-1"] and "siteB" in report.rejected
    # the next round remembers the site behind a node id
    run_round(strategy, [reply_from(1, train_reply_content("siteA", arrays(1.0)))], server_round=2)
    assert rec.rounds[-1].answered == ["siteA"]
    assert "siteB" in rec.rounds[-1].missing


def test_eval_inside_train_is_reported_for_the_previous_round():
    rec = Recorder()
    strategy = make_strategy("fedavg", schema=SCHEMA, min_nodes=1, listener=rec, total_rounds=3, round_offset=4)
    replies = [reply_from(1, train_reply_content("siteA", arrays(1.0), n=10, eval_examples=5, eval_accuracy=1.0,
                                                 eval_auroc=math.nan)),
               reply_from(2, train_reply_content("siteB", arrays(1.0), n=10, eval_examples=15, eval_accuracy=0.0,
                                                 eval_auroc=0.8))]
    run_round(strategy, replies)
    step, metrics, per_site = rec.evals[-1]
    assert step == 4  # round 5 (offset 4 + 1) evaluated the global adapters of round 4
    assert metrics["eval_accuracy"] == pytest.approx(5 / 20)
    assert metrics["eval_auroc"] == pytest.approx(0.8)  # NaN of one site ignored
    assert per_site["siteA"]["eval_accuracy"] == 1.0
    assert rec.rounds[-1].round == 5
    assert "eval_accuracy" not in rec.rounds[-1].train_metrics


def test_a_round_has_no_evaluate_phase_when_evaluating_in_train_and_the_final_evaluation_says_so():
    strategy = make_strategy("fedavg", schema=SCHEMA, min_nodes=1, total_rounds=3)
    arr = ArrayRecord({k: Array(v) for k, v in arrays().items()})
    assert list(strategy.configure_evaluate(1, arr, ConfigRecord(), FakeGrid([1]))) == []
    assert list(strategy.configure_evaluate(3, arr, ConfigRecord(), FakeGrid([1]))) == []  # the last round too
    separate = make_strategy("fedavg", schema=SCHEMA, min_nodes=1, total_rounds=3, evaluate_in_train=False)
    (validation,) = separate.configure_evaluate(1, arr, ConfigRecord(), FakeGrid([1]))
    assert validation.content["config"]["final-evaluation"] is False
    (final,) = strategy.evaluation_messages(2, arr, ConfigRecord({"final-evaluation": True}), FakeGrid([1]))
    assert final.content["config"]["final-evaluation"] is True and final.content["config"]["server-round"] == 2


def test_waiting_for_sites_is_bounded():
    strategy = make_strategy("fedavg", schema=SCHEMA, min_nodes=3, wait_timeout=1.0)
    with pytest.raises(NotEnoughSites, match="only 1 of the 3"):
        list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid([7])))


def test_aggregate_metrics_weights_each_split_by_its_own_count_and_takes_max_epsilon():
    rows = [{"train_examples": 10, "train_loss": 1.0, "eval_examples": 1, "eval_loss": 4.0, "epsilon": 2.0},
            {"train_examples": 30, "train_loss": 3.0, "eval_examples": 3, "eval_loss": 0.0, "epsilon": 5.0}]
    out = aggregate_metrics(rows)
    assert out["train_loss"] == pytest.approx(2.5)
    assert out["eval_loss"] == pytest.approx(1.0)
    assert out["epsilon_max"] == 5.0 and out["train_examples"] == 40



def test_aggregate_metrics_keeps_worker_facts_per_site_and_counts_warm_sites():
    rows = [{"train_examples": 10, "worker_pid": 100.0, "worker_builds": 1.0, "worker_warm": 1.0},
            {"train_examples": 30, "worker_pid": 200.0, "worker_builds": 3.0, "worker_warm": 0.0}]
    out = aggregate_metrics(rows)
    assert out["sites_warm"] == 1.0
    assert not any(k.startswith("worker_") for k in out), out

@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_aggregates_and_keeps_dtype(name):
    strategy = make_strategy(name, schema=SCHEMA, min_nodes=1, total_rounds=2)
    replies = [reply_from(i, train_reply_content(f"s{i}", arrays(float(i)), n=10)) for i in (1, 2, 3)]
    agg, _ = run_round(strategy, replies)
    assert agg is not None and set(agg) == set(SCHEMA)
    assert all(str(agg[k].dtype) == "float32" for k in SCHEMA)
    assert all(np.isfinite(agg[k].numpy()).all() for k in SCHEMA)


def test_replies_read_as_they_arrive_aggregate_as_when_read_at_the_end(monkeypatch):
    """The Grid's arrival hook screens, hashes and guards each reply once; the round's result is unchanged.

    Five sites: three sound, one far from the global adapters (a norm outlier), one beyond
    max-abs-value: the same two are rejected for the same reasons either way.
    """
    import server.replies as replies_module
    import server.robust as robust_module

    reads, dists = [], []
    real_read, real_dist = replies_module.read_update, robust_module.distances
    monkeypatch.setattr(replies_module, "read_update", lambda content, *a: reads.append(1) or real_read(content, *a))
    monkeypatch.setattr(robust_module, "distances", lambda values, ref: dists.extend(values) or real_dist(values, ref))
    values = {1: 1.0, 2: 2.0, 3: 3.0, 4: 500.0, 5: 1e5}
    results = {}
    for arrival in (False, True):
        strategy = make_strategy("fedavg", schema=SCHEMA, min_nodes=1, total_rounds=2)
        replies = [reply_from(i, train_reply_content(f"s{i}", arrays(v), n=10 * i)) for i, v in values.items()]
        recorder = Recorder()
        strategy.listener = recorder
        initial = ArrayRecord({k: Array(v) for k, v in arrays(0.0).items()})
        list(strategy.configure_train(1, initial, ConfigRecord(), FakeGrid([1, 2, 3, 4, 5])))
        reads.clear(), dists.clear()
        if arrival:
            strategy.replies_arrived(replies[:2])
            strategy.replies_arrived(replies[2:])
            assert len(reads) == 5 and len(dists) == 4  # read and measured while the round waited
        agg, _ = strategy.aggregate_train(1, replies)
        assert len(reads) == 5 and len(dists) == 4  # each reply read once, each in-range distance taken once
        strategy.aggregate_evaluate(1, [])
        report = recorder.rounds[-1]
        results[arrival] = ({k: agg[k].numpy() for k in SCHEMA}, report.payload_sha256, report.rejected)
    for k in SCHEMA:
        np.testing.assert_array_equal(results[True][0][k], results[False][0][k])
    assert results[True][1] == results[False][1] and len(results[True][1]) == 3
    assert results[True][2] == results[False][2] and set(results[True][2]) == {"s4", "s5"}, results[True][2]
    assert "median distance" in results[True][2]["s4"] and "max-abs-value" in results[True][2]["s5"]


def test_fedadam_state_round_trips_for_resume():
    strategy = make_strategy("fedadam", schema=SCHEMA, min_nodes=1, total_rounds=3)
    run_round(strategy, [reply_from(1, train_reply_content("s1", arrays(1.0)))])
    state = strategy.strategy_state()
    assert set(state) == {"m_t", "v_t", "example_caps"}
    fresh = make_strategy("fedadam", schema=SCHEMA, min_nodes=1, total_rounds=3, round_offset=1)
    fresh.load_strategy_state(state)
    np.testing.assert_array_equal(fresh.m_t["a.weight"], state["m_t"]["a.weight"])
    assert fresh.guard.caps.first == {"s1": 10.0}  # the example cap survives a resume


def test_superlink_error_for_an_unreachable_node_names_that_site():
    """Flower's SuperLink answers for a dead node (src = the SuperLink): name the site the message went to."""
    from flwr.app import Error, Message

    from tests.fed_helpers import metadata

    rec = Recorder()
    strategy = make_strategy("fedavg", schema=SCHEMA, min_nodes=1, listener=rec, total_rounds=3)
    run_round(strategy, [reply_from(7, train_reply_content("siteA", arrays(1.0))),
                         reply_from(8, train_reply_content("siteB", arrays(1.0)))])
    initial = ArrayRecord({k: Array(v) for k, v in arrays().items()})
    messages = list(strategy.configure_train(2, initial, ConfigRecord(), FakeGrid([7, 8])))
    for m in messages:  # what the Grid does when it pushes them
        m.metadata.__dict__["_message_id"] = f"id-{m.metadata.dst_node_id}"
    md = metadata("train", src=1, dst=0)
    md.__dict__["_reply_to_message_id"] = "id-8"
    unavailable = Message(error=Error(code=5, reason="Node Unavailable"), metadata=md)
    strategy.aggregate_train(2, [reply_from(7, train_reply_content("siteA", arrays(2.0))), unavailable])
    strategy.aggregate_evaluate(2, [])
    assert rec.rounds[-1].missing == ["siteB"] and "Node Unavailable" in rec.rounds[-1].rejected["siteB"]


def declined_content(site: str, **metrics: float) -> RecordDict:
    m = {"num-examples": 10, "epsilon": 2.9, "dp-steps": 12, "dp-sample-rate": 0.25, "dp-noise-multiplier": 1.1,
         "dp-delta": 1e-5, "dp-declined": 1.0, "dp-max-epsilon": 3.0, "dp-epsilon-next": 3.4, **metrics}
    return RecordDict({"metrics": MetricRecord(m), "site": ConfigRecord({"name": site})})


def test_a_site_that_declines_on_budget_is_recorded_and_the_round_goes_on(caplog):
    rec = Recorder()
    strategy = make_strategy("fedavg", schema=SCHEMA, min_nodes=1, listener=rec, total_rounds=2)
    replies = [reply_from(1, train_reply_content("siteA", arrays(2.0), n=10, epsilon=1.5, **{"dp-steps": 8.0},
                                                 eval_examples=4, eval_accuracy=1.0)),
               reply_from(2, declined_content("siteB", eval_examples=4, eval_accuracy=0.5))]
    with caplog.at_level("WARNING"):
        agg, _ = run_round(strategy, replies, grid=FakeGrid([1, 2]))
    np.testing.assert_allclose(agg["a.weight"].numpy(), 2.0)  # siteA's update alone
    report = rec.rounds[-1]
    assert report.answered == ["siteA"] and report.missing == [] and report.rejected == {}
    assert "3.400 > the site's max 3" in report.declined["siteB"] and "siteB" in caplog.text
    assert report.train_metrics["epsilon_max"] == 2.9  # the declining site's spent budget counts
    assert report.train_metrics["train_examples"] == 10
    assert not any(k.startswith("dp") for k in report.train_metrics)  # ledger values are per site only
    assert report.per_site["siteB"]["dp_steps"] == 12 and report.per_site["siteA"]["dp_steps"] == 8
    assert rec.evals[-1][1]["eval_accuracy"] == pytest.approx(0.75)  # its evaluation still counts


def test_a_declining_reply_that_carries_tensors_is_rejected():
    rec = Recorder()
    strategy = make_strategy("fedavg", schema=SCHEMA, min_nodes=1, listener=rec, total_rounds=2)
    content = train_reply_content("siteB", arrays(9.0), **{"dp-declined": 1.0})
    agg, _ = run_round(strategy, [reply_from(1, train_reply_content("siteA", arrays(1.0))), reply_from(2, content)])
    np.testing.assert_allclose(agg["a.weight"].numpy(), 1.0)
    assert "carries adapter tensors" in rec.rounds[-1].rejected["siteB"]
