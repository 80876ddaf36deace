"""A site's own DP ceiling (nearl-client --max-epsilon) is never raised by the server's config."""

from __future__ import annotations

from dataclasses import replace

import nearl_core.privacy as privacy
from client import task
from client.budget import round_budget
from nearl_core.config import load_config


def test_node_config_max_epsilon_reaches_the_binding():
    b = task.site_binding({"site": "siteA", "data-path": "/data/a", "max-epsilon": 2.5})
    assert b.max_epsilon == 2.5
    assert task.site_binding({"site": "siteA", "data-path": "/data/a"}).max_epsilon is None


def test_round_budget_uses_the_lower_of_site_and_server_ceilings(tmp_path):
    cfg = load_config("demo")
    # target 2 planned over 2 rounds: one round spends less than 3
    server_says = replace(cfg, privacy=replace(cfg.privacy, enabled=True, target_epsilon=2.0, max_epsilon=50.0))
    site = task.SiteBinding("siteA", tmp_path, state_dir=tmp_path / "state", max_epsilon=3.0)
    budget = round_budget(site, server_says, n_train=40, epochs=1, total_rounds=2, log=None)
    assert budget.ceiling == 3.0  # the server's 50 does not raise the site's 3
    assert budget.steps == privacy.steps_for(40, cfg.train.batch_size, 1) and budget.decline is None
    lower = replace(server_says, privacy=replace(server_says.privacy, max_epsilon=1.0))
    assert round_budget(site, lower, n_train=40, epochs=1, total_rounds=2, log=None).ceiling == 1.0  # may lower


def test_a_spent_budget_declines_before_training(tmp_path):
    cfg = load_config("demo")
    cfg = replace(cfg, privacy=replace(cfg.privacy, enabled=True, target_epsilon=2.0))
    site = task.SiteBinding("siteA", tmp_path, state_dir=tmp_path / "state", max_epsilon=1.0)
    budget = round_budget(site, cfg, n_train=40, epochs=1, total_rounds=1, log=None)
    # the plan spends epsilon 2 in this one round; the site allows 1: declined, nothing spent
    assert budget.decline and "max-epsilon 1" in budget.decline
    m = budget.declined_metrics()
    assert m["dp-declined"] == 1.0 and m["epsilon"] == 0.0 and m["dp-steps"] == 0
    assert m["dp-max-epsilon"] == 1.0 and 1.0 < m["dp-epsilon-next"] <= 2.0 + 1e-6


def test_simulated_sites_get_their_own_ledger_and_ceiling(tmp_path):
    rc = {"sim-data-root": str(tmp_path / "sites"), "sim-state-root": str(tmp_path / "state"),
          "sim-max-epsilon": "site2=1.5"}
    from simulation.site_app import simulated_site

    one, two = (simulated_site(k, rc) for k in (0, 1))
    assert (one.site, one.data, one.max_epsilon) == ("site1", tmp_path / "sites" / "site1", None)
    assert (two.site, two.max_epsilon, two.privacy_dir()) == ("site2", 1.5, tmp_path / "state" / "site2")


def test_a_node_without_a_site_binding_is_a_readable_error():
    """A hospital's node config must name its site; the simulation's keys mean nothing to client/."""
    import pytest

    from nearl_core.errors import ConfigError

    with pytest.raises(ConfigError, match="nearl-client --site NAME"):
        task.site_binding({"partition-id": 0})
