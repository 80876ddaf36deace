"""Personalization: which adapter groups stay at each site, and the site's own copy of them.

A federation's ``federation.local`` names adapter *groups* (as ``nearl params`` lists
them: ``useformer``, ``oca-vision``, ``oca-text``, ``gates`` for NEARL; the method's own
parts for the baselines) or a preset (``none``, ``all-but-useformer``).  One rule,
:func:`local_names`, then decides what crosses the wire (every other adapter tensor):
the shared schema drives the coordinator's global adapters, every instruction, every reply and the site's egress
check, so a local group never leaves the site.  The site keeps its local groups in its
state dir between rounds (and restarts); after the last round it fine-tunes for
``federation.finetune-epochs`` and writes its personalized adapters
(``<state-dir>/personalized/``, the ordinary adapter file format).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from nearl_core.errors import ConfigError

if TYPE_CHECKING:  # the CLIs import this module for their flags: no torch at start-up
    from nearl_core.config import NearlConfig
    from nearl_core.methods.base import FrozenCLIP

LOCAL_DIR = "local"  # <state-dir>/local/: the site's adapters after its latest round (local groups read back)
PERSONALIZED_DIR = "personalized"  # <state-dir>/personalized/: the site's final personalized adapters
PRESETS: dict[str, Callable[[list[str]], list[str]]] = {
    "none": lambda groups: [],
    "all-but-useformer": lambda groups: [g for g in groups if g != "useformer"],
}
ALIASES = {"queries": "useformer"}  # NEARL's query tokens belong to the USEformer (as nearl params counts them)
CROSS_GROUPS: dict[str, Callable[[str], bool]] = {
    "gates": lambda name: ".gate." in f".{name}.",  # every OCA's scalar gate, in both towers
}


def group_of(name: str) -> str:
    """The group of an adapter tensor (wire name): its first part, kebab-case."""
    head = name.split(".", 1)[0]
    return ALIASES.get(head, head).replace("_", "-")


def adapter_groups(model: FrozenCLIP) -> dict[str, list[str]]:
    """group -> adapter tensor names, the method's parts first, then the cross-cutting groups that match."""
    names = list(model.adapter_parameters())
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(group_of(name), []).append(name)
    for group, rule in CROSS_GROUPS.items():
        members = [n for n in names if rule(n)]
        if members:
            groups[group] = members
    return groups


def local_names(model: FrozenCLIP) -> frozenset[str]:
    """The adapter tensors the model's config keeps at the site (``federation.local``); checked."""
    spec = [s for s in model.cfg.federation.local if s]
    if not spec:
        return frozenset()
    groups = adapter_groups(model)
    chosen: list[str] = []
    for item in spec:
        if item in PRESETS:
            chosen += PRESETS[item]([g for g in groups if g not in CROSS_GROUPS])
        elif item in groups:
            chosen.append(item)
        else:
            raise ConfigError(f"federation.local: '{item}' is not an adapter group of {model.method}; groups: "
                              f"{', '.join(groups)}; presets: {', '.join(PRESETS)}")
    local = frozenset(n for g in chosen for n in groups[g])
    if len(local) == len(model.adapter_parameters()):
        raise ConfigError("federation.local keeps every adapter group at the sites, so nothing would be "
                          "federated; leave at least one group shared (e.g. useformer)")
    return local


def is_personalized(model: FrozenCLIP) -> bool:
    """Whether a site ends the federation with adapters of its own (local groups or fine-tuning)."""
    return bool(local_names(model)) or model.cfg.federation.finetune_epochs > 0


def wants_personalization(cfg: NearlConfig) -> bool:
    """The config-level view of :func:`is_personalized` (no model needed)."""
    return any(s and s != "none" for s in cfg.federation.local) or cfg.federation.finetune_epochs > 0


def config_digest(cfg_dict: dict[str, Any]) -> str:
    """Identifies a federation's config: local groups saved under another config are not reused."""
    return hashlib.sha256(json.dumps(cfg_dict, sort_keys=True).encode()).hexdigest()[:16]


def state_dirs(state_dir: Path) -> tuple[Path, Path]:
    """(<state-dir>/local, <state-dir>/personalized)."""
    return state_dir / LOCAL_DIR, state_dir / PERSONALIZED_DIR
