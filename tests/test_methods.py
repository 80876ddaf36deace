"""The methods NEARL is measured against (adapter.method), on the tiny configs: each method's invariants,
its adapter files, its payload, one federated round per method and the methods table.

Invariants per method, where they apply (docs/methods.md): a fresh model is zero-shot CLIP (all but
CoOp with a random context), only the method's own parameters train and the shared backbone never
changes, the backbone stays in eval mode, one sample's gradient ignores the rest of the batch, and
DP-SGD's per-sample gradients are those of each sample alone.
"""

from __future__ import annotations

import csv
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import CLASSES, LAYOUT_MODELS, TINY_MODELS, images_for, tiny_config
from nearl_core.adapter_io import adapter_schema, get_adapter_state, load_adapters, save_adapters
from nearl_core.backbone import build_backbone
from nearl_core.config import METHODS, load_config
from nearl_core.errors import AdapterFileError, ConfigError, NearlError
from nearl_core.model import MODEL_CLASSES, build_model, is_adapter_param
from nearl_core.train import loss_fn, make_optimizer

BASELINES = ("coop", "clip-adapter", "lora", "linear-probe", "full-ft")
STARTS_AT_ZERO_SHOT = ("nearl", "clip-adapter", "lora", "linear-probe", "full-ft")  # CoOp: random context
DP_METHODS = ("nearl", "coop", "clip-adapter", "lora", "linear-probe")  # full-ft is refused under DP
_BACKBONES: dict = {}


def method_model(method: str, name: str = "nearl-tiny", *, own_backbone: bool = False, **adapter):
    """A tiny model of ``method``; backbones are built once per layout and shared, as a site shares them
    (``own_backbone``: a fresh one, for a test that changes the model's dtype)."""
    cfg = tiny_config(name, adapter={"method": method, **adapter})
    if own_backbone:
        return build_model(cfg, CLASSES, backbone=build_backbone(cfg.model))
    if name not in _BACKBONES:
        _BACKBONES[name] = build_backbone(cfg.model)
    return build_model(cfg, CLASSES, backbone=_BACKBONES[name])


def move_away_from_init(model, std: float = 0.05, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapter_parameters().values():
            p.add_(torch.randn(p.shape, generator=g) * (std / 5 if model.method == "full-ft" else std))


def test_every_configured_method_has_a_model_class():
    assert tuple(MODEL_CLASSES) == METHODS


def test_unknown_method_is_one_line_naming_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        load_config("demo", {"adapter.method": "prompt-magic"})
    message = str(err.value)
    assert "\n" not in message and "'prompt-magic' is unknown" in message
    assert all(m in message for m in METHODS)


def test_full_fine_tuning_is_refused_under_dp_and_above_its_size_limit(monkeypatch):
    with pytest.raises(ConfigError, match="full-ft cannot train under DP-SGD"):
        load_config("demo", {"adapter.method": "full-ft", "privacy.enabled": True, "privacy.noise-multiplier": 1.0})
    import nearl_core.methods.full_ft as full_ft

    monkeypatch.setattr(full_ft, "MAX_PARAMETERS", 1000)
    with pytest.raises(ConfigError) as err:
        method_model("full-ft")
    assert "\n" not in str(err.value) and "above the 0.001M this project allows" in str(err.value)


@pytest.mark.parametrize("name", TINY_MODELS)
@pytest.mark.parametrize("method", STARTS_AT_ZERO_SHOT)
def test_fresh_model_is_zero_shot_clip(method, name):
    model = method_model(method, name).eval()
    x = images_for(model, 3)
    with torch.no_grad():
        ours = model(x).logits
    assert torch.allclose(ours, model.zero_shot_logits(x), atol=1e-5)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_coop_context_from_the_template_is_zero_shot_and_a_random_one_is_not(name):
    model = method_model("coop", name, **{"coop-init": "template"}).eval()
    x = images_for(model, 3)
    with torch.no_grad():
        assert torch.allclose(model(x).logits, model.zero_shot_logits(x), atol=1e-5)
        assert model.context_tokens == 7  # "a chest x-ray image showing": a, chest, x, -, ray, image, showing
        random = method_model("coop", name).eval()
        assert random.context_tokens == 16 and not torch.allclose(random(x).logits, model.zero_shot_logits(x))


@pytest.mark.parametrize("name", TINY_MODELS)
@pytest.mark.parametrize("method", METHODS)
def test_only_the_methods_own_parameters_train_and_the_shared_backbone_never_changes(method, name):
    model = method_model(method, name)
    shared = {k: v.clone() for k, v in _BACKBONES[name].clip.state_dict().items()}
    for n, p in model.named_parameters():
        assert p.requires_grad == is_adapter_param(n, method), n
    own = model.adapter_parameters()
    assert own and set(adapter_schema(model)) == set(own)  # the wire schema is the method's own tensors
    frozen_before = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in own.items()}
    model.train()
    opt = make_optimizer(model, model.cfg.train)
    loss_fn(model, images_for(model, 4), torch.tensor([0, 1, 2, 1]), 0.0)[0].backward()
    opt.step()
    assert any(not torch.equal(p, before[n]) for n, p in own.items())  # it trains
    assert all(torch.equal(p, frozen_before[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert all(torch.equal(v, shared[k]) for k, v in _BACKBONES[name].clip.state_dict().items())
    assert not any(m.training for m in model.clip.modules())  # the backbone stays in eval mode


def test_payload_per_method_follows_from_what_it_trains():
    """Counts on nearl-tiny (widths 64/64, 4 + 4 layers, E = 64, 3 classes)."""
    counts = {m: sum(p.numel() for p in method_model(m).adapter_parameters().values()) for m in METHODS}
    assert counts["coop"] == 16 * 64  # 16 context vectors of the text width
    assert counts["clip-adapter"] == 2 * 64 * 16  # E -> E/4 -> E, no bias
    assert counts["lora"] == 8 * 4 * 2 * 64 * 8  # 8 layers x (q, k, v, out) x (A + B) at rank 8
    assert counts["linear-probe"] == 3 * 64 + 3
    assert counts["full-ft"] == sum(p.numel() for p in _BACKBONES["nearl-tiny"].clip.parameters()) - 1  # scale
    assert counts["nearl"] > counts["lora"] > counts["clip-adapter"] > counts["coop"] > counts["linear-probe"]


@pytest.mark.parametrize("method", METHODS)
def test_nearl_params_reports_trainable_parameters_and_payload_per_method(method, capsys):
    from nearl_core.cli import main

    assert main(["params", "--config", "demo", "--set", f"adapter.method={method}", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    trainable = sum(p.numel() for p in method_model(method).adapter_parameters().values())
    assert report["method"] == method and report["trainable"] == trainable
    assert report["payload_bytes"] == 4 * trainable and report["payload_bytes_per_round"] == 8 * trainable
    assert main(["params", "--config", "demo", "--set", f"adapter.method={method}"]) == 0
    assert f"({method}) on nearl-tiny" in capsys.readouterr().out


@pytest.mark.parametrize("name", LAYOUT_MODELS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("per_sample_text", [False, True])
def test_gradient_of_one_sample_ignores_the_rest_of_the_batch(method, name, per_sample_text):
    """float64: a batch of 4 and a batch of 1 round differently in fp32 (up to ~5e-6 here); a sample that
    leaked into another's gradient would show at the scale of the gradients themselves."""
    model = method_model(method, name, own_backbone=True)
    if per_sample_text and not model.shared_text:
        pytest.skip("the method's class text does not depend on trainable parameters")
    move_away_from_init(model)
    model = model.double().train()
    model.per_sample_text = per_sample_text
    x, other = images_for(model, 4, seed=0).double(), images_for(model, 4, seed=99).double()
    params = list(model.adapter_parameters().values())

    def grads_of_first(batch):
        return torch.autograd.grad(F.cross_entropy(model(batch).logits[:1], torch.tensor([1])), params,
                                   allow_unused=True)

    a, b, c = grads_of_first(x), grads_of_first(torch.cat([x[:1], other[1:]])), grads_of_first(x[:1])
    assert any(g is not None and g.abs().max() > 0 for g in a)
    for ga, gb, gc in zip(a, b, c):
        if ga is not None:
            assert torch.allclose(ga, gb, atol=1e-10) and torch.allclose(ga, gc, atol=1e-10)


@pytest.mark.parametrize("name", LAYOUT_MODELS)
@pytest.mark.parametrize("method", DP_METHODS[1:])  # NEARL's own check is in test_privacy.py
def test_dp_per_sample_gradients_equal_single_sample_runs(method, name):
    from nearl_core.privacy import PrivateTraining

    model = method_model(method, name, own_backbone=True)
    move_away_from_init(model, std=0.2)
    model = model.double().train()
    x, y = images_for(model, 3).double(), torch.tensor([0, 1, 2])
    params = [p for p in model.adapter_parameters().values()]
    singles = [torch.autograd.grad(loss_fn(model, x[i:i + 1], y[i:i + 1], 0.0)[0], params) for i in range(3)]
    with PrivateTraining(model, make_optimizer(model, model.cfg.train), noise_multiplier=0.0, max_grad_norm=1e6,
                         sample_rate=0.5, expected_batch_size=3) as dp:
        assert model.per_sample_text == model.shared_text
        dp.backward(x, y, 0.0)
        for p, *per in zip(params, *singles):
            assert torch.allclose(p.grad_sample, torch.stack(per), atol=1e-6), p.shape  # as test_privacy.py
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


def test_full_fine_tuning_refuses_dp_sgd_even_when_called_directly():
    from nearl_core.privacy import check_private_model

    with pytest.raises(NearlError, match="full-ft cannot train under DP-SGD"):
        check_private_model(method_model("full-ft"))


@pytest.mark.parametrize("name", LAYOUT_MODELS)
def test_lora_leaves_no_hook_on_the_shared_backbone_and_checkpointing_gives_the_same_gradients(name):
    grads = []
    for checkpoint in (False, True):
        cfg = tiny_config(name, adapter={"method": "lora"}, train={"checkpoint-backbone": checkpoint})
        _BACKBONES.setdefault(name, build_backbone(cfg.model))
        model = build_model(cfg, CLASSES, backbone=_BACKBONES[name])
        move_away_from_init(model)
        model.train()
        loss_fn(model, images_for(model, 2), torch.tensor([0, 2]), 0.0)[0].backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.adapter_parameters().values()]))
        assert not any(m._forward_hooks for m in model.clip.modules())  # nothing stays attached
    assert grads[0].abs().max() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_adapter_files_round_trip_and_refuse_another_method(method, tmp_path):
    model = method_model(method)
    move_away_from_init(model)
    save_adapters(model, tmp_path / "a")
    fresh = method_model(method)
    x = images_for(model, 2)
    load_adapters(fresh, tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(model.eval()(x).logits, fresh.eval()(x).logits)
    other = "lora" if method != "lora" else "coop"
    with pytest.raises(AdapterFileError, match=f"holds {method} adapters, this model is {other}.*adapter.method"):
        load_adapters(method_model(other), tmp_path / "a")
    with pytest.raises(AdapterFileError, match="trained on backbone 'nearl-tiny'"):
        load_adapters(method_model(method, "nearl-tiny-deep-text"), tmp_path / "a")


# -- the federation -------------------------------------------------------------------------------
def test_nearl_server_set_adapter_method_reaches_the_federation_config():
    """``nearl-server --set adapter.method=lora`` becomes a run-config key: Flower accepts it only if the app's
    pyproject declares it, and the ServerApp's settings turn it into the NEARL config every instruction carries."""
    import tomllib

    from flwr.common.config import flatten_dict, fuse_dicts

    from server.settings import FederationSettings
    from tests.fed_helpers import ROOT

    declared = flatten_dict(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    run_config = fuse_dicts(declared, {"adapter.method": "lora", "adapter.lora-rank": 4})  # refuses unknown keys
    cfg = FederationSettings.from_run_config(run_config).nearl_config()
    assert (cfg.adapter.method, cfg.adapter.lora_rank) == ("lora", 4)


@pytest.mark.parametrize("method", METHODS)
def test_one_federated_round_per_method(method, demo_root, tmp_path, task_identity):
    """Two sites train one epoch through the real site handler; the real strategy aggregates.

    The method reaches the sites inside the NEARL config of the instruction (nothing else carries it),
    and the aggregate has exactly the method's own tensors.
    """
    from flwr.app import ArrayRecord, Context, RecordDict

    from client.task import train_reply
    from nearl_core.fingerprint import model_fingerprint
    from nearl_protocol.messages import instruction_config
    from server.strategy import make_strategy
    from tests.fed_helpers import FakeGrid, RoundRecorder

    cfg = load_config("demo", {"adapter.method": method})
    model = build_model(cfg)
    rec = RoundRecorder()
    strategy = make_strategy("fedavg", schema=adapter_schema(model), min_nodes=2, listener=rec, total_rounds=1)
    start = get_adapter_state(model)
    config = instruction_config(nearl_config=cfg.to_dict(), transport="float32", backbone=model_fingerprint(model),
                                local_epochs=1, total_rounds=1)
    sites = {31: "site1", 32: "site2"}
    messages = list(strategy.configure_train(1, ArrayRecord({k: v.contiguous() for k, v in start.items()}), config,
                                             FakeGrid(list(sites))))
    replies = []
    for msg in messages:
        node = msg.metadata.dst_node_id
        context = Context(run_id=5, node_id=node, state=RecordDict(), run_config={},
                          node_config={"site": sites[node], "data-path": str(demo_root / sites[node]),
                                       "state-dir": str(tmp_path / f"state-{node}")})
        assert json.loads(msg.content["config"]["nearl-config"])["adapter"]["method"] == method
        replies.append(train_reply(msg, context, log=lambda *a, **k: None))
    arrays, _ = strategy.aggregate_train(1, replies)
    strategy.configure_evaluate(1, arrays, config, FakeGrid(list(sites)))  # the round ends with its evaluation
    strategy.aggregate_evaluate(1, [])
    assert rec.rounds[-1].answered == ["site1", "site2"], rec.rounds[-1].rejected
    assert set(arrays) == set(adapter_schema(model))
    assert any(not torch.equal(torch.from_numpy(arrays[k].numpy()), start[k]) for k in start)


def test_methods_table_columns_and_rows(tmp_path):
    from simulation import methods

    rows = []
    for m, params in (("nearl", 1000), ("coop", 10)):
        result = [{"arm": arm, "site": site, "accuracy": 0.5, "balanced_accuracy": 0.5, "macro_f1": 0.4, "auroc": 0.6}
                  for arm in ("zero-shot", "federated") for site in ("site1", "site2", "mean")]
        rows += methods.method_rows(m, result, {"trainable_params": params, "payload_bytes_per_round": 8 * params},
                                    0.25)
    with open(methods.write_csv(rows, tmp_path), newline="") as fh:
        read = list(csv.DictReader(fh))
    assert list(read[0]) == ["method", "arm", "site", "accuracy", "balanced_accuracy", "macro_f1", "auroc", "round",
                             "trainable_params", "payload_bytes_per_round", "train_seconds_per_epoch"]
    assert len(read) == 12 and {r["method"] for r in read} == {"nearl", "coop"}
    table = methods.write_markdown(rows, tmp_path, "t", ["a note"]).read_text()
    assert "| nearl | 1,000 | 8,000 | 0.25 | 0.500 |" in table and "| coop | 10 | 80 |" in table
    assert methods.plot(rows, tmp_path).stat().st_size > 1000
    assert methods.parse_methods("nearl, coop,nearl") == ["nearl", "coop"]


@pytest.mark.parametrize("dp", [False, True])
def test_methods_table_times_a_local_epoch_plain_or_under_dp(dp, demo_root):
    from nearl_core.data import scan_site
    from simulation import methods

    overrides = {"privacy.enabled": True, "privacy.target-epsilon": 3.0} if dp else {}
    cfg = load_config("demo", {"adapter.method": "linear-probe", **overrides})
    _BACKBONES.setdefault("nearl-tiny", build_backbone(cfg.model))
    site = scan_site(demo_root / "site1", cfg.task.classes, verify=False)
    seconds = methods.epoch_seconds(cfg, _BACKBONES["nearl-tiny"], site, torch.device("cpu"))
    assert 0 < seconds < 60
    costs = methods.cost(cfg, _BACKBONES["nearl-tiny"], "fp16")
    assert costs == {"trainable_params": 3 * 64 + 3, "payload_bytes_per_round": 2 * 2 * (3 * 64 + 3)}


@pytest.mark.slow
def test_simulation_runs_the_same_federation_once_per_method(tmp_path, monkeypatch):
    from nearl_core.demo_data import generate_demo_data
    from simulation.run import main

    monkeypatch.chdir(tmp_path)
    generate_demo_data(tmp_path / "pool", 2, train_per_site=24, val_per_site=8, test_per_site=8)
    out = tmp_path / "run"
    assert main(["--methods", "nearl,linear-probe", "--sites", "2", "--rounds", "1", "--local-epochs", "1",
                 "--data", str(tmp_path / "pool"), "--out", str(out)]) == 0
    with open(out / "methods.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["method"] for r in rows} == {"nearl", "linear-probe"}
    assert {r["arm"] for r in rows} == {"zero-shot", "federated", "personalized"}  # the demo config fine-tunes
    table = (out / "methods.md").read_text()
    assert (out / "methods.png").stat().st_size > 1000 and "| linear-probe |" in table and "personalized acc" in table
    for m in ("nearl", "linear-probe"):
        assert (out / m / "results.csv").is_file()
    assert main(["--methods", "nearl,magic", "--out", str(tmp_path / "x")]) == 2  # refused before anything runs
