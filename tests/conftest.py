"""Shared fixtures: tiny registered CLIP configs, random init, generated data; no downloads."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest
import torch

from nearl_core.backbone import build_backbone
from nearl_core.config import NearlConfig, from_dict, load_config
from nearl_core.demo_data import generate_demo_data
from nearl_core.model import NearlCLIP, build_model

CLASSES = ("normal", "nodule", "opacity")
TINY_MODELS = ("nearl-tiny", "nearl-tiny-deep-text")  # equal depths; unequal depths and widths
MODES = ("per-image", "shared")


def tiny_config(name: str = "nearl-tiny", mode: str = "per-image", **sections) -> NearlConfig:
    raw = load_config("demo").to_dict()
    raw["model"]["name"] = name
    raw["adapter"]["text-conditioning"] = mode
    for section, values in sections.items():
        raw[section].update(values)
    return from_dict(raw)


def tiny_model(name: str = "nearl-tiny", mode: str = "per-image", seed: int = 0, **sections) -> NearlCLIP:
    torch.manual_seed(seed)
    cfg = tiny_config(name, mode, **sections)
    return build_model(cfg, CLASSES, backbone=build_backbone(cfg.model))


def randomize_adapters(model: NearlCLIP, std: float = 0.2, seed: int = 1) -> None:
    """Move adapters away from zero-init so that updates are non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapters.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def images_for(model: NearlCLIP, batch: int, seed: int = 0) -> torch.Tensor:
    size = model.clip.visual.image_size
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """Two small synthetic sites, generated once per test session."""
    root = tmp_path_factory.mktemp("demo")
    generate_demo_data(root, 2, train_per_site=48, val_per_site=12, test_per_site=12, seed=0)
    return root
