"""What leaves a site: the egress check, and the reply records the real handlers produce."""

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict

from client.egress import EgressError, check_reply, pack_outgoing
from client.task import evaluate_reply, train_reply
from nearl_core.adapter_io import adapter_schema, get_adapter_state
from nearl_core.config import load_config
from nearl_core.demo_data import generate_demo_data
from nearl_core.model import build_model
from nearl_protocol.flat import FlatLayout
from nearl_protocol.schema import parameter_count
from tests.fed_helpers import flat_record, instruction

SCHEMA = {"oca.w": ((2, 3), "float32"), "q.tokens": ((4,), "float32")}


def good(**changes) -> RecordDict:
    records = {
        "arrays": flat_record({k: np.zeros(s, d) for k, (s, d) in SCHEMA.items()}),
        "metrics": MetricRecord({"num-examples": 10, "train-loss": 0.5}),
        "site": ConfigRecord({"name": "siteA"}),
    }
    records.update(changes)
    return RecordDict({k: v for k, v in records.items() if v is not None})


def test_sound_reply_passes():
    check_reply(good(), SCHEMA, with_arrays=True)
    check_reply(good(arrays=None), SCHEMA, with_arrays=False)


@pytest.mark.parametrize("content, match", [
    (lambda: good(extra=ConfigRecord({"note": "x"})), "differ from the allowed"),
    (lambda: good(images=ArrayRecord({"x": Array(np.zeros((2, 3, 8, 8), np.float32))})), "differ from the allowed"),
    (lambda: good(arrays=ArrayRecord({"adapters": Array(np.zeros(10, np.float32)),
                                      "clip.visual.proj": Array(np.zeros((4, 4), np.float32))})), "unexpected"),
    (lambda: good(arrays=ArrayRecord({k: Array(np.zeros(s, d)) for k, (s, d) in SCHEMA.items()})), "missing"),
    (lambda: good(arrays=ArrayRecord({"adapters": Array(np.zeros(26, np.float32))})), "holds 26 values"),
    (lambda: good(arrays=ArrayRecord({"adapters": Array(np.zeros((2, 5), np.float32))})), "has shape"),
    (lambda: good(arrays=ArrayRecord({"adapters": Array(np.zeros(10, np.float64))})), "has dtype"),
    (lambda: good(arrays=ArrayRecord({"adapters": Array(dtype="float32", shape=(10,), stype="numpy.ndarray",
                                                        data=Array(np.zeros(10, np.float32)).data + b"hidden")})),
     "data bytes"),
    (lambda: good(metrics=MetricRecord({"num-examples": 10, "per_sample_logits": [0.1, 0.9, 0.3]})), "scalar"),
    (lambda: good(metrics=ConfigRecord({"num-examples": 10, "note": "patient 17"})), "expected MetricRecord"),
    (lambda: good(site=ConfigRecord({"name": "siteA", "path": "/data/siteA"})), "only 'name'"),
    (lambda: good(site=ConfigRecord({"name": "site A; rm"})), "site name"),
])
def test_violations_abort_the_reply(content, match):
    with pytest.raises(EgressError, match=match):
        check_reply(content(), SCHEMA, with_arrays=True)


def test_arrays_in_an_evaluate_reply_are_refused():
    with pytest.raises(EgressError):
        check_reply(good(), SCHEMA, with_arrays=False)


@pytest.mark.parametrize("tensors, match", [
    ({"oca.w": np.zeros((2, 3), np.float32), "q.tokens": np.zeros(4, np.float32), "leak": np.zeros(3, np.float32)},
     r"unexpected \['leak'\]"),
    ({"oca.w": np.zeros((2, 3), np.float32)}, r"missing \['q.tokens'\]"),
    ({"oca.w": np.zeros((3, 2), np.float32), "q.tokens": np.zeros(4, np.float32)}, "'oca.w' has shape"),
    ({"oca.w": np.zeros((2, 3), np.float32), "q.tokens": np.zeros(4, np.float64)}, "'q.tokens' has dtype float64"),
])
def test_packing_checks_every_tensor_against_the_schema_before_anything_is_flattened(tensors, match):
    """A transposed tensor has the same flat bytes as the right one: the split is checked before packing."""
    with pytest.raises(EgressError, match=f"outgoing .*{match}.*refusing to send"):
        pack_outgoing(tensors, SCHEMA)
    flat = pack_outgoing({k: np.full(s, i, d) for i, (k, (s, d)) in enumerate(SCHEMA.items())}, SCHEMA)
    assert flat.dtype == np.float32 and flat.tolist() == [0.0] * 6 + [1.0] * 4  # schema order


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("egress")
    return generate_demo_data(root, 1, train_per_site=12, val_per_site=6, test_per_site=6)[0]


def test_captured_replies_hold_only_adapter_tensors_and_scalar_metrics(site, tmp_path):
    """Run the real ClientApp handlers in-process and inspect every record they return."""
    cfg = load_config("demo")
    model = build_model(cfg)
    schema = adapter_schema(model)
    state = get_adapter_state(model)
    config = ConfigRecord({"nearl-config": json.dumps(cfg.to_dict()), "server-round": 1, "local-epochs": 1,
                           "evaluate-first": True})
    msg = instruction(RecordDict({"arrays": flat_record({k: v.contiguous() for k, v in state.items()}),
                                  "config": config}), "train")
    state_dir = tmp_path / "state"
    ctx = Context(run_id=1, node_id=1, node_config={"site": "siteA", "data-path": str(site), "state-dir": str(state_dir)},
                  state=RecordDict(),
                  run_config={})
    printed = []
    reply = train_reply(msg, ctx, log=lambda *a, **k: printed.append(a))
    content = reply.content
    assert set(content.keys()) == {"arrays", "metrics", "site"}
    assert dict(content["site"]) == {"name": "siteA"}
    sent = content["arrays"]
    assert set(sent.keys()) == {"adapters"}  # one flat array: exactly the adapter tensors, no backbone weight
    assert tuple(sent["adapters"].shape) == (parameter_count(schema),) and sent["adapters"].dtype == "float32"
    values = FlatLayout.of(schema).split(sent["adapters"].numpy())
    assert any(not np.array_equal(values[k], state[k].numpy()) for k in schema), "local training changed nothing"
    metrics = dict(content["metrics"])
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values())
    assert metrics["num-examples"] == 12 and "eval-accuracy" in metrics and "train-loss" in metrics
    total = sum(len(a.data) for a in sent.values())
    assert total < parameter_count(schema) * 4 + 200  # the data and one .npy header

    ev = evaluate_reply(instruction(RecordDict({"arrays": sent, "config": config}), "evaluate"), ctx,
                        log=lambda *a, **k: None)
    assert set(ev.content.keys()) == {"metrics", "site"}
    em = dict(ev.content["metrics"])
    assert em["num-examples"] == 6 and em["test-examples"] == 6
    assert all(isinstance(v, (int, float)) for v in em.values())


def test_a_handler_whose_reply_breaks_the_schema_fails(site, monkeypatch, tmp_path):
    """If training ever put a non-adapter tensor into the reply, the egress check stops it."""
    import client.task as task

    cfg = load_config("demo")
    model = build_model(cfg)
    real = task.shared_state
    monkeypatch.setattr(task, "shared_state",
                        lambda m: {**real(m), "leak": __import__("torch").zeros(3)})
    config = ConfigRecord({"nearl-config": json.dumps(cfg.to_dict()), "server-round": 1, "local-epochs": 1})
    msg = instruction(RecordDict({"arrays": flat_record({k: v.contiguous() for k, v in
                                                         get_adapter_state(model).items()}), "config": config}))
    state_dir = tmp_path / "state"
    ctx = Context(run_id=1, node_id=1, node_config={"site": "siteA", "data-path": str(site), "state-dir": str(state_dir)},
                  state=RecordDict(),
                  run_config={})
    reply = train_reply(msg, ctx, log=lambda *a, **k: None)
    assert reply.has_error() and not reply.has_content()  # nothing but the reason leaves
    assert "unexpected ['leak']" in reply.error.reason and "refusing to send" in reply.error.reason
    line = json.loads((state_dir / "audit.jsonl").read_text().splitlines()[-1])
    assert reply.error.reason == f"siteA: {line['refused']}" and line["arrays"] == [] and line["bytes_sent"] == 0


def test_an_instruction_packed_in_another_order_is_refused_before_anything_is_trained(site, tmp_path):
    """Same tensors in another order: same length, same dtype; only the stated layout tells the site."""
    from nearl_protocol.schema import schema_of

    cfg = load_config("demo")
    swapped = dict(reversed(list(get_adapter_state(build_model(cfg)).items())))
    config = ConfigRecord({"nearl-config": json.dumps(cfg.to_dict()), "server-round": 1, "local-epochs": 1,
                           "adapter-layout": FlatLayout.of(schema_of(swapped)).digest})
    ctx = Context(run_id=1, node_id=1, state=RecordDict(), run_config={},
                  node_config={"site": "siteA", "data-path": str(site), "state-dir": str(tmp_path / "state")})
    printed = []
    reply = train_reply(instruction(RecordDict({"arrays": flat_record(swapped), "config": config})), ctx,
                        log=lambda *a, **k: printed.append(" ".join(map(str, a))))
    assert reply.has_error() and not reply.has_content()
    assert "adapter layout mismatch: the coordinator packed layout" in reply.error.reason
    assert not any("epoch" in p for p in printed)  # refused before training
    line = json.loads((tmp_path / "state" / "audit.jsonl").read_text().splitlines()[-1])
    assert "adapter layout mismatch" in line["refused"] and line["arrays"] == [] and line["bytes_sent"] == 0


def test_dp_round_reports_epsilon_and_keeps_the_ledger_on_the_site(site, tmp_path):
    """With privacy on, the reply adds one scalar (epsilon); the accountant persists across messages."""
    from dataclasses import replace

    cfg = load_config("demo")
    cfg = replace(cfg, privacy=replace(cfg.privacy, enabled=True, noise_multiplier=1.0, max_grad_norm=1.0))
    model = build_model(cfg)
    state = {k: v.contiguous() for k, v in get_adapter_state(model).items()}
    config = ConfigRecord({"nearl-config": json.dumps(cfg.to_dict()), "server-round": 1, "local-epochs": 1,
                           "total-rounds": 2})
    ctx = Context(run_id=1, node_id=1, state=RecordDict(), run_config={},
                  node_config={"site": "siteA", "data-path": str(site), "state-dir": str(tmp_path / "state")})
    eps = []
    for _ in range(2):
        msg = instruction(RecordDict({"arrays": flat_record(state), "config": config}))
        reply = train_reply(msg, ctx, log=lambda *a, **k: None)
        assert set(reply.content.keys()) == {"arrays", "metrics", "site"}
        metrics = dict(reply.content["metrics"])
        eps.append(metrics["epsilon"])
        assert metrics["dp-noise-multiplier"] == 1.0 and metrics["dp-sample-rate"] == 1.0  # 12 images, batch 16
    assert 0 < eps[0] < eps[1]  # the second round continues the same accountant
    assert metrics["dp-steps"] == 2  # one Poisson step per epoch, two rounds
    assert (tmp_path / "state").is_dir() and any((tmp_path / "state").iterdir())

    # the site's own ceiling is what it has spent: the next round is declined, before any training
    ctx.node_config["max-epsilon"] = eps[1]
    config["evaluate-first"] = True
    msg = instruction(RecordDict({"arrays": flat_record(state), "config": config}))
    declined = train_reply(msg, ctx, log=lambda *a, **k: None)
    assert set(declined.content.keys()) == {"metrics", "site"}  # no arrays leave the site
    m = dict(declined.content["metrics"])
    assert m["dp-declined"] == 1.0 and m["epsilon"] == eps[1] and m["dp-steps"] == 2
    assert m["dp-epsilon-next"] > m["dp-max-epsilon"] == eps[1] and "eval-accuracy" in m


def test_bf16_transport_reply_is_half_size_and_passes_the_egress_schema(site, tmp_path):
    """A real train handler with --transport-dtype bf16: it widens the incoming global adapters exactly
    and narrows what it sends (int16 bit patterns of bf16, checked against the narrowed schema)."""
    import torch

    from nearl_core.transport import encode, wire_schema

    cfg = load_config("demo")
    model = build_model(cfg)
    schema = adapter_schema(model)
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=g) * 0.01 for k, v in get_adapter_state(model).items()}
    wire_in = flat_record(encode(state, "bf16"))
    config = ConfigRecord({"nearl-config": json.dumps(cfg.to_dict()), "server-round": 1, "local-epochs": 1,
                           "transport-dtype": "bf16"})
    state_dir = tmp_path / "state"
    ctx = Context(run_id=1, node_id=1, node_config={"site": "siteA", "data-path": str(site), "state-dir": str(state_dir)},
                  state=RecordDict(),
                  run_config={})
    reply = train_reply(instruction(RecordDict({"arrays": wire_in, "config": config})), ctx, log=lambda *a, **k: None)
    sent = reply.content["arrays"]
    assert {k: (tuple(a.shape), str(a.dtype)) for k, a in sent.items()} == {"adapters": ((parameter_count(schema),),
                                                                                         "int16")}
    assert FlatLayout.of(wire_schema(schema, "bf16")).read(sent).nbytes * 2 == parameter_count(schema) * 4
    ev = evaluate_reply(instruction(RecordDict({"arrays": sent, "config": config}), "evaluate"), ctx,
                        log=lambda *a, **k: None)
    assert set(ev.content.keys()) == {"metrics", "site"}
    from client.task import build_site_model

    loaded = get_adapter_state(build_site_model(cfg, instruction(RecordDict({"arrays": wire_in, "config": config})),
                                                torch.device("cpu"), "bf16"))
    for k, v in state.items():  # widened to float32, equal to torch's own bf16 rounding
        assert loaded[k].dtype == torch.float32 and torch.equal(loaded[k], v.to(torch.bfloat16).float())
