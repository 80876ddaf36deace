"""The federated training options measured in docs/federation.md: the site's loss from its own
label counts, one learning-rate schedule across rounds, FedAvgM, and simulation's --set."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import Array, ArrayRecord, ConfigRecord

from nearl_core.config import load_config
from nearl_core.errors import ConfigError, NearlError
from nearl_core.train import SiteLoss, make_scheduler, schedule_window, warmup_cosine
from server.strategy import make_strategy
from tests.fed_helpers import FakeGrid, reply_from, restore_task_identity, server_task_identity, train_reply_content


def test_logit_adjustment_adds_tau_log_prior_and_leaves_ce_unchanged():
    logits, labels = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 0, 1])
    assert SiteLoss.of("ce", [3, 2, 1])(logits, labels) == F.cross_entropy(logits, labels)
    adjusted = SiteLoss.of("logit-adjusted", [30, 20, 0], tau=1.0)
    prior = torch.tensor([30.0, 20.0, 1.0])  # an absent class counts once instead of giving log 0
    expected = F.cross_entropy(logits + torch.log(prior / prior.sum()), labels)
    assert torch.allclose(adjusted(logits, labels), expected)


def test_the_balanced_loss_is_a_mean_of_per_sample_terms():
    """DP-SGD clips per sample: the batch loss must not mix samples (a weighted mean divided by the
    batch's own weight sum would)."""
    loss = SiteLoss.of("balanced", [40, 10, 50])
    logits, labels = torch.randn(5, 3), torch.tensor([0, 1, 1, 2, 0])
    per_sample = torch.stack([loss(logits[i:i + 1], labels[i:i + 1]) for i in range(5)])
    assert torch.allclose(loss(logits, labels), per_sample.mean())
    w = loss.class_weight
    assert w[1] > w[0] > w[2]  # the rarest class weighs most
    assert torch.isclose((w * torch.tensor([40.0, 10, 50])).sum() / 100, torch.tensor(1.0))  # mean weight 1


def test_unknown_losses_and_schedules_are_config_errors():
    with pytest.raises(ConfigError, match="train.loss must be one of ce, logit-adjusted, balanced"):
        load_config("demo", {"train.loss": "focal"})
    with pytest.raises(ConfigError, match="train.schedule must be one of round, federation"):
        load_config("demo", {"train.schedule": "linear"})


def _lrs(scheduler, optimizer, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_a_federation_schedule_is_one_curve_split_across_rounds():
    cfg = load_config("demo", {"train.schedule": "federation"}).train
    whole_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    whole = _lrs(warmup_cosine(whole_opt, 30, cfg.warmup_frac), whole_opt, 30)
    pieces = []
    for r in (1, 2, 3):
        window = schedule_window(cfg, r, 3, 10)
        assert window == ((r - 1) * 10, 30)
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        pieces += _lrs(make_scheduler(opt, cfg, 10, window), opt, 10)
    assert pieces == pytest.approx(whole)
    assert schedule_window(load_config("demo").train, 2, 3, 10) is None  # "round": restart every round
    restarted_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    restarted = _lrs(make_scheduler(restarted_opt, cfg, 10), restarted_opt, 10)
    assert restarted[-1] < 0.05 and not math.isclose(restarted[-1], whole[9])


def test_fedavgm_carries_momentum_across_rounds():
    saved = server_task_identity()
    try:
        _fedavgm_steps()
    finally:
        restore_task_identity(saved)


def _fedavgm_steps() -> None:
    schema = {"w": ((4,), "float32")}
    strategy = make_strategy("fedavgm", schema=schema, min_nodes=1, total_rounds=2,
                             options={"server-momentum": 0.5})
    current = ArrayRecord({"w": Array(np.zeros(4, np.float32))})
    steps = []
    for r in (1, 2):
        list(strategy.configure_train(r, current, ConfigRecord(), FakeGrid([1])))
        target = current["w"].numpy() + 1.0  # the site moves every weight by +1 each round
        arrays, _ = strategy.aggregate_train(r, [reply_from(1, train_reply_content("site1", {"w": target}))])
        steps.append(arrays["w"].numpy() - current["w"].numpy())
        current = arrays
    assert steps[0] == pytest.approx(np.ones(4))
    assert steps[1] == pytest.approx(np.full(4, 1.5))  # 1 + 0.5 x the previous step


def test_set_splits_config_keys_from_federation_settings_in_one_grammar():
    from nearl_core.flags import parse_set
    from server.options import federation_keys

    nearl, server = parse_set(["train.loss=logit-adjusted", "server-momentum=0.5", "proximal-mu=0.1"],
                              federation_keys())
    assert nearl == {"train.loss": "logit-adjusted"} and server == {"server-momentum": "0.5", "proximal-mu": "0.1"}
    with pytest.raises(NearlError, match="--set rounds: not a NEARL config key .section.key. nor a federation "
                                         "setting; settings: .*server-lr"):
        parse_set(["rounds=3"], federation_keys())
    with pytest.raises(NearlError, match="--set server-lr: not a NEARL config key; keys look like 'train.lr'"):
        parse_set(["server-lr=3"])  # nearl train: no federation settings
    with pytest.raises(NearlError, match="expected KEY=VALUE"):
        parse_set(["train.loss"])
