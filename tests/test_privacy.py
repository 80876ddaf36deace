"""Sample-level DP-SGD at a site (nearl_core.privacy): per-sample gradients, accounting,
restart, budget, and that the frozen backbone is never touched.  Tiny models, fast."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from torch.utils.data import DataLoader, TensorDataset

from nearl_core import cli
from nearl_core.backbone import build_backbone
from nearl_core.config import NearlConfig, apply_overrides, from_dict, load_config
from nearl_core.demo_data import generate_demo_data
from nearl_core.errors import ConfigError
from nearl_core.model import NearlCLIP, build_model, is_adapter_param
from nearl_core.privacy import (STATE_FILE, PrivacyBudgetExceeded, PrivacyState, PrivateTraining, budget_ceiling,
                                check_budget, clip_per_sample, default_delta, open_privacy_state, plan_privacy,
                                steps_for, train_private_round)
from nearl_core.train import fit, loss_fn, make_optimizer

CLASSES = ("normal", "nodule", "opacity")


def _config(mode: str = "per-image", **privacy) -> NearlConfig:
    raw = load_config("demo").to_dict()
    raw["adapter"]["text-conditioning"] = mode
    raw["train"].update({"device": "cpu", "batch-size": 8, "epochs": 1})
    raw["privacy"].update({k.replace("_", "-"): v for k, v in privacy.items()})
    return from_dict(raw)


def _model(mode: str = "per-image", seed: int = 0, randomize: float = 0.0, **privacy) -> NearlCLIP:
    torch.manual_seed(seed)
    cfg = _config(mode, **privacy)
    model = build_model(cfg, CLASSES, backbone=build_backbone(cfg.model))
    if randomize:  # move the adapters off zero-init so that every parameter gets a gradient
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in model.adapters.parameters():
                p.add_(torch.randn(p.shape, generator=g) * randomize)
    return model


def _images(model: NearlCLIP, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, *model.clip.visual.image_size, generator=torch.Generator().manual_seed(seed))


def _loader(model: NearlCLIP, n: int = 8, batch: int = 4) -> DataLoader:
    labels = torch.arange(n) % len(CLASSES)
    return DataLoader(TensorDataset(_images(model, n, seed=3), labels), batch_size=batch)


def _independent_epsilon(mechanism: str, sigma: float, q: float, steps: int, delta: float) -> float:
    acc = RDPAccountant() if mechanism == "rdp" else PRVAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=sigma, sample_rate=q)
    return acc.get_epsilon(delta=delta)


# -- per-sample gradients -----------------------------------------------------------------
@pytest.mark.parametrize("mode", ["per-image", "shared"])
def test_clipped_per_sample_gradients_equal_single_sample_runs(mode):
    """The clipped per-sample gradients of the DP step == each sample run alone, then clipped.

    float64, so that the comparison measures the per-sample computation, not fp32 rounding
    (in fp32 the same check agrees to ~5e-6 on gradients of norm 4-50).
    """
    model = _model(mode, randomize=0.2).double().train()
    x, y = _images(model, 4).double(), torch.tensor([0, 1, 2, 1])
    lam = model.cfg.adapter.ortho_lambda
    assert lam > 0  # the orthogonal regulariser is part of each sample's loss too
    params = [p for p in model.adapters.parameters()]
    singles = [torch.autograd.grad(loss_fn(model, x[i:i + 1], y[i:i + 1], lam)[0], params) for i in range(4)]
    per_sample = [torch.stack([s[j] for s in singles]) for j in range(len(params))]
    norms = torch.stack([g.reshape(4, -1).norm(dim=1) for g in per_sample], 1).norm(dim=1)
    clip = float(norms.median())  # half the samples are clipped, half are not
    expected = clip_per_sample(per_sample, clip)

    with PrivateTraining(model, make_optimizer(model, model.cfg.train), noise_multiplier=0.0, max_grad_norm=clip,
                         sample_rate=0.5, expected_batch_size=4) as dp:
        assert model.per_sample_text == (mode == "shared")
        dp.backward(x, y, lam)
        got = clip_per_sample([p.grad_sample for p in params], clip)
        dp.optimizer.clip_and_accumulate()  # what DPOptimizer.step() sums before adding noise
        summed = [p.summed_grad.clone() for p in params]
    worst = max(float((a - b).abs().max()) for a, b in zip(got, expected))
    assert worst < 1e-6, worst
    worst_sum = max(float((s - e.sum(0)).abs().max()) for s, e in zip(summed, expected))
    assert worst_sum < 1e-6, worst_sum
    assert model.per_sample_text is False  # restored on exit
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())  # Opacus attributes removed


# -- the frozen backbone -------------------------------------------------------------------
def test_only_adapters_get_grad_samples_and_the_backbone_is_never_replaced():
    model = _model(randomize=0.1)
    types_before = [(n, type(m)) for n, m in model.clip.named_modules()]
    x, y = _images(model, 3), torch.tensor([0, 1, 2])
    reference = model.zero_shot_logits(x)
    model.train()
    with torch.no_grad():
        plain_out = model(x).logits
    with PrivateTraining(model, make_optimizer(model, model.cfg.train), noise_multiplier=1.0, max_grad_norm=1.0,
                         sample_rate=0.5, expected_batch_size=3) as dp:
        with torch.no_grad():
            hooked_out = model(x).logits
        dp.backward(x, y, 0.1)
        for name, p in model.named_parameters():
            has = getattr(p, "grad_sample", None) is not None
            assert has == is_adapter_param(name), name
            if has:
                assert p.grad_sample.shape == (3, *p.shape)
        assert torch.equal(model.zero_shot_logits(x), reference)  # hooks attached: backbone untouched
    assert torch.equal(hooked_out, plain_out)
    assert [(n, type(m)) for n, m in model.clip.named_modules()] == types_before
    assert any(isinstance(m, torch.nn.MultiheadAttention) for m in model.clip.modules())


def test_backbone_outputs_are_bit_identical_with_dp_on_and_off(tmp_path):
    plain, private = _model(seed=5), _model(seed=5, noise_multiplier=1.0, enabled=True)
    x = _images(plain, 4, seed=9)
    with torch.no_grad():
        before = (plain.clip.encode_image(x), plain.clip.encode_text(plain.full_tokens))
    fit(plain, _loader(plain), plain.cfg, torch.device("cpu"), log=None)
    state = open_privacy_state(tmp_path, private.cfg.privacy, n_train=8, batch_size=4, epochs=1, log=None)
    train_private_round(private, _loader(private), private.cfg, torch.device("cpu"), state, seed=0, log=None)
    for model in (plain, private):
        with torch.no_grad():
            out = (model.clip.encode_image(x), model.clip.encode_text(model.full_tokens))
        assert all(torch.equal(a, b) for a, b in zip(out, before))
    for (n, a), (_, b) in zip(plain.clip.state_dict().items(), private.clip.state_dict().items()):
        assert torch.equal(a, b), n
    assert not torch.equal(private.adapters.oca_vision[0].out.weight, torch.zeros_like(
        private.adapters.oca_vision[0].out.weight))  # the adapters did train


# -- accounting ----------------------------------------------------------------------------
def test_epsilon_after_k_rounds_equals_an_independent_opacus_accountant(tmp_path):
    """Three real DP rounds of a plan for three rounds; then the site's ceiling stops round 4."""
    model = _model(target_epsilon=4.0, enabled=True)
    cfg, device, rounds = model.cfg, torch.device("cpu"), 3
    state = open_privacy_state(tmp_path, cfg.privacy, n_train=8, batch_size=4, epochs=1, rounds=rounds, log=None)
    q, per_round = 0.5, steps_for(8, 4, 1)
    assert (state.sample_rate, per_round, state.delta) == (q, 2, 1e-5)
    sigma = get_noise_multiplier(target_epsilon=4.0, target_delta=1e-5, sample_rate=q, steps=rounds * per_round,
                                 accountant="rdp")
    assert state.noise_multiplier == sigma  # computed once, for all planned rounds
    seen = []
    for k in range(1, rounds + 1):
        history = train_private_round(model, _loader(model), cfg, device, state, state_dir=tmp_path, seed=k, log=None)
        expected = _independent_epsilon("rdp", sigma, q, k * per_round, 1e-5)
        assert state.epsilon == pytest.approx(expected, rel=1e-12, abs=1e-12)
        assert history[-1]["epsilon"] == state.epsilon and history[-1]["dp_steps"] == k * per_round
        report = state.report()
        assert report == {"epsilon": state.epsilon, "dp-steps": k * per_round, "dp-sample-rate": q,
                          "dp-noise-multiplier": sigma, "dp-delta": 1e-5}
        seen.append(state.epsilon)
    print(f"\naccounting: sigma={sigma:.6f} q={q} delta=1e-5 epsilon per round={[round(e, 6) for e in seen]}")
    assert seen == sorted(seen) and seen[-1] <= 4.0
    assert state.history == [[sigma, q, rounds * per_round]]  # one merged accountant entry
    # max-epsilon defaults to the target: the plan is spent, round 4 is declined
    reason = check_budget(state, per_round, max_epsilon=budget_ceiling(cfg.privacy))
    assert reason and "max-epsilon 4" in reason
    with pytest.raises(PrivacyBudgetExceeded):
        train_private_round(model, _loader(model), cfg, device, state, state_dir=tmp_path, log=None)
    assert state.steps == rounds * per_round


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_simulated_rounds_match_opacus_for_both_accountants(mechanism):
    pcfg = _config(noise_multiplier=1.1, accountant=mechanism, enabled=True).privacy
    state = plan_privacy(pcfg, n_train=1000, batch_size=50, epochs=2)
    per_round = steps_for(1000, 50, 2)
    for k in range(1, 4):
        state.record_steps(per_round)
        assert state.epsilon == pytest.approx(_independent_epsilon(mechanism, 1.1, 0.05, k * per_round, 1e-5),
                                              rel=1e-9)
    assert state.steps == 3 * per_round


# -- restart -------------------------------------------------------------------------------
def test_a_restarted_site_continues_its_budget(tmp_path):
    model = _model(noise_multiplier=1.0, enabled=True)
    cfg, device = model.cfg, torch.device("cpu")
    state = open_privacy_state(tmp_path, cfg.privacy, n_train=8, batch_size=4, epochs=1, log=None)
    train_private_round(model, _loader(model), cfg, device, state, state_dir=tmp_path, seed=1, log=None)
    first = state.epsilon
    assert first > 0 and state.rounds == 1

    restored = open_privacy_state(tmp_path, cfg.privacy, n_train=8, batch_size=4, epochs=1, log=None)  # "restart"
    assert restored.to_dict() == state.to_dict()
    train_private_round(model, _loader(model), cfg, device, restored, state_dir=tmp_path, seed=2, log=None)
    assert restored.epsilon > first and restored.steps == 4 and restored.rounds == 2
    assert restored.epsilon == pytest.approx(_independent_epsilon("rdp", 1.0, 0.5, 4, 1e-5), rel=1e-12)

    again = PrivacyState.load(tmp_path)
    assert again.epsilon == restored.epsilon and again.history == [[1.0, 0.5, 4]]
    assert sorted(os.listdir(tmp_path)) == [STATE_FILE]  # atomic write leaves no temp files
    # epsilon never decreases: not by an edited file, nor by re-opening with more data
    raw = json.loads((tmp_path / STATE_FILE).read_text())
    (tmp_path / STATE_FILE).write_text(json.dumps({**raw, "epsilon": 0.0}))
    assert PrivacyState.load(tmp_path).epsilon == restored.epsilon
    bigger = open_privacy_state(tmp_path, cfg.privacy, n_train=160, batch_size=8, epochs=1, log=None)
    assert bigger.epsilon == restored.epsilon and bigger.epsilon_after(0) == restored.epsilon
    assert bigger.epsilon_after(20) > restored.epsilon
    # the budget's terms cannot change mid-federation
    with pytest.raises(ConfigError, match="accounted with 'rdp'"):
        open_privacy_state(tmp_path, apply_overrides(cfg, {"privacy.accountant": "prv"}).privacy,
                           n_train=8, batch_size=4, epochs=1, log=None)
    with pytest.raises(ConfigError, match="delta"):
        open_privacy_state(tmp_path, apply_overrides(cfg, {"privacy.delta": 1e-6}).privacy,
                           n_train=8, batch_size=4, epochs=1, log=None)


# -- budget --------------------------------------------------------------------------------
def test_a_small_max_epsilon_declines_at_the_right_round():
    pcfg = _config(noise_multiplier=1.0, enabled=True).privacy
    state = plan_privacy(pcfg, n_train=40, batch_size=10, epochs=1)  # q = 0.25, 4 steps per round
    eps = [_independent_epsilon("rdp", 1.0, 0.25, 4 * k, state.delta) for k in (3, 4)]
    ceiling = (eps[0] + eps[1]) / 2  # room for three rounds, not four
    declined_at = None
    for rnd in range(1, 7):
        reason = check_budget(state, 4, max_epsilon=ceiling)
        if reason:
            declined_at = rnd
            break
        state.record_steps(4)
    assert declined_at == 4 and state.steps == 12
    assert "would raise epsilon" in reason and f"max-epsilon {ceiling:g}" in reason
    assert state.epsilon <= ceiling


def test_an_empty_poisson_batch_takes_a_noise_only_accounted_step():
    model = _model(randomize=0.1)
    acc = RDPAccountant()
    before = [p.detach().clone() for p in model.adapters.parameters()]
    with PrivateTraining(model, make_optimizer(model, model.cfg.train), noise_multiplier=1.0, max_grad_norm=1.0,
                         sample_rate=0.5, expected_batch_size=4, accountant=acc, noise_seed=0) as dp:
        dp.empty_batch()
        dp.step()
    assert acc.history == [(1.0, 0.5, 1)]
    assert any(not torch.equal(a, b) for a, b in zip(before, model.adapters.parameters()))


# -- config --------------------------------------------------------------------------------
def test_delta_rule_and_privacy_config_validation():
    assert default_delta(32) == 1e-5 and default_delta(1_000_000) == pytest.approx(1e-7)
    assert all(default_delta(n) < 1 / n for n in (1, 7, 1000, 10**7))
    with pytest.raises(ConfigError, match="not below 1/N"):
        plan_privacy(_config(delta=0.1, noise_multiplier=1.0).privacy, n_train=20, batch_size=4, epochs=1)
    with pytest.raises(ConfigError, match="cannot be reached"):
        plan_privacy(_config(target_epsilon=1e-6).privacy, n_train=20, batch_size=20, epochs=50)
    for privacy, message in [({"enabled": True}, "needs privacy.target-epsilon"),
                             ({"target-epsilon": 3, "noise-multiplier": 1}, "not both"),
                             ({"target-epsilon": 3, "max-epsilon": 2}, "must not exceed"),
                             ({"accountant": "gdp"}, "privacy.accountant must be one of"),
                             ({"max-grad-norm": 0}, "max-grad-norm must be > 0")]:
        with pytest.raises(ConfigError, match=message):
            _config(**privacy)
    assert budget_ceiling(_config(target_epsilon=3).privacy) == 3
    assert budget_ceiling(_config(target_epsilon=3, max_epsilon=5).privacy) == 5
    assert budget_ceiling(_config(max_epsilon=5).privacy, site_max_epsilon=2) == 2  # a server cannot raise it
    assert budget_ceiling(_config(max_epsilon=5).privacy, site_max_epsilon=9) == 5
    assert budget_ceiling(_config(noise_multiplier=1).privacy) == float("inf")


# -- end to end ----------------------------------------------------------------------------
def test_nearl_train_with_dp_epsilon_end_to_end(tmp_path, capsys):
    site = generate_demo_data(tmp_path / "data", 1, train_per_site=32, val_per_site=8, test_per_site=8)[0]
    out = tmp_path / "out"
    args = ["train", "--data", str(site), "--out", str(out), "--dp-epsilon", "8", "--epochs", "1",
            "--device", "cpu"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    eps = metrics["privacy"]["epsilon"]
    assert 0 < eps <= 8 and "differential privacy: epsilon" in printed
    assert PrivacyState.load(out).epsilon == eps
    # the same data, the same ledger: a second run would pass epsilon 8, so it is declined
    assert cli.main(args + ["--overwrite"]) == 2
    assert "max-epsilon 8" in capsys.readouterr().err
    assert PrivacyState.load(out).epsilon == eps
