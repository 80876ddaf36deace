"""FedProx at the site: the proximal term's gradient, and that a DP round does not apply it."""

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from flwr.app import ConfigRecord, Context, RecordDict

import client.task as task
from nearl_core.adapter_io import get_adapter_state
from nearl_core.config import load_config
from nearl_core.demo_data import generate_demo_data
from nearl_core.model import build_model
from tests.conftest import images_for, randomize_adapters, tiny_model
from tests.fed_helpers import flat_record, instruction


def _grads(model, images, labels) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    out = model(images)
    (F.cross_entropy(out.logits, labels) + out.ortho).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def moved_model():
    """A tiny model, its adapters at w_global when the hooks are made, then moved away from it."""
    model = tiny_model()
    randomize_adapters(model, seed=1)
    model.eval()  # no dropout: two backward passes see the same graph
    return model


def _move(model, seed: int = 2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("mu", [0.5, 0.0])
def test_the_proximal_hook_adds_mu_times_the_distance_to_the_global_adapters(moved_model, mu):
    model = moved_model
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("adapters.") for n in trainable)
    anchor = {n: p.detach().clone() for n, p in trainable.items()}  # w_global
    handles = task._proximal_hooks(model, mu)
    assert len(handles) == len(trainable)  # one hook per adapter tensor
    try:
        _move(model)
        images, labels = images_for(model, 4, seed=3), torch.tensor([0, 1, 2, 0])
        with_term = _grads(model, images, labels)
    finally:
        for h in handles:
            h.remove()
    plain = _grads(model, images, labels)
    distance = {n: trainable[n].detach() - anchor[n] for n in trainable}
    assert all(d.abs().max() > 0 for d in distance.values())  # every adapter tensor moved
    for n in trainable:
        torch.testing.assert_close(with_term[n], plain[n] + mu * distance[n], rtol=1e-5, atol=1e-6)
        if mu == 0:
            assert torch.equal(with_term[n], plain[n])
        else:
            assert not torch.allclose(with_term[n], plain[n])
    with torch.no_grad():  # put the shared model back where the next case expects it
        for n, p in trainable.items():
            p.copy_(anchor[n])


# -- train_reply: FedProx's mu reaches the hooks, except in a DP round -------------------------------------
@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("fedprox")
    return generate_demo_data(root, 1, train_per_site=6, val_per_site=3, test_per_site=3)[0]


def _round(site, tmp_path, *, privacy: bool, mu: float):
    cfg = load_config("demo")
    if privacy:
        cfg = replace(cfg, privacy=replace(cfg.privacy, enabled=True, noise_multiplier=1.0, max_grad_norm=1.0))
    state = {k: v.contiguous() for k, v in get_adapter_state(build_model(cfg)).items()}
    config = ConfigRecord({"nearl-config": json.dumps(cfg.to_dict()), "server-round": 1, "local-epochs": 1,
                           "total-rounds": 1, "proximal-mu": mu})
    ctx = Context(run_id=1, node_id=1, state=RecordDict(), run_config={},
                  node_config={"site": "siteA", "data-path": str(site), "state-dir": str(tmp_path / "state")})
    return task.train_reply(instruction(RecordDict({"arrays": flat_record(state), "config": config})), ctx,
                            log=lambda *a, **k: None)


def test_a_plain_round_installs_the_proximal_hooks_with_the_servers_mu(site, tmp_path, monkeypatch):
    calls = []
    real = task._proximal_hooks
    monkeypatch.setattr(task, "_proximal_hooks", lambda model, mu: calls.append(mu) or real(model, mu))
    _round(site, tmp_path, privacy=False, mu=0.25)
    assert calls == [0.25]
    calls.clear()
    _round(site, tmp_path, privacy=False, mu=0.0)  # mu = 0 (any strategy but fedprox): no hooks at all
    assert calls == []


def test_a_dp_round_ignores_proximal_mu(site, tmp_path, monkeypatch):
    """The proximal gradient would be added after Opacus' per-sample clipping: under DP it is not applied."""
    def refuse(model, mu):
        raise AssertionError("the proximal term must not be applied under DP")

    monkeypatch.setattr(task, "_proximal_hooks", refuse)
    reply = _round(site, tmp_path, privacy=True, mu=0.25)
    metrics = dict(reply.content["metrics"])
    assert metrics["epsilon"] > 0 and metrics["dp-steps"] == 1  # it did train, privately
    assert "arrays" in reply.content
