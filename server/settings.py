"""Flower run config (kebab-case keys) -> federation settings + the NEARL config.

The run config holds two kinds of keys (see ``[tool.flwr.app.config]`` in pyproject.toml):
federation keys such as ``num-server-rounds`` or ``strategy``, and NEARL config keys
``section.key`` (``train.lr``, ``adapter.rank``...), where ``""`` means "keep the value
of the config file named by ``config``".
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from nearl_core.config import NearlConfig, load_config
from nearl_core.errors import ConfigError
from nearl_core.transport import TRANSPORT_DTYPES
from server.central_dp import check_central_dp
from server.strategy import STRATEGIES

SECTIONS = tuple(f.name for f in fields(NearlConfig))


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
    num_rounds: int = 3
    config: str = "demo"
    strategy: str = "fedavg"
    min_nodes: int = 2
    fraction_train: float = 1.0
    round_timeout: float = 3600.0
    wait_timeout: float = 600.0
    local_epochs: int = 1
    evaluate_in_train: bool = True
    proximal_mu: float = 0.01
    server_lr: float = 0.01
    trim_beta: float = 0.2
    krum_malicious: int = 0
    server_dp_noise: float = 0.0  # client-level DP at the server (server/central_dp.py); 0 = off
    server_dp_clip: float = 0.0
    server_dp_delta: float = 1e-5
    transport_dtype: str = "float32"  # adapters on the wire: float32, fp16 or bf16 (aggregation stays float32)
    mlflow_uri: str = "sqlite:///mlflow.db"
    mlflow_experiment: str = "nearl-federated"
    checkpoint_dir: str = "checkpoints"
    keep_checkpoints: int = 3
    resume: bool = False
    progress_file: str = ""
    overrides: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "FederationSettings":
        names = {f.name for f in fields(cls)} - {"overrides", "num_rounds"}
        kwargs: dict[str, Any] = {}
        overrides = []
        for key, value in run_config.items():
            attr = key.replace("-", "_")
            if key == "num-server-rounds":
                kwargs["num_rounds"] = int(value)
            elif attr in names:
                kwargs[attr] = value
            elif key.partition(".")[0] in SECTIONS:
                if value != "":
                    overrides.append((key, value))
            # other keys belong to other components (e.g. a simulation launcher); ignore them
        s = cls(**kwargs, overrides=tuple(sorted(overrides)))
        return s._coerced()

    def _coerced(self) -> "FederationSettings":
        try:
            s = FederationSettings(
                num_rounds=int(self.num_rounds), config=str(self.config), strategy=str(self.strategy).lower(),
                min_nodes=int(self.min_nodes), fraction_train=float(self.fraction_train),
                round_timeout=float(self.round_timeout), wait_timeout=float(self.wait_timeout),
                local_epochs=int(self.local_epochs), evaluate_in_train=_bool(self.evaluate_in_train),
                proximal_mu=float(self.proximal_mu), server_lr=float(self.server_lr),
                trim_beta=float(self.trim_beta), krum_malicious=int(self.krum_malicious),
                server_dp_noise=float(self.server_dp_noise), server_dp_clip=float(self.server_dp_clip),
                server_dp_delta=float(self.server_dp_delta), transport_dtype=str(self.transport_dtype).lower(),
                mlflow_uri=str(self.mlflow_uri), mlflow_experiment=str(self.mlflow_experiment),
                checkpoint_dir=str(self.checkpoint_dir), keep_checkpoints=int(self.keep_checkpoints),
                resume=_bool(self.resume), progress_file=str(self.progress_file), overrides=self.overrides)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"run config: {err}") from None
        checks = [
            (s.num_rounds >= 1, "num-server-rounds must be >= 1"),
            (s.strategy in STRATEGIES, f"strategy must be one of {', '.join(STRATEGIES)}"),
            (s.min_nodes >= 1, "min-nodes must be >= 1"),
            (0 < s.fraction_train <= 1, "fraction-train must be in (0, 1]"),
            (s.round_timeout > 0 and s.wait_timeout > 0, "round-timeout and wait-timeout must be > 0"),
            (s.local_epochs >= 1, "local-epochs must be >= 1"),
            (0 <= s.trim_beta < 0.5, "trim-beta must be in [0, 0.5)"),
            (s.transport_dtype in TRANSPORT_DTYPES, f"transport-dtype must be one of {', '.join(TRANSPORT_DTYPES)}"),
        ]
        central = check_central_dp(s.strategy, s.server_dp_noise, s.server_dp_clip, s.server_dp_delta)
        checks.append((central is None, central or ""))
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"run config: {message}")
        return s

    @property
    def central_dp(self) -> bool:
        return self.server_dp_noise > 0 and self.server_dp_clip > 0

    def nearl_config(self) -> NearlConfig:
        cfg = load_config(self.config, dict(self.overrides))
        if not cfg.task.classes:
            raise ConfigError(f"config {self.config}: a federation needs task.classes (the same list at every site)")
        return cfg

    def strategy_options(self) -> dict[str, Any]:
        return {"proximal-mu": self.proximal_mu, "server-lr": self.server_lr, "trim-beta": self.trim_beta,
                "krum-malicious": self.krum_malicious}

    def checkpoint_path(self) -> Path | None:
        return Path(self.checkpoint_dir).expanduser() if self.checkpoint_dir else None

    def params(self) -> dict[str, Any]:
        """For MLflow: the federation settings under ``federation.``."""
        return {f"federation.{f.name}": getattr(self, f.name) for f in fields(self) if f.name != "overrides"}
