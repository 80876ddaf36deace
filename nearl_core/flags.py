"""The command-line flags that set NEARL config values, shared by every command.

``nearl``, ``nearl-server``, ``nearl-client`` and ``simulation/run.py`` add these groups
and turn them into config overrides with :func:`config_overrides`, so a flag means the
same on every command: one ``--set`` grammar (:func:`parse_set`), one meaning of the DP
flags (:func:`dp_overrides`), one for personalization and the device.  The config schema
(:mod:`nearl_core.config`) stays the only place that names a key, its type and default.
This module imports neither torch nor Flower: the CLIs build their parsers from it at
start-up.
"""

from __future__ import annotations

import argparse
from collections.abc import Collection
from typing import Any

from nearl_core.errors import ConfigError

DEFAULT_CONFIG = "demo"
SET_HELP = ("override a NEARL config value (section.key=value, e.g. train.lr=0.001; a list comma-separated, "
            "e.g. task.classes=ct,mri){}; repeatable")


def add_config_flags(p: argparse.ArgumentParser, *, federation_keys: bool = False) -> None:
    """``--config``, ``--set`` and ``--pretrained``.

    ``--config`` defaults to None, which means the shipped demo config; a command that reads
    a site's folders then takes the class list from them unless ``--set task.classes=...``
    names it (:func:`classes_from_data`).
    """
    p.add_argument("--config", default=None,
                   help=f"NEARL config: a YAML file or a shipped name (demo, vit-b16); default {DEFAULT_CONFIG}")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=SET_HELP.format(" or a federation setting by its run-config key, e.g. server-lr=0.03"
                                        if federation_keys else ""))
    p.add_argument("--pretrained", default=None,
                   help="override model.pretrained: an open_clip tag, a local checkpoint file, or 'none'")


def add_dp_flags(p: argparse.ArgumentParser, what: str = "every site") -> argparse._ArgumentGroup:
    """``--dp-epsilon``, ``--dp-delta``, ``--dp-max-grad-norm`` (sample-level DP-SGD, Opacus)."""
    dp = p.add_argument_group("differential privacy (docs/privacy.md)")
    dp.add_argument("--dp-epsilon", type=float, default=None, metavar="E",
                    help=f"DP-SGD at {what} (adapters only), epsilon E over the whole job (privacy.target-epsilon); "
                         "a site's own ceiling (nearl-client --max-epsilon) can only lower it")
    dp.add_argument("--dp-delta", type=float, default=None, metavar="D",
                    help="sample-level delta (privacy.delta; default per site: min(1e-5, 1/(10 N)) for its N "
                         "training images); needs --dp-epsilon")
    dp.add_argument("--dp-max-grad-norm", type=float, default=None, metavar="C",
                    help="per-sample clipping bound (privacy.max-grad-norm); needs --dp-epsilon")
    return dp


def add_personalize_flags(p: argparse.ArgumentParser) -> None:
    """``--personalize`` and ``--finetune-epochs`` (the federation section of the config)."""
    p.add_argument("--personalize", default=None, metavar="PRESET|GROUPS",
                   help="adapter groups every site keeps to itself (federation.local): none, "
                        "all-but-useformer, or groups as `nearl params` lists them, e.g. oca-text,gates")
    p.add_argument("--finetune-epochs", type=int, default=None, metavar="E",
                   help="after the last round each site fine-tunes for E epochs on its own data and keeps "
                        "its personalized adapters in <state-dir>/personalized/ (federation.finetune-epochs)")


def add_device_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None,
                   help="train.device: auto (default: a GPU when there is one), cpu, cuda, cuda:N, mps")


def parse_set(items: list[str], federation_keys: Collection[str] = ()) -> tuple[dict[str, str], dict[str, str]]:
    """``--set`` items as (NEARL config overrides, federation settings), in one grammar.

    ``section.key=value`` is a NEARL config key (checked when the config is loaded); a key
    without a dot must be one of ``federation_keys`` (the run-config names of the
    federation settings, on the commands that run a federation).
    """
    nearl: dict[str, str] = {}
    federation: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item}: expected KEY=VALUE, e.g. --set train.lr=0.001")
        if "." in key:
            nearl[key] = value.strip()
        elif key in federation_keys:
            federation[key] = value.strip()
        elif federation_keys:
            raise ConfigError(f"--set {key}: not a NEARL config key (section.key) nor a federation setting; "
                              f"settings: {', '.join(sorted(federation_keys))}")
        else:
            raise ConfigError(f"--set {key}: not a NEARL config key; keys look like 'train.lr' or 'adapter.rank'")
    return nearl, federation


def dp_overrides(*, epsilon: float | None, delta: float | None = None,
                 max_grad_norm: float | None = None) -> dict[str, Any]:
    """The DP flags as config overrides, the same on every command.

    ``--dp-epsilon E`` turns sample-level DP-SGD on and plans the noise for epsilon E (any
    noise multiplier of the config file is cleared); ``--dp-delta`` and
    ``--dp-max-grad-norm`` refine it.  Without ``--dp-delta`` the delta stays unset, so each
    site applies the one rule, ``nearl_core.privacy.default_delta`` (min(1e-5, 1/(10 N))).
    """
    if epsilon is None:
        if delta is not None or max_grad_norm is not None:
            raise ConfigError("--dp-delta and --dp-max-grad-norm refine --dp-epsilon E: give it too")
        return {}
    out: dict[str, Any] = {"privacy.enabled": True, "privacy.target-epsilon": epsilon,
                           "privacy.noise-multiplier": None}
    if delta is not None:
        out["privacy.delta"] = delta
    if max_grad_norm is not None:
        out["privacy.max-grad-norm"] = max_grad_norm
    return out


# flag (argparse dest) -> the config key it sets, for the flags that set one key as they are
_DIRECT = (("pretrained", "model.pretrained"), ("device", "train.device"), ("epochs", "train.epochs"),
           ("seed", "train.seed"), ("personalize", "federation.local"),
           ("finetune_epochs", "federation.finetune-epochs"))


def config_overrides(args: argparse.Namespace, federation_keys: Collection[str] = ()) -> dict[str, Any]:
    """Every NEARL config override the parsed flags give: ``--set`` first, then the dedicated flags."""
    nearl, _ = parse_set(getattr(args, "overrides", []) or [], federation_keys)
    for flag, key in _DIRECT:
        if getattr(args, flag, None) is not None:
            nearl[key] = getattr(args, flag)
    nearl.update(dp_overrides(epsilon=getattr(args, "dp_epsilon", None), delta=getattr(args, "dp_delta", None),
                              max_grad_norm=getattr(args, "dp_max_grad_norm", None)))
    return nearl


def config_name(args: argparse.Namespace) -> str:
    return getattr(args, "config", None) or DEFAULT_CONFIG


def classes_from_data(args: argparse.Namespace) -> bool:
    """True when neither ``--config`` nor ``--set task.classes`` names the classes: take them from the folders."""
    named = any(item.partition("=")[0].strip() == "task.classes" for item in getattr(args, "overrides", []) or [])
    return getattr(args, "config", None) is None and not named
