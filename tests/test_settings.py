"""Federation settings are defined once: pyproject's run config, FederationSettings and nearl-server agree."""

from __future__ import annotations

import tomllib

import pytest

from nearl_core.errors import ConfigError
from server.cli import build_parser
from server.events import ErrorEvent, read_all
from server.settings import FederationSettings, default, run_config_key, setting_fields
from tests.fed_helpers import ROOT

# nearl-server flag (argparse dest) for each setting it exposes
FLAGS = {"num_rounds": "rounds", "config": "config", "strategy": "strategy", "min_nodes": "min_sites",
         "fraction_train": "fraction_train", "round_timeout": "round_timeout", "wait_timeout": "wait_timeout",
         "local_epochs": "local_epochs", "evaluate_in_train": "evaluate_in_train", "proximal_mu": "proximal_mu",
         "server_lr": "server_lr", "server_momentum": "server_momentum", "trim_beta": "trim_beta", "krum_malicious": "krum_malicious",
         "max_abs_value": "max_abs_value", "outlier_factor": "outlier_factor",
         "examples_growth": "examples_growth", "max_examples": "max_examples", "equal_weights": "equal_weights",
         "server_dp_noise": "server_dp_noise", "server_dp_clip": "server_dp_clip",
         "server_dp_delta": "server_dp_delta", "transport_dtype": "transport_dtype", "mlflow_uri": "mlflow_uri",
         "mlflow_experiment": "experiment", "checkpoint_dir": "checkpoint_dir",
         "keep_checkpoints": "keep_checkpoints", "secure_aggregation": "secure_aggregation",
         "secagg_threshold": "secagg_threshold", "secagg_clip": "secagg_clip",
         "secagg_max_weight": "secagg_max_weight", "secagg_timeout": "secagg_timeout"}


def pyproject_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def test_pyproject_run_config_declares_every_setting_with_its_default():
    declared = {k: v for k, v in pyproject_config().items() if not isinstance(v, dict)}
    expected = {run_config_key(f.name): f.default for f in setting_fields()}
    assert declared == expected


def test_nearl_server_flags_default_to_the_same_values():
    args = vars(build_parser().parse_args([]))
    for name, dest in FLAGS.items():
        assert str(args[dest]) == str(default(name)), name
    exposed = set(FLAGS) | {"resume", "progress_file", "site_registry"}  # set by nearl-server itself
    assert exposed == {f.name for f in setting_fields()}


@pytest.mark.parametrize("key, hint", [
    ("stratgy", "did you mean 'strategy'"),
    ("min-node", "did you mean 'min-nodes'"),
    ("sim-data-root", "valid keys:"),  # the simulation's keys stay in simulation/
    ("xyz", "valid keys:"),
])
def test_an_unknown_run_config_key_is_refused_with_the_closest_valid_one(key, hint):
    with pytest.raises(ConfigError, match=f"run config key '{key}' is not a NEARL federation key.*{hint}"):
        FederationSettings.from_run_config({"strategy": "krum", key: 7})


def test_the_simulation_app_declares_the_product_keys_plus_its_own(tmp_path):
    from simulation.launch import app_dir
    from simulation.site_app import SIM_KEYS

    folder = app_dir(tmp_path)
    app = tomllib.loads((folder / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert app["components"]["clientapp"] == "simulation.site_app:clientapp"
    assert app["config"] == {**pyproject_config(), **SIM_KEYS}
    assert (folder / "simulation" / "site_app.py").read_text() == (ROOT / "simulation" / "site_app.py").read_text()


def test_the_server_app_refuses_an_unknown_key_before_any_round(tmp_path):
    """A typo reaching the ServerApp ends the run with the key named, not with the defaults."""
    from server.federation import run_federation
    from tests.fed_helpers import FakeGrid

    progress = tmp_path / "progress.jsonl"
    with pytest.raises(ConfigError, match="'stratgy' is not a NEARL federation key; did you mean 'strategy'"):
        run_federation(FakeGrid([1, 2]), {**pyproject_config(), "stratgy": "krum", "progress-file": str(progress)})
    (event,) = read_all(progress)
    assert isinstance(event, ErrorEvent) and "did you mean 'strategy'" in event.message  # what nearl-server prints
