"""The federation contract end to end in one process: the real site handler's replies through the
real server strategy (instruction -> train_reply -> screening -> aggregation), site identity by
node, the backbone check, and the audit trail against what the server received."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ArrayRecord, Context, RecordDict

from client.audit import read_lines, summarise
from client.cli import main as client_main
from client.task import train_reply
from nearl_core.adapter_io import adapter_schema, get_adapter_state
from nearl_core.config import load_config
from nearl_core.fingerprint import model_fingerprint
from nearl_core.model import build_model
from nearl_protocol import keys
from nearl_protocol.flat import FlatLayout
from nearl_protocol.messages import instruction_config
from server.strategy import make_strategy
from tests.fed_helpers import FakeGrid, RoundRecorder


pytestmark = pytest.mark.usefixtures("task_identity")  # strategies build Messages (tests/conftest.py)


def site_context(node: int, site: str, data, tmp_path) -> Context:
    return Context(run_id=5, node_id=node, state=RecordDict(), run_config={},
                   node_config={"site": site, "data-path": str(data), "state-dir": str(tmp_path / f"state-{node}"),
                                "coordinator": "127.0.0.1:9092"})


def one_round(strategy, model, fingerprint, sites, tmp_path, server_round=1, log=None):
    cfg = model.cfg
    initial = ArrayRecord({k: v.contiguous() for k, v in get_adapter_state(model).items()})
    config = instruction_config(nearl_config=cfg.to_dict(), transport="float32", backbone=fingerprint,
                                local_epochs=1, total_rounds=3)
    messages = list(strategy.configure_train(server_round, initial, config, FakeGrid(list(sites))))
    replies = {}
    for msg in messages:
        node = msg.metadata.dst_node_id
        name, data = sites[node]
        replies[node] = train_reply(msg, site_context(node, name, data, tmp_path), log=log or (lambda *a, **k: None))
    arrays, _ = strategy.aggregate_train(server_round, list(replies.values()))
    strategy.configure_evaluate(server_round, arrays or initial, config, FakeGrid(list(sites)))
    strategy.aggregate_evaluate(server_round, [])
    return messages, replies, arrays


def test_replies_of_the_real_handler_pass_screening_and_a_taken_name_is_refused(demo_root, tmp_path, capsys):
    cfg = load_config("demo", {"train.epochs": 1})
    model = build_model(cfg)
    fingerprint = model_fingerprint(model)
    rec = RoundRecorder()
    strategy = make_strategy("fedavg", schema=adapter_schema(model), min_nodes=1, listener=rec, total_rounds=3)
    sites = {11: ("site1", demo_root / "site1"), 12: ("site2", demo_root / "site2")}
    one_round(strategy, model, fingerprint, sites, tmp_path)  # site1 is node 11's from now on
    sites[13] = ("site1", demo_root / "site2")  # a node joining later claims the taken name
    _, replies, arrays = one_round(strategy, model, fingerprint, sites, tmp_path, server_round=2)
    report = rec.rounds[-1]
    assert report.answered == ["site1", "site2"]
    assert report.rejected == {"site1@node-13": "duplicate site name: site1 belongs to node 11"}
    # the aggregate is the example-weighted mean of exactly the two accepted updates (round 2)
    layout = FlatLayout.of(adapter_schema(model))  # what travels: one flat array per reply, split by the schema
    sent = {node: layout.split(layout.read(r.content[keys.ARRAYS])) for node, r in replies.items()}
    counts = {node: r.content["metrics"][keys.NUM_EXAMPLES] for node, r in replies.items()}
    w = counts[11] / (counts[11] + counts[12])
    for name in sent[11]:
        np.testing.assert_allclose(arrays[name].numpy(), w * sent[11][name] + (1 - w) * sent[12][name], rtol=1e-5,
                                   atol=1e-7)
    # each site's audit trail holds the hash of exactly what the server received from it
    for node, site in ((11, "site1"), (12, "site2")):
        line = read_lines(tmp_path / f"state-{node}" / "audit.jsonl")[-1]
        assert line["payload_sha256"] == report.payload_sha256[site]
        assert line["run_id"] == 1 and line["round"] == 2 and line["coordinator"] == "127.0.0.1:9092"
        assert line["metrics"][keys.NUM_EXAMPLES] == counts[node] and line["bytes_sent"] > 4 * 1000
        assert {tuple(a[:1]) for a in line["arrays"]} == {(k,) for k in adapter_schema(model)}

    # next round the refused node is told why, says so in its own log, and sends nothing
    printed = []
    messages, replies, _ = one_round(strategy, model, fingerprint, sites, tmp_path, server_round=3,
                                     log=lambda *a, **k: printed.append(" ".join(map(str, a))))
    refused = replies[13]
    assert refused.has_error() and "duplicate site name" in refused.error.reason
    assert any("refused: the coordinator refuses this node: duplicate site name" in p for p in printed)
    assert rec.rounds[-1].answered == ["site1", "site2"], rec.rounds[-1]
    audit = read_lines(tmp_path / "state-13" / "audit.jsonl")
    assert audit[-1]["refused"] and audit[-1]["arrays"] == []
    assert summarise(audit)[0]["refusals"] == [f"round 3: {audit[-1]['refused']}"]
    assert client_main(["audit", "--state-dir", str(tmp_path / "state-13")]) == 0
    assert "refused round 3: the coordinator refuses this node: duplicate site name" in capsys.readouterr().out


def test_a_site_on_another_backbone_refuses_and_the_server_records_why(demo_root, tmp_path):
    cfg = load_config("demo")
    model = build_model(cfg)
    rec = RoundRecorder()
    strategy = make_strategy("fedavg", schema=adapter_schema(model), min_nodes=1, listener=rec, total_rounds=1)
    theirs = "nearl-tiny|sha256:" + "ab" * 32 + "|arch=0000000000000000"
    _, replies, arrays = one_round(strategy, model, theirs, {21: ("site1", demo_root / "site1")}, tmp_path)
    assert arrays is None and replies[21].has_error()
    reason = rec.rounds[-1].rejected["site1"]
    assert reason == f"backbone mismatch: expected {theirs}, have {model_fingerprint(model)}"
    line = read_lines(tmp_path / "state-21" / "audit.jsonl")[-1]
    assert line["refused"] == reason and line["bytes_sent"] == 0 and line["payload_sha256"] is None


def test_fingerprints_tell_backbones_apart(tmp_path):
    import torch

    base = build_model(load_config("demo"))
    assert model_fingerprint(base) == model_fingerprint(build_model(load_config("demo")))  # same everywhere
    deeper = build_model(load_config("demo", {"model.name": "nearl-tiny-deep-text"}))
    assert model_fingerprint(deeper) != model_fingerprint(base)  # other architecture
    weights = tmp_path / "tiny.pt"
    torch.save({k: v + 0.5 for k, v in base.clip.state_dict().items()}, weights)
    from_file = build_model(load_config("demo", {"model.pretrained": str(weights)}))
    assert model_fingerprint(from_file).startswith("nearl-tiny|sha256:")
    assert model_fingerprint(from_file).split("|")[2] == model_fingerprint(base).split("|")[2]  # same layout
    assert model_fingerprint(from_file) != model_fingerprint(base)


def test_the_audit_trail_cli_reads_json_and_refuses_a_damaged_file(tmp_path, capsys):
    state = tmp_path / "state"
    state.mkdir()
    lines = [{"run_id": 9, "round": r, "bytes_sent": 1000, "epsilon_after": e, "refused": None, "declined": None,
              "site": "siteA", "coordinator": "fl:9092"} for r, e in ((1, 0.5), (2, 0.9))]
    (state / "audit.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert client_main(["audit", "--state-dir", str(state), "--json"]) == 0
    (run,) = json.loads(capsys.readouterr().out)
    assert (run["rounds"], run["bytes_sent"], run["max_epsilon"], run["refusals"]) == ([1, 2], 2000, 0.9, [])
    (state / "audit.jsonl").write_text("{not json\n")
    assert client_main(["audit", "--state-dir", str(state)]) == 2
    assert "audit.jsonl:1 is not a JSON line" in capsys.readouterr().err


def test_an_audit_line_with_a_metric_without_value_is_still_written(tmp_path):
    """AUROC of a one-class split is NaN: the line records null rather than failing the reply."""
    from client.audit import append

    append(tmp_path / "audit.jsonl", {"metrics": {"eval-auroc": float("nan"), "eval-accuracy": 0.5}, "round": 1})
    assert read_lines(tmp_path / "audit.jsonl") == [{"metrics": {"eval-auroc": None, "eval-accuracy": 0.5},
                                                     "round": 1}]
