"""One configuration object for a NEARL job.

A YAML file (kebab-case keys, grouped in sections) is loaded into frozen dataclasses
and validated once, so that every later layer (model factory, data, training, the
Flower apps) receives the whole object and never re-parses strings.  Flower's run
config uses flattened keys such as ``train.lr`` or ``adapter.rank``; the same mapping
applies through :func:`apply_overrides`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

import yaml

from nearl_core.config_checks import (ACCOUNTANTS, COOP_INIT, FULL_FT_DP_REFUSAL, LOSSES, METHODS, SCHEDULES,  # noqa: F401
                                       TEXT_CONDITIONING, validate)
from nearl_core.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
# Optional numbers: None (or "none" / "" in YAML and run config) means "not set".
_OPTIONAL_FLOATS = ("target_epsilon", "noise_multiplier", "delta", "max_epsilon")


@dataclass(frozen=True)
class ModelConfig:
    """Which open_clip CLIP to adapt and where its weights come from."""

    name: str = "nearl-tiny"
    # None/"none": random init; an open_clip tag such as "openai"; or a local file path.
    pretrained: str | None = None


@dataclass(frozen=True)
class AdapterConfig:
    """Which method trains what: NEARL's dimensions (docs/architecture.md; the defaults give 1.449M on
    ViT-B-16, budget 1.46M) and the baselines' own settings (docs/methods.md).  Each method reads only
    its own keys, so one config file serves a whole comparison with ``--set adapter.method=...``."""

    method: str = "nearl"  # nearl | coop | clip-adapter | lora | linear-probe | full-ft
    queries: int = 16  # M learnable synergy query tokens
    width: int = 32  # d, width of the USEformer
    rank: int = 24  # r, OCA bottleneck
    heads: int = 4  # attention heads in the USEformer and in every OCA
    mlp_ratio: float = 2.0  # USEformer MLP hidden = mlp_ratio * d
    text_conditioning: str = "per-image"  # or "shared"
    ortho_lambda: float = 0.0  # weight of the orthogonal regulariser
    eps: float = 1e-6  # Gram-Schmidt denominator guard
    coop_tokens: int = 16  # coop: learnable context vectors before the class name, shared by all classes
    coop_init: str = "random"  # coop: random (CoOp's N(0, 0.02)) or template (the first template's words)
    clip_adapter_reduction: int = 4  # clip-adapter: bottleneck width = embedding width / reduction
    clip_adapter_ratio: float = 0.2  # clip-adapter: residual ratio (share of the adapted feature)
    lora_rank: int = 8  # lora: rank of each update of the attention projections
    lora_alpha: float = 8.0  # lora: updates are scaled by alpha / rank


@dataclass(frozen=True)
class TaskConfig:
    """Class names and prompt templates; classes may come from the data folder."""

    classes: tuple[str, ...] = ()
    templates: tuple[str, ...] = ("a {modality} image showing {class}.",)
    modality: str = "medical"

    def prompts(self, classes: tuple[str, ...] | None = None) -> list[list[str]]:
        """Prompts per class: ``result[c][p]`` is template p filled with class c."""
        names = classes if classes is not None else self.classes
        return [
            [t.replace("{class}", c.replace("_", " ")).replace("{modality}", self.modality) for t in self.templates]
            for c in names
        ]


@dataclass(frozen=True)
class TrainConfig:
    """Local optimisation: used by ``nearl train`` and by every site each round."""

    epochs: int = 3
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 1e-4
    warmup_frac: float = 0.1
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | mps
    num_workers: int = 0  # 0 on CPU; the loader uses workers + pinned memory on CUDA
    amp: bool = True  # bf16 autocast on CUDA only
    # Memory options, off by default (the plain path).  checkpoint-backbone: keep only each
    # frozen block's input and recompute its activations in the backward pass (less
    # memory, a slower step; same gradients).  micro-batch: run each batch in chunks of
    # this many images and accumulate the gradients (the same loss and gradients as the
    # whole batch up to float rounding; under DP-SGD still clipped per sample, noised
    # once per batch); 0 = the whole batch at once.
    checkpoint_backbone: bool = False
    micro_batch: int = 0
    # Federated training (docs/federation.md, "Choosing the defaults"): schedule "round"
    # restarts warm-up + cosine inside every round, "federation" runs one schedule over all
    # rounds; loss "ce", "logit-adjusted" (tau * log prior added in training) or "balanced"
    # (class-balanced weights), both from the site's own label counts; keep-optimizer: a
    # site carries its AdamW moments from round to round (in its state dir; not under DP).
    schedule: str = "round"
    loss: str = "ce"
    logit_tau: float = 1.0
    keep_optimizer: bool = False


@dataclass(frozen=True)
class PrivacyConfig:
    """Sample-level DP-SGD at one site (Opacus, adapters only); see docs/privacy.md."""

    enabled: bool = False
    target_epsilon: float | None = None  # plan the noise once for this epsilon over all planned steps
    noise_multiplier: float | None = None  # or give the noise multiplier directly
    max_grad_norm: float = 1.0  # per-sample clipping bound C
    delta: float | None = None  # None: min(1e-5, 1 / (10 N)), N = the site's training images
    accountant: str = "rdp"  # rdp | prv
    max_epsilon: float | None = None  # the site's hard ceiling; None: target-epsilon (or no ceiling)


@dataclass(frozen=True)
class FederationConfig:
    """What each site keeps for itself (docs/federation.md, "Personalization").

    ``local``: adapter groups that never leave the site (``nearl params`` lists them) or a
    preset (``none``, ``all-but-useformer``); a run-config override may give them comma-separated.
    ``finetune-epochs``: after the last round each site fine-tunes the received adapters
    on its own data for this many epochs and keeps the result as its personalized model.
    """

    local: tuple[str, ...] = ()
    finetune_epochs: int = 0


@dataclass(frozen=True)
class NearlConfig:
    """The whole job: passed as one object to every layer."""

    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Kebab-case nested dict, the same shape as the YAML file."""
        out: dict[str, dict[str, Any]] = {}
        for section in fields(self):
            values = dataclasses.asdict(getattr(self, section.name))
            out[section.name] = {k.replace("_", "-"): (list(v) if isinstance(v, tuple) else v) for k, v in values.items()}
        return out

    def flat(self) -> dict[str, Any]:
        """``section.key`` -> value, e.g. for MLflow params or Flower run config."""
        return {f"{s}.{k}": v for s, vals in self.to_dict().items() for k, v in vals.items()}

    def with_classes(self, classes: tuple[str, ...]) -> "NearlConfig":
        return replace(self, task=replace(self.task, classes=tuple(classes)))


def dump_config(cfg: NearlConfig) -> str:
    """The config as YAML text, the same shape as a config file (and what :func:`config_sha256` hashes)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def config_sha256(cfg: NearlConfig) -> str:
    """One name for a resolved config: recorded in MLflow, comparable between the two engines."""
    return hashlib.sha256(dump_config(cfg).encode()).hexdigest()


def write_config(cfg: NearlConfig, path: Path) -> Path:
    """Write the resolved config for the ServerApp (and the record): loading it gives the same config."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_config(cfg))
    return path


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A file path, or the name of a shipped config such as ``demo`` or ``vit-b16``."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config '{name_or_path}' not found: give a YAML file path or one of: {known}")


def load_config(name_or_path: str | Path = "demo", overrides: Mapping[str, Any] | None = None) -> NearlConfig:
    """Read a YAML config (path or shipped name), apply ``section.key`` overrides, validate."""
    path = resolve_config_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        first = str(err).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML ({first}); fix the file") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected sections model/adapter/task/train/privacy/federation at top level")
    cfg = from_dict(raw, source=str(path))
    return apply_overrides(cfg, overrides or {})


def from_dict(raw: Mapping[str, Any], source: str = "config") -> NearlConfig:
    """Build and validate a config from a nested kebab-case mapping."""
    sections = {f.name: f.type for f in fields(NearlConfig)}
    unknown = set(raw) - set(sections)
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {sorted(unknown)}; allowed: {sorted(sections)}")
    built = {}
    for f in fields(NearlConfig):
        cls = f.default_factory().__class__  # type: ignore[misc]
        built[f.name] = _section(cls, raw.get(f.name) or {}, f"{source}: {f.name}")
    cfg = NearlConfig(**built)
    validate(cfg, source)
    return cfg


def apply_overrides(cfg: NearlConfig, overrides: Mapping[str, Any]) -> NearlConfig:
    """Apply flattened ``section.key=value`` overrides (kebab or snake case)."""
    if not overrides:
        return cfg
    nested = cfg.to_dict()
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        name = name.replace("_", "-")
        if section not in nested or name not in nested[section]:
            raise ConfigError(f"unknown config key '{key}'; keys look like 'train.lr' or 'adapter.rank'")
        nested[section][name] = value
    return from_dict(nested, source="overrides")


def _section(cls: type, values: Mapping[str, Any], where: str) -> Any:
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where}: expected a mapping of keys, got {type(values).__name__}")
    names = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in values.items():
        attr = str(key).replace("-", "_")
        if attr not in names:
            allowed = ", ".join(n.replace("_", "-") for n in names)
            raise ConfigError(f"{where}: unknown key '{key}'; allowed: {allowed}")
        kwargs[attr] = _coerce(value, names[attr], f"{where}.{key}")
    return cls(**kwargs)


def _coerce(value: Any, f: dataclasses.Field, where: str) -> Any:
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    if isinstance(default, tuple):
        if isinstance(value, str):  # a list in a flag is comma-separated; a template may hold commas itself
            value = [value] if f.name == "templates" else [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(str(v) for v in value)
    if f.name == "pretrained":
        return None if value in (None, "", "none", "None") else str(value)
    if f.name in _OPTIONAL_FLOATS:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
            return None
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number or none, got {value!r}") from None
    if isinstance(default, bool):
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    try:
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if isinstance(default, float):
            return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected a {type(default).__name__}, got {value!r}") from None
    return str(value)
