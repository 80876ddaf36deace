"""The DP flags mean the same on every command: one function (nearl_core.flags.dp_overrides), one delta rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from nearl_core import flags
from nearl_core.errors import ConfigError
from nearl_core.privacy import default_delta

WORDS = ["--dp-epsilon", "3", "--dp-max-grad-norm", "0.5"]


def nearl_train(words: list[str], tmp: Path):
    from nearl_core.cli import build_parser
    from nearl_core.workflows import config_from_args

    args = build_parser().parse_args(["train", "--data", str(tmp), "--out", str(tmp), "--config", "demo", *words])
    return config_from_args(args)


def nearl_server(words: list[str], tmp: Path):
    from server.cli import Server, build_parser

    args = build_parser().parse_args(["--insecure", "--checkpoint-dir", str(tmp / "ck"), *words])
    return Server(args, tmp).validate()[0].nearl_config()


def simulation(words: list[str], tmp: Path):
    from server.options import federation_keys
    from simulation.run import build_parser, config_of

    args = build_parser().parse_args(words)
    args.nearl_sets = flags.config_overrides(args, federation_keys())
    return config_of(args)


COMMANDS = {"nearl train": nearl_train, "nearl-server": nearl_server, "simulation/run.py": simulation}


@pytest.mark.parametrize("command", COMMANDS)
def test_dp_flags_give_the_same_privacy_config_on_every_command(command, tmp_path):
    privacy = COMMANDS[command](WORDS, tmp_path).privacy
    assert (privacy.enabled, privacy.target_epsilon, privacy.max_grad_norm) == (True, 3.0, 0.5)
    assert privacy.noise_multiplier is None  # --dp-epsilon plans the noise itself
    assert privacy.delta is None  # each site applies the one rule: min(1e-5, 1/(10 N))
    assert COMMANDS[command](["--dp-epsilon", "3", "--dp-delta", "1e-7"], tmp_path).privacy.delta == 1e-7
    assert COMMANDS[command]([], tmp_path).privacy.enabled is False  # no flag, no DP


@pytest.mark.parametrize("command", COMMANDS)
def test_a_refinement_without_dp_epsilon_is_refused_on_every_command(command, tmp_path):
    with pytest.raises(ConfigError, match=r"^--dp-delta and --dp-max-grad-norm refine --dp-epsilon E: give it too$"):
        COMMANDS[command](["--dp-delta", "1e-6"], tmp_path)


def test_the_delta_rule():
    assert default_delta(100) == 1e-5 and default_delta(1_000_000) == 1e-7
    assert flags.dp_overrides(epsilon=None) == {}
