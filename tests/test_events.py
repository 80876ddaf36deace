"""Progress events: each type through the one writer and the one reader, the file format other tools read,
partial lines, and the refusals; and that nothing else reads an event by its ``"event"`` string."""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest

from server.events import (DoneEvent, ErrorEvent, EvalEvent, ProgressReader, ProgressWriter, RoundEvent, StartEvent,
                           parse, read_all, select)

ROOT = Path(__file__).resolve().parent.parent

START = StartEvent(time=1.0, rounds=5, start_round=1, strategy="fedavg", min_nodes=2, run_id="abc",
                   mlflow_uri="sqlite:////tmp/mlflow.db", payload_bytes=1234, trainable_parameters=308,
                   backbone="f00d", resumed=False, settings={"strategy": "fedavg", "local-epochs": 2},
                   config={"train": {"lr": 0.003}}, config_sha256="c0ffee")
EVAL = EvalEvent(time=2.0, step=0, metrics={"eval_accuracy": 0.5, "eval_loss": 1.25},
                 sites={"site1": {"eval_accuracy": 0.25}, "site2": {"eval_accuracy": 0.75}})
ROUND = RoundEvent(time=3.0, round=1, rounds=5, answered=["site1"], missing=["site2"], rejected={"site3": "nan"},
                   declined={"site4": "declined: privacy budget"}, sampled=4, aggregated=True, not_applied="",
                   payload_sha256={"site1": "ab12"}, seconds=1.5, bytes_sent=100, bytes_received=90,
                   train={"train_loss": 0.75, "epsilon_max": 1.5}, eval_step=0, eval={"eval_accuracy": 0.5},
                   checkpoint="/ck/round-0001")
DONE = DoneEvent(time=4.0, round=4, adapters="/ck/final", run_id=None, model_version="3", selected_round=2,
                 select_by="balanced-accuracy", selected_value=0.5, last_adapters="/ck/last",
                 stopped="validation balanced accuracy has not improved for 2 round(s) since round 2 (0.5); patience 2",
                 test={"test_accuracy": 0.625, "test_balanced_accuracy": 0.6, "personal_accuracy": math.nan})
ERROR = ErrorEvent(time=5.0, message="NotEnoughSites: 1 of 2 sites")
EVENTS = [START, EVAL, ROUND, DONE, ERROR]


def test_every_event_type_survives_the_writer_and_the_reader_exactly(tmp_path):
    writer = ProgressWriter(tmp_path / "progress.jsonl")
    for event in EVENTS:
        writer.emit(event)
    assert read_all(tmp_path / "progress.jsonl") == EVENTS
    assert [type(e).kind for e in EVENTS] == ["start", "eval", "round", "done", "error"]
    assert select(EVENTS, RoundEvent) == [ROUND]


def test_the_file_keeps_the_field_names_and_order_other_tools_read(tmp_path):
    writer = ProgressWriter(tmp_path / "p.jsonl")
    writer.emit(ROUND)
    writer.emit(ERROR)
    first, second = (tmp_path / "p.jsonl").read_text().splitlines()
    assert list(json.loads(first)) == [
        "event", "time", "round", "rounds", "answered", "missing", "rejected", "declined", "sampled", "aggregated",
        "not_applied", "payload_sha256", "seconds", "bytes_sent", "bytes_received", "train", "eval_step", "eval",
        "checkpoint"]
    assert second == '{"event": "error", "time": 5.0, "message": "NotEnoughSites: 1 of 2 sites"}'
    assert list(START.to_dict()) == ["event", "time", "rounds", "start_round", "strategy", "min_nodes", "run_id",
                                     "mlflow_uri", "payload_bytes", "trainable_parameters", "backbone", "resumed",
                                     "settings", "config", "config_sha256"]
    assert list(EVAL.to_dict()) == ["event", "time", "step", "metrics", "sites"]
    assert list(DONE.to_dict()) == ["event", "time", "round", "adapters", "run_id", "model_version", "selected_round",
                                    "select_by", "selected_value", "last_adapters", "stopped", "test"]


def test_metrics_that_are_not_finite_numbers_become_null():
    event = replace(ROUND, train={"a": math.nan, "b": math.inf, "c": 2, "d": "x"}, eval={"e": -math.inf})
    assert event.train == {"a": None, "b": None, "c": 2, "d": None} and event.eval == {"e": None}
    line = event.to_json()
    assert '"train": {"a": null, "b": null, "c": 2, "d": null}' in line and "NaN" not in line
    assert parse(line) == event
    evaluated = EvalEvent(step=1, metrics={"m": math.nan}, sites={"s": {"m": math.inf}})
    assert (evaluated.metrics, evaluated.sites) == ({"m": None}, {"s": {"m": None}})


def test_the_reader_returns_whole_lines_once_and_keeps_a_partial_last_line_for_later(tmp_path):
    path = tmp_path / "progress.jsonl"
    reader = ProgressReader(path)
    assert reader.read_new() == []  # no file yet: the ServerApp has not started
    second = ROUND.to_json()
    path.write_text(START.to_json() + "\n" + second[:40])
    assert reader.read_new() == [START]
    assert reader.read_new() == []
    with open(path, "a") as fh:
        fh.write(second[40:] + "\n" + DONE.to_json())
    assert reader.read_new() == [ROUND]
    with open(path, "a") as fh:
        fh.write("\n")
    assert reader.read_new() == [DONE]
    assert reader.read_new() == []


def test_an_unknown_kind_and_a_missing_field_are_refused_by_name():
    with pytest.raises(ValueError) as err:
        parse({"event": "finish", "time": 1.0})
    assert str(err.value) == "unknown progress event kind 'finish'; expected one of start, eval, round, done, error"
    with pytest.raises(ValueError) as err:
        parse('{"event": "done", "time": 1.0, "round": 2, "adapters": "/a"}')
    assert str(err.value) == ("progress event 'done' lacks run_id, model_version, selected_round, select_by, "
                              "selected_value, last_adapters, stopped, test")
    with pytest.raises(ValueError) as err:
        parse({"time": 1.0, "message": "x"})
    assert str(err.value) == "unknown progress event kind None; expected one of start, eval, round, done, error"
    with pytest.raises(ValueError, match="a progress event is a JSON object, got list"):
        parse("[1, 2]")


def test_a_field_a_newer_writer_adds_is_ignored():
    assert parse({**ERROR.to_dict(), "site": "site1"}) == ERROR


def test_the_reader_names_the_file_and_line_of_a_bad_event(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(START.to_json() + "\n" + '{"event": "paused", "time": 2.0}\n')
    with pytest.raises(ValueError) as err:
        read_all(path)
    assert str(err.value) == (f"{path}, line 2: unknown progress event kind 'paused'; expected one of start, eval, "
                              "round, done, error")
    with pytest.raises(FileNotFoundError):
        read_all(tmp_path / "missing.jsonl")


def test_the_writer_logs_every_event_and_writes_no_file_without_a_path(tmp_path, caplog, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO, logger="nearl.federation"):
        ProgressWriter(None).emit(ERROR)
        ProgressWriter("").emit(DONE)
    assert [r.getMessage() for r in caplog.records] == [ERROR.to_json(), DONE.to_json()]
    assert list(tmp_path.iterdir()) == []


def test_nearl_servers_view_reads_the_typed_events():
    from server.progress_view import format_event, format_summary

    lines = [format_event(e) for e in EVENTS]
    assert lines[1] == "zero-shot (round 0) eval acc 0.500 bal_acc n/a"
    assert lines[2].startswith("round 1/5  sites 1/4  train_loss 0.750  eps_max 1.50  eval@0 acc 0.500")
    assert lines[2].endswith("missing: site2\n    site4 declined: privacy budget\n    rejected site3: nan")
    assert lines[3:] == [
        "stopped early after round 4: validation balanced accuracy has not improved for 2 round(s) since round 2 "
        "(0.5); patience 2\n"
        "done: final adapters in /ck/final (round 2); the last round's (4) in /ck/last; MLflow run None, "
        "model version 3",
        "ServerApp error: NotEnoughSites: 1 of 2 sites"]
    assert DONE.test["personal_accuracy"] is None  # not a finite number: null in the file
    summary = format_summary(EVENTS).splitlines()
    assert summary[3] == f"{'eval_accuracy':<26}{'0.500':>16}"  # one evaluation: round 0 only
    assert summary[-1] == ("selected round 2 (balanced accuracy 0.500); on the sites' test splits: accuracy 0.625, "
                           "balanced accuracy 0.600")


def test_the_summary_sets_round_0_the_selected_round_and_the_last_round_side_by_side():
    from server.progress_view import format_summary

    evals = [EvalEvent(step=s, metrics={"eval_balanced_accuracy": v}, sites={}) for s, v in ((0, 0.3), (1, 0.4),
                                                                                               (2, 0.7), (3, 0.6))]
    summary = format_summary([*evals, replace(DONE, round=3, selected_value=0.7, test={})]).splitlines()
    assert summary[0] == f"{'validation metric':<26}{'round 0':>16}{'round 2 (sel.)':>16}{'round 3':>16}"
    assert summary[4] == f"{'eval_balanced_accuracy':<26}{'0.300':>16}{'0.700':>16}{'0.600':>16}"
    assert summary[-1] == "selected round 2 (balanced accuracy 0.700)"
    last = format_summary([*evals, replace(DONE, round=3, selected_round=3, select_by="loss", selected_value=None)])
    assert last.splitlines()[0].endswith(f"{'round 3 (sel.)':>16}")
    assert last.splitlines()[-1].startswith("selected round 3 (loss n/a)")


def test_the_mlflow_names_the_server_reads_are_the_sites_wire_keys_under_mlflow_name():
    """The events' metric dicts and the MLflow run use these names; a renamed wire key must not drift apart."""
    from nearl_protocol import keys

    derived = {keys.NUM_EXAMPLES: keys.MLFLOW_TRAIN_EXAMPLES, keys.TRAIN_LOSS: keys.MLFLOW_TRAIN_LOSS,
               keys.TRAIN_SECONDS: keys.MLFLOW_TRAIN_SECONDS, keys.EVAL_EXAMPLES: keys.MLFLOW_EVAL_EXAMPLES,
               keys.TEST_EXAMPLES: keys.MLFLOW_TEST_EXAMPLES, keys.PERSONAL_EXAMPLES: keys.MLFLOW_PERSONAL_EXAMPLES,
               keys.EVAL_PREFIX: keys.MLFLOW_EVAL_PREFIX, keys.TEST_PREFIX: keys.MLFLOW_TEST_PREFIX,
               keys.PERSONAL_PREFIX: keys.MLFLOW_PERSONAL_PREFIX, keys.EPSILON: keys.MLFLOW_EPSILON,
               keys.DP_EPSILON_NEXT: keys.MLFLOW_DP_EPSILON_NEXT, keys.DP_MAX_EPSILON: keys.MLFLOW_DP_MAX_EPSILON,
               keys.wire_metric(keys.EVAL_PREFIX, "balanced_accuracy"): keys.MLFLOW_EVAL_BALANCED_ACCURACY,
               keys.wire_metric(keys.EVAL_PREFIX, "macro_f1"): keys.MLFLOW_EVAL_MACRO_F1}
    assert {wire: keys.mlflow_name(wire) for wire in derived} == derived
    assert all(keys.mlflow_name(k).startswith(keys.MLFLOW_DP_PREFIX) for k in keys.LEDGER if k != keys.EPSILON)


def test_no_module_reads_an_event_by_its_kind_string():
    """Everything reads progress through server.events, so a field or kind is named in one place."""
    by_string = re.compile(r"""\[\s*["']event["']\s*\]|\.get\(\s*["']event["']""")
    skip = {ROOT / "server" / "events.py", Path(__file__).resolve()}
    offenders = []
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).parts
        if path in skip or any(p.startswith(".") or p in ("build", "dist", "runs", "__pycache__") for p in parts):
            continue
        text = path.read_text(errors="replace")
        offenders += [f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}"
                      for m in by_string.finditer(text)]
    assert offenders == [], f"read events through server.events instead: {offenders}"
