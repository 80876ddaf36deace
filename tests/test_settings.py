"""Federation settings are defined once: flags, pyproject's run config and the docs table come from them."""

from __future__ import annotations

import re
import tomllib

import pytest

from nearl_core.errors import ConfigError
from server.options import (DOCS_BEGIN, DOCS_END, dest_of, docs_table, flag_of, nearl_keys, pyproject_table,
                            settings_from_args)
from server.settings import (SERVER, SIMULATION, SIMULATION_DEFAULTS, STRATEGY_NAMES, FederationSettings, default,
                             run_config_key, setting_fields)
from server.events import ErrorEvent, read_all
from tests.fed_helpers import ROOT

INTERNAL = {"config", "resume", "progress_file", "site_registry", "roster"}  # set by the commands themselves


def pyproject_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def test_pyproject_run_config_is_the_generated_table():
    """Drift fails here: regenerate with `python -m server.options --write`."""
    text = (ROOT / "pyproject.toml").read_text()
    assert text.endswith(pyproject_table()), "pyproject.toml is stale: run python -m server.options --write"
    declared = pyproject_config()
    settings = {k: v for k, v in declared.items() if not isinstance(v, dict)}
    assert settings == {run_config_key(f.name): f.default for f in setting_fields()}
    nearl = {f"{section}.{key}": v for section, keys in declared.items() if isinstance(keys, dict)
             for key, v in keys.items()}
    assert nearl == {key: "" for key in nearl_keys()}
    assert "federation.local" in nearl and "train.loss" in nearl and "task.classes" in nearl  # the keys that failed


def test_the_docs_settings_table_is_current():
    text = (ROOT / "docs" / "federation.md").read_text()
    assert f"{DOCS_BEGIN}\n{docs_table()}{DOCS_END}" in text, "run python -m server.options --write"


@pytest.mark.parametrize("engine, parser", [(SERVER, "server.cli"), (SIMULATION, "simulation.run")])
def test_every_setting_is_a_flag_of_both_commands_or_set_by_them(engine, parser):
    import importlib

    args = importlib.import_module(parser).build_parser().parse_args([])
    for f in setting_fields():
        if f.name in INTERNAL:
            assert f.metadata["on"] == (), f.name
        elif f.name not in ("min_nodes", "wait_timeout", "checkpoint_dir"):  # what a simulation decides itself
            assert f.metadata["on"] == (SERVER, SIMULATION), f.name
        if engine in f.metadata["on"]:
            assert getattr(args, dest_of(f)) is None, f"{flag_of(f)} must default to None (not given)"


def test_flags_without_values_give_the_defaults_and_a_given_flag_wins_over_set():
    from server.cli import build_parser

    s = settings_from_args(build_parser().parse_args([]), SERVER, {})
    assert s == FederationSettings()
    args = build_parser().parse_args(["--server-lr", "0.5", "--no-eval-in-train", "--equal-weights"])
    s = settings_from_args(args, SERVER, {"server-lr": "0.1", "trim-beta": "0.3"})
    assert (s.server_lr, s.trim_beta, s.evaluate_in_train, s.equal_weights) == (0.5, 0.3, False, True)


def test_the_simulation_defaults_differ_only_where_named():
    from simulation.run import build_parser

    s = settings_from_args(build_parser().parse_args([]), SIMULATION, {}, min_nodes=4)
    expected = {**{f.name: f.default for f in setting_fields()}, **SIMULATION_DEFAULTS, "min_nodes": 4}
    assert {f.name: getattr(s, f.name) for f in setting_fields()} == expected


def test_no_module_restates_a_default_as_a_literal_fallback():
    """`.get("server-lr", 0.01)` next to a settings key is a second owner of its default."""
    keys = {run_config_key(f.name) for f in setting_fields()} | set(nearl_keys())
    pattern = re.compile(r"""\.get\(\s*["']([a-z0-9.-]+)["']\s*,""")
    found = []
    for folder in ("server", "client", "simulation", "nearl_protocol", "nearl_core"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                found += [f"{path.relative_to(ROOT)}:{number}: {m.group(1)}" for m in pattern.finditer(line)
                          if m.group(1) in keys]
    assert found == []
    assert pattern.search('options.get("server-lr", 0.01)')  # the pattern finds what it is for


def test_the_guard_and_secure_aggregation_take_their_defaults_from_the_settings():
    from server.robust import Limits
    from server.secagg import SecAggSettings

    limits, secure = Limits(), SecAggSettings()
    assert limits == Limits.from_options({})
    assert (limits.max_abs_value, limits.examples_growth, limits.max_examples, limits.equal_weights,
            limits.outlier_factor) == tuple(default(n) for n in ("max_abs_value", "examples_growth", "max_examples",
                                                                 "equal_weights", "outlier_factor"))
    assert (secure.threshold, secure.clip, secure.max_weight, secure.timeout) == tuple(
        default(n) for n in ("secagg_threshold", "secagg_clip", "secagg_max_weight", "secagg_timeout"))


def test_strategy_names_match_the_strategies():
    from server.strategy import STRATEGIES

    assert tuple(STRATEGIES) == STRATEGY_NAMES


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


def test_the_readme_config_table_names_every_key_of_every_section():
    from nearl_core.config import NearlConfig

    text = (ROOT / "README.md").read_text()
    rows = {line.split("|")[1].strip(" `"): line for line in text.splitlines() if line.startswith("| `")}
    missing = [f"{section}.{key}" for section, keys in NearlConfig().to_dict().items() for key in keys
               if section not in rows or f"`{key}`" not in rows[section]]
    assert missing == []


@pytest.mark.parametrize("words, line", [
    (["--set", "train.nonsense=1"], "nearl-server: error: unknown config key 'train.nonsense'; keys look like "
                                    "'train.lr' or 'adapter.rank'"),
    (["--set", "train.lr=fast"], "nearl-server: error: overrides: train.lr: expected a float, got 'fast'"),
    (["--set", "strategy=fedsgd"], "nearl-server: error: run config: strategy must be one of fedavg, fedprox, "
                                   "fedavgm, fedadam, fedyogi, fedmedian, fedtrimmedavg, krum"),
    (["--set", "rounds=3"], "nearl-server: error: --set rounds: not a NEARL config key (section.key) nor a "
                            "federation setting; settings: "),
])
def test_nearl_server_refuses_a_bad_key_or_value_in_one_line_before_any_process(words, line, capsys, tmp_path):
    from server.cli import main

    assert main(["--insecure", "--checkpoint-dir", str(tmp_path / "ck"), *words]) == 2
    err = capsys.readouterr().err
    assert err.startswith(line) and err.count("\n") == 1, err
