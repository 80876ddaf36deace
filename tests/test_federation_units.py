"""Federation logic without processes: checkpoints, run-config mapping, MLflow logging, CLI checks."""

import tomllib
from pathlib import Path

import numpy as np
import pytest

from nearl_core.config import NearlConfig, load_config
from nearl_core.errors import ConfigError
from nearl_protocol import processes as flower
from server.checkpoint import (
    Checkpoint,
    CheckpointError,
    check_schema,
    complete_rounds,
    load_latest,
    save_checkpoint,
)
from server.settings import FederationSettings
from server.strategy import RoundReport
from server.tracking import Tracker, finite_metrics, metric_key, resolve_tracking_uri

ROOT = Path(__file__).resolve().parents[1]
ARR = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float32)}


# -- checkpoints ------------------------------------------------------------------------------------------
def test_checkpoint_round_trip_keeps_arrays_state_and_meta(tmp_path):
    state = {"m_t": {"a": np.full((2, 3), 0.5)}, "v_t": {"a": np.full((2, 3), 0.25)}}
    save_checkpoint(tmp_path, Checkpoint(1, ARR, state, {"mlflow_run_id": "abc", "strategy": "fedadam"}))
    save_checkpoint(tmp_path, Checkpoint(2, {k: v + 1 for k, v in ARR.items()}, state, {"mlflow_run_id": "abc"}))
    ck = load_latest(tmp_path)
    assert ck.round == 2 and ck.mlflow_run_id == "abc"
    np.testing.assert_array_equal(ck.arrays["a"], ARR["a"] + 1)
    np.testing.assert_array_equal(ck.strategy_state["v_t"]["a"], 0.25)


def test_half_written_checkpoints_are_never_loaded(tmp_path):
    save_checkpoint(tmp_path, Checkpoint(1, ARR, {}, {"mlflow_run_id": "r1"}))
    # a crash mid-write leaves a temporary directory ...
    crashed = tmp_path / ".tmp-round-0002-xyz"
    crashed.mkdir()
    (crashed / "adapters.safetensors").write_bytes(b"\x00" * 10)
    # ... or a round directory without its state file (not our writer, but never trust it)
    partial = tmp_path / "round-0003"
    partial.mkdir()
    (partial / "adapters.safetensors").write_bytes(b"garbage")
    assert complete_rounds(tmp_path) == [1]
    assert load_latest(tmp_path).round == 1


def test_a_corrupt_newest_round_falls_back_to_the_previous_one(tmp_path):
    save_checkpoint(tmp_path, Checkpoint(1, ARR, {}, {}))
    save_checkpoint(tmp_path, Checkpoint(2, ARR, {}, {}))
    (tmp_path / "round-0002" / "adapters.safetensors").write_bytes(b"corrupt")
    assert load_latest(tmp_path).round == 1


def test_a_failing_write_leaves_no_trace(tmp_path, monkeypatch):
    import server.checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck.os, "rename", boom)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, Checkpoint(1, ARR, {}, {}))
    assert list(tmp_path.iterdir()) == []


def test_only_the_newest_rounds_are_kept(tmp_path):
    for r in range(1, 6):
        save_checkpoint(tmp_path, Checkpoint(r, ARR, {}, {}), keep=2)
    assert complete_rounds(tmp_path) == [4, 5]


def test_resume_errors_are_readable(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_latest(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_latest(tmp_path)
    with pytest.raises(CheckpointError, match="shape"):
        check_schema(ARR, {"a": ((3, 2), "float32"), "b": ((4,), "float32")}, "ckpt")


# -- run config -> settings + NEARL config ------------------------------------------------------------------
def pyproject_run_config() -> dict:
    from flwr.common.config import flatten_dict

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return flatten_dict(data["tool"]["flwr"]["app"]["config"])


def test_pyproject_declares_the_app_and_every_key_maps():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    app = data["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "server.app:app", "clientapp": "client.app:app"}
    rc = pyproject_run_config()
    s = FederationSettings.from_run_config(rc)
    assert s.strategy == "fedavg" and s.min_nodes == 2 and s.overrides == ()
    known = set(NearlConfig().flat())
    nearl_keys = [k for k in rc if "." in k]
    assert nearl_keys and all(k in known for k in nearl_keys), set(nearl_keys) - known


def test_run_config_overrides_map_onto_the_nearl_config():
    rc = {**pyproject_run_config(), "train.lr": 0.0005, "adapter.rank": 8, "train.batch-size": 4,
          "num-server-rounds": 7, "strategy": "FedAdam", "evaluate-in-train": "false"}
    s = FederationSettings.from_run_config(rc)
    cfg = s.nearl_config()
    assert (cfg.train.lr, cfg.adapter.rank, cfg.train.batch_size) == (0.0005, 8, 4)
    assert cfg.adapter.width == load_config("demo").adapter.width  # "" keeps the config file's value
    assert s.num_rounds == 7 and s.strategy == "fedadam" and s.evaluate_in_train is False


def test_server_dp_and_transport_flags_reach_the_resolved_config(tmp_path):
    from server.cli import Server, build_parser

    args = build_parser().parse_args(["--insecure", "--dp-epsilon", "3", "--dp-delta", "1e-6", "--transport-dtype",
                                      "bf16", "--checkpoint-dir", str(tmp_path / "ckpt")])
    s, _ = Server(args, tmp_path).validate()
    cfg = s.nearl_config()
    assert cfg.privacy.enabled and cfg.privacy.target_epsilon == 3.0 and cfg.privacy.delta == 1e-6
    assert cfg.privacy.noise_multiplier is None
    assert s.transport_dtype == "bf16" and not s.central_dp and s.overrides == ()  # the config travels as a file


@pytest.mark.parametrize("bad, match", [
    ({"transport-dtype": "int8"}, "transport-dtype must be one of"),
    ({"strategy": "fedsgd"}, "strategy must be one of"),
    ({"min-nodes": 0}, "min-nodes"),
    ({"fraction-train": 1.5}, "fraction-train"),
    ({"train.lr": -1.0}, "train.lr"),
    ({"adapter.nonsense": 3}, "unknown config key"),
])
def test_bad_run_config_is_a_readable_error(bad, match):
    with pytest.raises(ConfigError, match=match):
        FederationSettings.from_run_config({**pyproject_run_config(), **bad}).nearl_config()


def test_run_config_file_round_trips_through_flowers_parser(tmp_path):
    from flwr.common.config import parse_config_args

    values = {"num-server-rounds": 2, "config": "/x/y z.yaml", "evaluate-in-train": True, "train.lr": 0.001,
              "progress-file": '/tmp/a"b.jsonl'}
    path = flower.write_run_config(tmp_path / "rc.toml", values)
    assert parse_config_args([str(path)]) == values


def test_node_config_quoting():
    cmd = flower.supernode_command(superlink="h:1", port=2, node_config={"site": "siteA", "data-path": "/d/x y"},
                                   certs=None)
    assert cmd[cmd.index("--node-config") + 1] == 'site="siteA" data-path="/d/x y"'
    with pytest.raises(flower.FlowerError):
        flower.quote_node_value('a"b')


# -- MLflow logging ------------------------------------------------------------------------------------------
def test_tracking_uri_and_keys():
    assert resolve_tracking_uri("sqlite:///mlflow.db", "/w") == "sqlite:////w/mlflow.db"
    assert resolve_tracking_uri("sqlite:////abs/m.db", "/w") == "sqlite:////abs/m.db"
    assert resolve_tracking_uri("http://h:5000", "/w") == "http://h:5000"
    assert metric_key("site A:1/eval_accuracy") == "site A_1/eval_accuracy"
    assert finite_metrics({"a": 1, "b": float("nan"), "c": True, "d": "x"}) == {"a": 1.0}


def test_round_log_writes_mlflow_metrics_and_checkpoints(tmp_path):
    """The listener's output for two rounds, against a real sqlite store in tmp_path."""
    from flwr.app import Array, ArrayRecord

    from server.events import EvalEvent, ProgressWriter, RoundEvent, read_all
    from server.round_log import RoundLog
    from server.strategy import make_strategy

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "nearl-federated", run_name="t")
    settings = FederationSettings.from_run_config({**pyproject_run_config(), "num-server-rounds": 2,
                                                   "checkpoint-dir": str(tmp_path / "ck")})
    fed_schema = {"a": ((2, 3), "float32"), "b": ((4,), "float32")}
    listener = RoundLog(settings, tracker, ProgressWriter(tmp_path / "p.jsonl"), fed_schema,
                        {"mlflow_run_id": tracker.run_id}, initial=ArrayRecord())
    strategy = make_strategy("fedavg", schema=fed_schema, min_nodes=1)
    arrays = ArrayRecord({k: Array(v) for k, v in ARR.items()})
    listener.evaluated(0, {"eval_accuracy": 0.3, "eval_loss": 1.2}, {"siteA": {"eval_accuracy": 0.3}})
    for r in (1, 2):
        report = RoundReport(round=r, arrays=arrays, train_metrics={"train_loss": 1.0 / r}, answered=["siteA"],
                             missing=["siteB"] if r == 2 else [], sampled=2, bytes_sent=100, bytes_received=90,
                             seconds=1.5, aggregated=True,
                             per_site={"siteA": {"train_loss": 1.0 / r}})
        listener.round_finished(report, strategy)
    h = tracker.history
    assert h("train_loss") == {1: 1.0, 2: 0.5}
    assert h("eval_accuracy") == {0: 0.3} and h("siteA/eval_accuracy") == {0: 0.3}
    assert h("sites_answered") == {1: 1.0, 2: 1.0} and h("sites_missing") == {1: 0.0, 2: 1.0}
    assert h("siteB/answered") == {2: 0.0} and h("bytes_sent")[2] == 100 and h("round_seconds")[1] == 1.5
    zero, first, second = read_all(tmp_path / "p.jsonl")  # what nearl-server shows of the same rounds
    assert isinstance(zero, EvalEvent) and zero.step == 0 and zero.sites == {"siteA": {"eval_accuracy": 0.3}}
    assert isinstance(second, RoundEvent) and (second.round, second.rounds, second.missing) == (2, 2, ["siteB"])
    assert first.eval_step == 0 and first.eval == {"eval_accuracy": 0.3, "eval_loss": 1.2}
    assert second.checkpoint == str(tmp_path / "ck" / "round-0002")
    run = tracker.client.get_run(tracker.run_id)
    assert run.data.tags["round_0002_missing"] == "siteB"
    tracker.set_tags({f"payload_sha256/round_0003/site{i}": f"h{i}" for i in range(150)})  # two batch requests
    tags = tracker.client.get_run(tracker.run_id).data.tags
    assert tags["payload_sha256/round_0003/site0"] == "h0" and tags["payload_sha256/round_0003/site149"] == "h149"
    assert complete_rounds(tmp_path / "ck") == [1, 2]
    assert load_latest(tmp_path / "ck").mlflow_run_id == tracker.run_id
    resumed = Tracker(uri, run_id=tracker.run_id)
    assert resumed.run_id == tracker.run_id


def _record(values: dict[str, np.ndarray]):
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({k: Array(v) for k, v in values.items()})


def test_a_resumed_run_keeps_its_best_round_so_far(tmp_path):
    """In-train evaluation: step r-1 arrives during round r.  Round 2 validates best (0.8); the coordinator
    stops after round 3; the resumed listener holds round 2's adapters and ranks round 3 (0.7) against them."""
    from server.checkpoint import BEST_FILE
    from server.events import ProgressWriter
    from server.federation import resumed_selection
    from server.round_log import RoundLog, numpy_to_arrays
    from server.strategy import make_strategy

    settings = FederationSettings.from_run_config({**pyproject_run_config(), "num-server-rounds": 5,
                                                   "checkpoint-dir": str(tmp_path / "ck"), "keep-checkpoints": 0})
    schema = {"a": ((2, 3), "float32"), "b": ((4,), "float32")}
    adapters = {r: {k: v + r for k, v in ARR.items()} for r in range(6)}  # the global adapters after round r
    strategy = make_strategy("fedavg", schema=schema, min_nodes=1)
    val = {0: 0.9, 1: 0.5, 2: 0.8, 3: 0.7, 4: 0.85}  # zero-shot's 0.9 is no candidate

    def run(listener, rounds):
        for r in rounds:
            listener.evaluated(r - 1, {"eval_balanced_accuracy": val[r - 1]}, {})
            listener.round_finished(RoundReport(round=r, arrays=_record(adapters[r])), strategy)

    first = RoundLog(settings, None, ProgressWriter(None), schema, {}, initial=_record(adapters[0]))
    run(first, (1, 2, 3))
    assert first.selected()[0] == 2
    ckpt = load_latest(tmp_path / "ck")
    assert ckpt.round == 3 and ckpt.meta["selection"] == {"by": "balanced-accuracy", "best_round": 2,
                                                          "best_value": 0.8, "latest": 2}
    np.testing.assert_array_equal(ckpt.best["a"], adapters[2]["a"])
    assert not (tmp_path / "ck" / "round-0001" / BEST_FILE).exists()  # round 1's validation came in round 2

    resumed = RoundLog(settings, None, ProgressWriter(None), schema, {}, initial=numpy_to_arrays(ckpt.arrays),
                       start_round=3, **resumed_selection(ckpt, settings, schema))
    held, arrays = resumed.selected()
    assert held == 2 and np.array_equal(arrays["a"].numpy(), adapters[2]["a"])
    run(resumed, (4,))  # round 3 validates 0.7: round 2 stays
    assert resumed.selected()[0] == 2 and resumed.selection.since_best() == 1 and resumed.selection.exhausted(1)
    assert load_latest(tmp_path / "ck").meta["selection"]["latest"] == 3
    run(resumed, (5,))  # round 4 validates 0.85: it wins
    held, arrays = resumed.selected()
    assert held == 4 and np.array_equal(arrays["b"].numpy(), adapters[4]["b"])

    other = FederationSettings.from_run_config({**pyproject_run_config(), "select-by": "loss"})
    with pytest.raises(CheckpointError, match="selects rounds by balanced-accuracy, not loss"):
        resumed_selection(ckpt, other, schema)


def test_a_round_validated_in_its_own_evaluate_message_is_kept_once_it_is_aggregated(tmp_path):
    """Without in-train evaluation step r arrives before round r is reported: its adapters are taken then."""
    from server.events import ProgressWriter
    from server.round_log import RoundLog
    from server.strategy import make_strategy

    settings = FederationSettings.from_run_config({**pyproject_run_config(), "checkpoint-dir": "",
                                                   "select-by": "loss"})
    strategy = make_strategy("fedavg", schema={"a": ((2, 3), "float32")}, min_nodes=1)
    log = RoundLog(settings, None, ProgressWriter(None), {"a": ((2, 3), "float32")}, {},
                   initial=_record({"a": ARR["a"]}))
    for r, loss in ((1, 0.4), (2, 0.6)):
        log.evaluated(r, {"eval_loss": loss}, {})
        log.round_finished(RoundReport(round=r, arrays=_record({"a": ARR["a"] * r})), strategy)
    held, arrays = log.selected()
    assert held == 1 and np.array_equal(arrays["a"].numpy(), ARR["a"])
    assert log.last_round == 2 and np.array_equal(log.final_arrays["a"].numpy(), ARR["a"] * 2)


def test_server_cli_refuses_a_reused_checkpoint_dir_and_bad_config(tmp_path, capsys):
    from server.cli import main

    save_checkpoint(tmp_path / "ck", Checkpoint(1, ARR, {}, {}))
    assert main(["--insecure", "--checkpoint-dir", str(tmp_path / "ck"), "--rounds", "2"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["--insecure", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["--checkpoint-dir", str(tmp_path / "new"), "--certs", str(tmp_path)]) == 2
    assert "make-certs.sh" in capsys.readouterr().err


def test_client_cli_refuses_a_bad_site_folder_before_joining(tmp_path, capsys):
    from client.cli import main

    (tmp_path / "site" / "train" / "normal").mkdir(parents=True)
    (tmp_path / "site" / "train" / "normal" / "x.png").write_bytes(b"not a png")
    (tmp_path / "site" / "val" / "normal").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "site" / "val" / "normal" / "ok.png")
    assert main(["--site", "siteA", "--data", str(tmp_path / "site"), "--insecure"]) == 2
    err = capsys.readouterr().err
    assert "nearl-client: error:" in err and "x.png" in err
    assert main(["--site", "bad name", "--data", str(tmp_path), "--insecure"]) == 2
    assert main(["--site", "a", "--data", str(tmp_path), "--server", "nohostport", "--insecure"]) == 2
