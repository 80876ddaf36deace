"""A secure demo federation equals the plain one within the stated bound (slow: real training, tiny run).

The product's ServerApp code (server.federation.run_federation) and the sites' handlers run
twice on the same 3 synthetic sites, 2 rounds of 1 local epoch, over bench/secagg.py's
in-process Grid: once plain, once with secure-aggregation.  Round 1 starts from the same
adapters, so the sites send the same updates: the global adapters after round 1 must agree
within the quantization bound (plus one float32 rounding), and the final accuracies must agree.
"""

from __future__ import annotations

import numpy as np
import pytest

from nearl_protocol import secagg as sa
from nearl_core.demo_data import generate_demo_data
from server.settings import default

pytestmark = [pytest.mark.slow]


def test_secure_and_plain_demo_federations_agree_within_the_bound(tmp_path):
    from bench.secagg import federate

    generate_demo_data(tmp_path / "data", 3, train_per_site=16, val_per_site=8, test_per_site=4)
    plain = federate(tmp_path / "data", tmp_path / "plain", 3, 2, False, None)
    secure = federate(tmp_path / "data", tmp_path / "secure", 3, 2, True, None)
    assert not any(plain["not_applied"]) and not any(secure["not_applied"])
    params = sa.Params(3, 2, default("secagg_clip"), default("secagg_max_weight"))
    after_round_1 = secure["globals"][2]
    bound = params.error_bound(3 * 16) + np.spacing(np.abs(after_round_1).astype(np.float32))
    assert np.all(np.abs(after_round_1 - plain["globals"][2]) <= bound)
    assert not np.array_equal(secure["globals"][2], secure["globals"][1])  # round 1 did move the adapters
    assert abs(secure["accuracy"] - plain["accuracy"]) <= 1 / 24 + 1e-9  # at most one of the 24 val images
    assert secure["bytes"][0] < 1.05 * plain["bytes"][0]


def test_local_groups_stay_at_the_sites_under_secure_aggregation(tmp_path):
    """Personalization composes with secure aggregation: the masked vectors cover the shared tensors only,
    the sites keep (and train) their local groups, and the coordinator's copy of them never moves."""
    import torch

    from bench.secagg import federate
    from nearl_core.adapter_io import get_adapter_state, read_adapters, shared_schema
    from nearl_core.config import load_config
    from nearl_core.model import build_model
    from nearl_core.personalize import local_names

    generate_demo_data(tmp_path / "data", 3, train_per_site=16, val_per_site=8, test_per_site=4)
    out = federate(tmp_path / "data", tmp_path / "secure", 3, 1, True, None,
                   extra={"federation.local": "oca-text,gates", "federation.finetune-epochs": 0})
    assert not any(out["not_applied"])
    cfg = load_config("demo", {"federation.local": "oca-text,gates"})
    model = build_model(cfg)
    local = local_names(model)
    shared_values = sum(int(np.prod(s)) for s, _ in shared_schema(model).values())
    assert all(len(g) == shared_values for g in out["globals"].values())  # instructions carry shared tensors only
    init = get_adapter_state(model)
    assert all(np.array_equal(out["adapters"][n], init[n].numpy()) for n in local)  # never aggregated
    assert any(not np.array_equal(out["adapters"][n], init[n].numpy()) for n in init if n not in local)
    kept, _ = read_adapters(tmp_path / "secure" / "state-site1" / "local")
    assert any(not torch.equal(kept[n], init[n]) for n in local)  # trained and kept at the site
