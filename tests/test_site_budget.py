"""A site's own DP ceiling (nearl-client --max-epsilon) is never raised by the server's config."""

from __future__ import annotations

from dataclasses import replace

import nearl_core.privacy as privacy
from client import task
from nearl_core.config import load_config


def test_node_config_max_epsilon_reaches_the_binding():
    b = task.site_binding({"site": "siteA", "data-path": "/data/a", "max-epsilon": 2.5})
    assert b.max_epsilon == 2.5
    assert task.site_binding({"site": "siteA", "data-path": "/data/a"}).max_epsilon is None


def test_private_round_uses_the_lower_of_site_and_server_ceilings(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(privacy, "open_privacy_state", lambda *a, **k: type("S", (), {"epsilon": 0.0})())

    def fake_round(*args, max_epsilon=None, **kwargs):
        seen["max_epsilon"] = max_epsilon
        return []

    monkeypatch.setattr(privacy, "train_private_round", fake_round)
    cfg = load_config("demo")
    server_says = replace(cfg, privacy=replace(cfg.privacy, enabled=True, target_epsilon=8.0, max_epsilon=50.0))
    loader = type("L", (), {"dataset": [0] * 10})()
    site = task.SiteBinding("siteA", tmp_path, state_dir=tmp_path, max_epsilon=3.0)
    task._private_round(None, loader, server_says, "cpu", site, epochs=1, total_rounds=2, log=print)
    assert seen["max_epsilon"] == 3.0  # the server's 50 does not raise the site's 3
    lower = replace(server_says, privacy=replace(server_says.privacy, max_epsilon=1.0))
    task._private_round(None, loader, lower, "cpu", site, epochs=1, total_rounds=2, log=print)
    assert seen["max_epsilon"] == 1.0  # but it may lower it
