"""Personalization: local adapter groups never leave a site, survive its restarts, and end in a
personalized adapter folder that `nearl predict` loads; DP counts the fine-tuning steps."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict

from client import personal
from client.egress import EgressError, check_reply, pack_outgoing
from client.task import evaluate_reply, train_reply
from nearl_core.adapter_io import adapter_schema, get_adapter_state, read_adapters, shared_schema, shared_state
from nearl_core.config import load_config
from nearl_core.errors import ConfigError
from nearl_core.model import build_model
from nearl_core.params import parameter_report
from nearl_core.personalize import adapter_groups, local_names, wants_personalization
from nearl_core.transport import encode
from nearl_protocol.flat import FlatLayout
from nearl_protocol.messages import build_reply, instruction_config, read_instruction
from tests.fed_helpers import flat_record, instruction

QUIET = lambda *a, **k: None  # noqa: E731


def demo(**overrides):
    return load_config("demo", {k.replace("__", "."): v for k, v in overrides.items()})


def test_groups_are_the_parts_nearl_params_reports_plus_the_gates():
    model = build_model(demo())
    groups = adapter_groups(model)
    assert list(groups) == ["useformer", "oca-vision", "oca-text", "gates"]
    assert "queries.tokens" in groups["useformer"]
    assert all(".gate." in n for n in groups["gates"]) and len(groups["gates"]) == 8
    counts = parameter_report(model)["groups"]
    assert counts["useformer"] == model.components()["useformer"]
    assert counts["oca-text"] == model.components()["oca_text"]


@pytest.mark.parametrize("local, kept", [("none", set()), ("oca-text,gates", {"oca-text", "gates"}),
                                         ("all-but-useformer", {"oca-vision", "oca-text"})])
def test_presets_and_group_lists_resolve_to_tensor_names(local, kept):
    model = build_model(demo(federation__local=local))
    groups = adapter_groups(model)
    assert local_names(model) == {n for g in kept for n in groups[g]}
    assert set(shared_schema(model)) == set(adapter_schema(model)) - local_names(model)


def test_unknown_groups_and_keeping_everything_local_are_refused():
    with pytest.raises(ConfigError, match="'oca' is not an adapter group of nearl; groups: useformer"):
        local_names(build_model(demo(federation__local="oca")))
    with pytest.raises(ConfigError, match="nothing would be federated"):
        local_names(build_model(demo(federation__local="useformer,oca-vision,oca-text")))
    with pytest.raises(ConfigError, match="finetune-epochs must be >= 0"):
        demo(federation__finetune_epochs=-1)


def test_the_payload_and_nearl_params_shrink_by_the_local_groups():
    full = parameter_report(build_model(demo()))
    local = parameter_report(build_model(demo(federation__local="oca-text,gates")))
    assert local["trainable"] == full["trainable"]  # the site still trains them
    assert local["local"]["parameters"] > 0
    assert local["payload_bytes"] == full["payload_bytes"] - 4 * local["local"]["parameters"]
    assert not wants_personalization(demo(federation__finetune_epochs=0))
    assert wants_personalization(demo(federation__finetune_epochs=1))  # the demo config: 2
    assert wants_personalization(demo(federation__finetune_epochs=0, federation__local="gates"))


def test_egress_refuses_a_reply_that_carries_a_local_group():
    model = build_model(demo(federation__local="oca-text"))
    schema = shared_schema(model)
    with pytest.raises(EgressError, match="refusing to send"):
        pack_outgoing(encode(get_adapter_state(model), "float32"), schema)  # every tensor: oca-text would leave
    bigger = FlatLayout.of(adapter_schema(model)).pack({k: v.numpy() for k, v in get_adapter_state(model).items()})
    msg = instruction(RecordDict({"config": instruction_config(nearl_config=model.cfg.to_dict(), transport="float32",
                                                               backbone="")}))
    reply = build_reply(msg, site="siteA", metrics={"num-examples": 3}, adapters=bigger)
    with pytest.raises(EgressError):
        check_reply(reply.content, schema, with_arrays=True)


def _message(cfg, server_round: int, *, kind: str = "train", total_rounds: int = 2):
    """An instruction as the coordinator sends it: the shared adapters only, in the shared layout."""
    model = build_model(cfg)
    arrays = flat_record({k: v.contiguous() for k, v in shared_state(model).items()})
    config = instruction_config(nearl_config=cfg.to_dict(), transport="float32", backbone="", local_epochs=1,
                                total_rounds=total_rounds)
    config["server-round"] = server_round
    return instruction(RecordDict({"arrays": arrays, "config": config}), message_type=kind)


def _context(demo_root, state):
    return Context(run_id=1, node_id=1, state=RecordDict(), run_config={},
                   node_config={"site": "site1", "data-path": str(demo_root / "site1"), "state-dir": str(state)})


def test_local_groups_stay_at_the_site_and_survive_a_restart(demo_root, tmp_path):
    cfg = demo(federation__local="oca-text,gates")
    model = build_model(cfg)
    state = tmp_path / "state"
    reply = train_reply(_message(cfg, 1), _context(demo_root, state), log=QUIET)
    assert not reply.has_error(), reply.error
    sent = reply.content["arrays"]
    assert sum(a.numpy().nbytes for a in sent.values()) == 4 * sum(
        int(np.prod(s)) for s, _ in shared_schema(model).values())
    saved, meta = read_adapters(state / "local")
    assert meta["round"] == 1
    trained = {n: saved[n] for n in local_names(model)}
    init = get_adapter_state(model)
    assert any(not torch.equal(trained[n], init[n]) for n in trained)  # they were trained, and kept here

    # a "restarted" site (fresh model, nothing in memory) reads them back for round 2 ...
    fresh = build_model(cfg)
    msg2 = read_instruction(_message(cfg, 2))
    assert personal.restore_local(fresh, personal_binding(demo_root, state), msg2, QUIET)
    assert all(torch.equal(fresh.adapter_parameters()[n].detach(), trained[n]) for n in trained)
    # ... but not for a round that is not after the saved one, nor under another federation config
    again = build_model(cfg)
    assert not personal.restore_local(again, personal_binding(demo_root, state), read_instruction(_message(cfg, 1)),
                                      QUIET)
    other = replace(cfg, train=replace(cfg.train, lr=0.01))
    assert not personal.restore_local(build_model(other), personal_binding(demo_root, state),
                                      read_instruction(_message(other, 2)), QUIET)


def personal_binding(demo_root, state):
    from client.binding import SiteBinding

    return SiteBinding("site1", demo_root / "site1", state_dir=state)


def test_the_last_evaluation_writes_a_personalized_model_that_nearl_predict_loads(demo_root, tmp_path):
    from nearl_core import workflows

    cfg = demo(federation__local="oca-text", federation__finetune_epochs=1)
    state = tmp_path / "state"
    ctx = _context(demo_root, state)
    assert not evaluate_reply(_message(cfg, 1, kind="evaluate"), ctx, log=QUIET).content["metrics"].get(
        "personal-accuracy")  # not the last round: nothing personalized yet
    assert not (state / "personalized").exists()
    reply = evaluate_reply(_message(cfg, 2, kind="evaluate"), ctx, log=QUIET)
    metrics = reply.content["metrics"]
    assert 0.0 <= metrics["personal-accuracy"] <= 1.0 and metrics["personal-examples"] == 12
    _, meta = read_adapters(state / "personalized")
    assert meta["personalized"] is True and meta["finetune_epochs"] == 1
    images = sorted((demo_root / "site1" / "test").rglob("*.png"))[:2]
    rows = workflows.predict(state / "personalized", images)
    assert len(rows) == 2 and all(r["class"] in cfg.task.classes for r in rows)


def test_only_the_final_evaluation_reads_the_test_split_and_personalizes(demo_root, tmp_path):
    """The coordinator says which evaluation is final: not the last round's validation, and it may come
    after an earlier round when patience ended the run."""
    cfg = demo(federation__finetune_epochs=1)
    ctx = _context(demo_root, tmp_path / "state")
    last_round = _message(cfg, 2, kind="evaluate")
    last_round.content["config"]["final-evaluation"] = False
    metrics = dict(evaluate_reply(last_round, ctx, log=QUIET).content["metrics"])
    assert metrics["num-examples"] == 12 and not any(k.startswith(("test-", "personal-")) for k in metrics)
    assert not (tmp_path / "state" / "personalized").exists()
    stopped_early = _message(cfg, 1, kind="evaluate")  # round 1 of 2
    stopped_early.content["config"]["final-evaluation"] = True
    metrics = dict(evaluate_reply(stopped_early, ctx, log=QUIET).content["metrics"])
    assert metrics["test-examples"] == 12 and metrics["personal-examples"] == 12
    assert read_adapters(tmp_path / "state" / "personalized")[1]["finetune_epochs"] == 1


def test_the_dp_ledger_counts_the_fine_tuning_steps(demo_root, tmp_path):
    from nearl_core.privacy import PrivacyState, steps_for

    cfg = demo(federation__finetune_epochs=2, privacy__enabled=True, privacy__target_epsilon=8.0)
    state = tmp_path / "state"
    ctx = _context(demo_root, state)
    assert not train_reply(_message(cfg, 1, total_rounds=1), ctx, log=QUIET).has_error()
    after_round = PrivacyState.load(state)
    n_train = after_round.n_train
    assert after_round.steps == steps_for(n_train, cfg.train.batch_size, 1)
    assert after_round.planned_steps == steps_for(n_train, cfg.train.batch_size, 1 + 2)  # the plan includes them
    reply = evaluate_reply(_message(cfg, 1, kind="evaluate", total_rounds=1), ctx, log=QUIET)
    assert not reply.has_error(), reply.error
    after_tuning = PrivacyState.load(state)
    assert after_tuning.steps == after_round.steps + steps_for(n_train, cfg.train.batch_size, 2)
    assert after_tuning.epsilon > after_round.epsilon
    assert after_tuning.epsilon <= 8.0 + 1e-6  # planned into the same budget


def test_kept_optimizer_moments_continue_in_the_next_round_and_only_in_this_federation(demo_root, tmp_path):
    cfg = demo(train__keep_optimizer=True)
    state = tmp_path / "state"
    ctx = _context(demo_root, state)
    assert not train_reply(_message(cfg, 1), ctx, log=QUIET).has_error()
    first = torch.load(state / "optimizer.pt", weights_only=True)["state"]
    steps = float(first[0]["step"])
    assert steps > 0 and torch.count_nonzero(first[0]["exp_avg_sq"]) > 0
    assert not train_reply(_message(cfg, 2), ctx, log=QUIET).has_error()
    assert float(torch.load(state / "optimizer.pt", weights_only=True)["state"][0]["step"]) == 2 * steps  # continued
    other = demo(train__keep_optimizer=True, train__lr=0.001)  # another federation config: starts from zero
    assert not train_reply(_message(other, 2), ctx, log=QUIET).has_error()
    assert float(torch.load(state / "optimizer.pt", weights_only=True)["state"][0]["step"]) == steps
    with pytest.raises(ConfigError, match="keep-optimizer is not available under DP-SGD"):
        demo(train__keep_optimizer=True, privacy__enabled=True, privacy__target_epsilon=3.0)


def test_the_personalized_arm_reads_each_sites_own_folder_and_leaves_out_a_site_without_one(demo_root, tmp_path,
                                                                                            capsys):
    from nearl_core.adapter_io import save_adapters
    from nearl_core.backbone import build_backbone
    from nearl_core.data import scan_site
    from simulation import compare

    cfg = demo()
    sites = {name: scan_site(demo_root / name, cfg.task.classes, verify=False) for name in ("site1", "site2")}
    model = build_model(cfg)
    save_adapters(model, tmp_path / "state" / "site1" / "personalized")
    out = compare.personalized(cfg, build_backbone(cfg.model), sites, torch.device("cpu"), tmp_path / "state")
    assert list(out) == ["site1"] and out["site1"]["examples"] == 12
    assert "site2 wrote no personalized adapters" in capsys.readouterr().out


def test_corrupt_site_state_is_not_reused_and_loses_nothing_else(demo_root, tmp_path):
    """A truncated local/ folder or optimizer file (a crash mid-write, a bad disk): the round trains from
    the received adapters and fresh moments, says why, and writes good copies again."""
    cfg = demo(federation__local="gates", train__keep_optimizer=True)
    state = tmp_path / "state"
    ctx = _context(demo_root, state)
    assert not train_reply(_message(cfg, 1), ctx, log=QUIET).has_error()
    weights = state / "local" / "adapters.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    (state / "optimizer.pt").write_bytes(b"not a torch file")
    lines = []
    reply = train_reply(_message(cfg, 2), ctx, log=lambda line, **k: lines.append(line))
    assert not reply.has_error(), reply.error
    said = "\n".join(lines)
    assert "local adapter groups not reused" in said and "corrupt" in said
    assert "optimizer moments not reused" in said
    _, meta = read_adapters(state / "local")  # rewritten whole after the round
    assert meta["round"] == 2
    assert torch.load(state / "optimizer.pt", weights_only=True)["state"]


def test_a_coordinator_cannot_buy_fine_tuning_beyond_the_sites_privacy_ceiling(demo_root, tmp_path):
    """finetune-epochs is the coordinator's config; the site's own ceiling decides: no step beyond it."""
    from nearl_core.privacy import PrivacyState

    cfg = demo(federation__finetune_epochs=1, privacy__enabled=True, privacy__noise_multiplier=1.5)
    state = tmp_path / "state"
    ctx = Context(run_id=1, node_id=1, state=RecordDict(), run_config={},
                  node_config={"site": "site1", "data-path": str(demo_root / "site1"), "state-dir": str(state),
                               "max-epsilon": 3.0})
    assert not train_reply(_message(cfg, 1, total_rounds=1), ctx, log=QUIET).has_error()
    before = PrivacyState.load(state)
    assert 0 < before.epsilon <= 3.0
    cfg_greedy = demo(federation__finetune_epochs=50, privacy__enabled=True, privacy__noise_multiplier=1.5)
    lines = []
    reply = evaluate_reply(_message(cfg_greedy, 1, kind="evaluate", total_rounds=1), ctx,
                           log=lambda line, **k: lines.append(line))
    assert not reply.has_error(), reply.error
    after = PrivacyState.load(state)
    assert after.steps == before.steps and after.epsilon == before.epsilon  # declined: nothing spent
    assert any("no fine-tuning" in line and "max-epsilon 3" in line for line in lines), lines
    _, meta = read_adapters(state / "personalized")
    assert meta["finetune_epochs"] == 0  # the personalized model is the received one, and says so
