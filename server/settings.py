"""Flower run config (kebab-case keys) -> federation settings + the NEARL config.

The federation's settings are defined once, here: each field of
:class:`FederationSettings` carries its default and help text; ``nearl-server`` takes its
flag defaults and help from :func:`default` and :func:`help_of`, and the run config
declared in pyproject.toml (``[tool.flwr.app.config]``) must agree with them
(``tests/test_settings.py`` checks it).

The run config holds two kinds of keys: federation keys such as ``num-server-rounds`` or
``strategy``, and NEARL config keys ``section.key`` (``train.lr``, ``adapter.rank``...),
where ``""`` means "keep the value of the config file named by ``config``".  Any other
key is refused, naming the closest valid one: a typo must not silently run the defaults.
"""

from __future__ import annotations

import difflib
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from nearl_core.config import NearlConfig, load_config
from nearl_core.errors import ConfigError
from nearl_core.transport import TRANSPORT_DTYPES
from server.central_dp import check_central_dp
from server.secagg import SecAggSettings
from server.secagg_round import secure_problem
from server.strategy import STRATEGIES

SECTIONS = tuple(f.name for f in fields(NearlConfig))
ROUNDS_KEY = "num-server-rounds"  # Flower's name for the number of rounds


def _opt(default: Any, help: str) -> Any:  # noqa: A002 - the argparse word
    return field(default=default, metadata={"help": help})


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.lower() in ("true", "1", "yes")
    if isinstance(value, int):
        return bool(value)
    raise ConfigError(f"expected true or false, got {value!r}")


@dataclass(frozen=True)
class FederationSettings:
    num_rounds: int = _opt(3, "global rounds")
    config: str = _opt("demo", "NEARL config: shipped name (demo, vit-b16) or YAML file")
    strategy: str = _opt("fedavg", "fedavg, fedprox, fedavgm, fedadam, fedyogi, fedmedian, fedtrimmedavg or krum")
    min_nodes: int = _opt(2, "sites that must be connected before a round starts, and per round")
    fraction_train: float = _opt(1.0, "fraction of connected sites sampled per round")
    round_timeout: float = _opt(3600.0, "seconds a round waits for replies before going on without a site")
    wait_timeout: float = _opt(600.0, "seconds to wait for the minimum number of sites before failing")
    local_epochs: int = _opt(1, "local epochs per site per round")
    evaluate_in_train: bool = _opt(True, "sites evaluate the incoming global adapters inside the train message")
    proximal_mu: float = _opt(0.01, "FedProx proximal term mu")
    server_lr: float = _opt(0.01, "FedAdam/FedYogi server learning rate (eta)")
    server_momentum: float = _opt(0.9, "FedAvgM server momentum")
    trim_beta: float = _opt(0.2, "FedTrimmedAvg: fraction trimmed at each end")
    krum_malicious: int = _opt(0, "Krum: assumed number of malicious sites")
    max_abs_value: float = _opt(1e4, "largest |value| an update or the aggregate may hold; beyond it the update "
                                "(or the round's aggregate) is rejected")
    outlier_factor: float = _opt(10.0, "reject an update whose distance to the global adapters exceeds this "
                                 "x the round's median distance (needs 3 updates; 0 = off)")
    examples_growth: float = _opt(2.0, "a site's num-examples is capped at its first accepted count x this")
    max_examples: float = _opt(1e7, "absolute cap of any site's num-examples claim")
    equal_weights: bool = _opt(False, "FedAvg/FedProx weigh every site's update equally instead of by num-examples")
    server_dp_noise: float = _opt(0.0, "client-level DP at the server: noise multiplier (0 = off); fedavg/fedprox")
    server_dp_clip: float = _opt(0.0, "L2 bound of each site's update for server-side DP")
    server_dp_delta: float = _opt(1e-5, "client-level delta of the server-side epsilon")
    transport_dtype: str = _opt("float32", "adapters on the wire: float32, fp16 or bf16 (aggregation in float32)")
    mlflow_uri: str = _opt("sqlite:///mlflow.db", "MLflow tracking URI")
    mlflow_experiment: str = _opt("nearl-federated", "MLflow experiment name")
    checkpoint_dir: str = _opt("checkpoints", "where rounds are checkpointed")
    keep_checkpoints: int = _opt(3, "most recent rounds kept (0 = all)")
    resume: bool = _opt(False, "continue the run checkpointed in checkpoint-dir")
    progress_file: str = _opt("", "JSON lines of progress for nearl-server ('' = none)")
    site_registry: str = _opt("", "site registry file (name -> public key, node id) written by nearl-server")
    secure_aggregation: bool = _opt(False, "SecAgg+: the server learns only the sum of the sites' updates "
                                    "(fedavg, fedprox, fedadam, fedyogi)")
    secagg_threshold: float = _opt(0.6, "secure aggregation: fraction of a round's sites whose shares unmask it "
                                   "(always more than half); more dropouts abort the round")
    secagg_clip: float = _opt(0.05, "secure aggregation: each coordinate of an update is clipped to +-this "
                              "before it is quantized and masked")
    secagg_max_weight: int = _opt(100000, "secure aggregation: the largest example count one site's update "
                                  "weighs in with")
    secagg_timeout: float = _opt(300.0, "secure aggregation: seconds each key exchange waits for the sites")
    overrides: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "FederationSettings":
        """Parse a run config, refusing any key that is neither a federation key nor ``section.key``."""
        known = {run_config_key(f.name): f.name for f in setting_fields()}
        kwargs: dict[str, Any] = {}
        overrides = []
        for key, value in run_config.items():
            if key in known:
                kwargs[known[key]] = value
            elif key.partition(".")[0] in SECTIONS:
                if value != "":
                    overrides.append((key, value))
            else:
                raise ConfigError(f"run config key {key!r} is not a NEARL federation key{_closest(key, known)}")
        return cls(**kwargs, overrides=tuple(sorted(overrides)))._coerced()

    def _coerced(self) -> "FederationSettings":
        values: dict[str, Any] = {}
        try:
            for f in setting_fields():
                kind = type(f.default)
                raw = getattr(self, f.name)
                values[f.name] = _bool(raw) if kind is bool else kind(raw)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"run config: {err}") from None
        s = FederationSettings(**{**values, "strategy": values["strategy"].lower(),
                                  "transport_dtype": values["transport_dtype"].lower()}, overrides=self.overrides)
        s._check()
        return s

    def _check(self) -> None:
        checks = [
            (self.num_rounds >= 1, f"{ROUNDS_KEY} must be >= 1"),
            (self.strategy in STRATEGIES, f"strategy must be one of {', '.join(STRATEGIES)}"),
            (self.min_nodes >= 1, "min-nodes must be >= 1"),
            (0 < self.fraction_train <= 1, "fraction-train must be in (0, 1]"),
            (self.round_timeout > 0 and self.wait_timeout > 0, "round-timeout and wait-timeout must be > 0"),
            (self.local_epochs >= 1, "local-epochs must be >= 1"),
            (0 <= self.trim_beta < 0.5, "trim-beta must be in [0, 0.5)"),
            (0 <= self.server_momentum < 1, "server-momentum must be in [0, 1)"),
            (self.max_abs_value > 0, "max-abs-value must be > 0"),
            (self.outlier_factor == 0 or self.outlier_factor > 1, "outlier-factor must be 0 (off) or > 1"),
            (self.examples_growth >= 1, "examples-growth must be >= 1"),
            (self.max_examples >= 1, "max-examples must be >= 1"),
            (self.transport_dtype in TRANSPORT_DTYPES, f"transport-dtype must be one of {', '.join(TRANSPORT_DTYPES)}"),
        ]
        central = check_central_dp(self.strategy, self.server_dp_noise, self.server_dp_clip, self.server_dp_delta)
        checks.append((central is None, central or ""))
        checks += secagg_checks(self)
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"run config: {message}")

    @property
    def central_dp(self) -> bool:
        return self.server_dp_noise > 0 and self.server_dp_clip > 0

    def secagg_settings(self) -> SecAggSettings | None:
        """The strategy's secure-aggregation settings, None when it is off."""
        if not self.secure_aggregation:
            return None
        return SecAggSettings(self.secagg_threshold, self.secagg_clip, self.secagg_max_weight, self.equal_weights,
                              self.secagg_timeout)

    def nearl_config(self) -> NearlConfig:
        cfg = load_config(self.config, dict(self.overrides))
        if not cfg.task.classes:
            raise ConfigError(f"config {self.config}: a federation needs task.classes (the same list at every site)")
        return cfg

    def strategy_options(self) -> dict[str, Any]:
        names = ("proximal_mu", "server_lr", "server_momentum", "trim_beta", "krum_malicious", "max_abs_value", "outlier_factor",
                 "examples_growth", "max_examples", "equal_weights")
        return {run_config_key(n): getattr(self, n) for n in names}

    def checkpoint_path(self) -> Path | None:
        return Path(self.checkpoint_dir).expanduser() if self.checkpoint_dir else None

    def params(self) -> dict[str, Any]:
        """For MLflow: the federation settings under ``federation.``."""
        return {f"federation.{f.name}": getattr(self, f.name) for f in setting_fields()}


def secagg_checks(s: FederationSettings) -> list[tuple[bool, str]]:
    """Secure aggregation's start-up checks: a linear strategy, no server-side clipping, sane parameters."""
    if not s.secure_aggregation:
        return []
    problem = secure_problem(s.strategy, s.central_dp)
    return [(problem is None, f"--secure-aggregation: {problem}"),
            (0.5 < s.secagg_threshold <= 1, "secagg-threshold must be in (0.5, 1]: above half of a round's sites"),
            (s.secagg_clip > 0, "secagg-clip must be > 0"),
            (1 <= s.secagg_max_weight <= 2**31 // 1000, f"secagg-max-weight must be in [1, {2**31 // 1000}]"),
            (s.secagg_timeout > 0, "secagg-timeout must be > 0")]


def setting_fields() -> list:
    return [f for f in fields(FederationSettings) if f.name != "overrides"]


def run_config_key(name: str) -> str:
    """``min_nodes`` -> ``min-nodes``; ``num_rounds`` -> Flower's ``num-server-rounds``."""
    return ROUNDS_KEY if name == "num_rounds" else name.replace("_", "-")


def default(name: str) -> Any:
    f = next(f for f in setting_fields() if f.name == name)
    return f.default if f.default is not MISSING else None


def help_of(name: str, extra: str = "") -> str:
    f = next(f for f in setting_fields() if f.name == name)
    return f"{f.metadata['help']}{extra} (default {f.default})"


def _closest(key: str, known: Mapping[str, str]) -> str:
    match = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else f"; valid keys: {', '.join(sorted(known))} or section.key"
