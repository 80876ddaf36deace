"""Build the frozen open_clip backbone, with weights from a tag, a local file or nowhere.

Nothing here downloads unless the user asked for a pretrained tag; when a tag cannot be
fetched (no network, ``HF_HUB_OFFLINE=1``) we fail within seconds with a message that
says how to provide a local checkpoint file instead of letting a hub client retry for
minutes.  The project's tiny CLIP configs (random init, for tests and the demo) are
registered with open_clip's model registry so they are built by the same factory call.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import hashlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch
from torch import nn

from nearl_core.config import ModelConfig
from nearl_core.errors import BackboneError

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
HUB_HOST = ("huggingface.co", 443)
# Random init is seeded: every process of a federation (server, each site, each Ray
# worker) must build the *same* frozen backbone, or adapters trained at one site would
# be meaningless at another.
RANDOM_INIT_SEED = 0


@dataclass
class Backbone:
    """A frozen CLIP with its image transform, tokenizer and weight provenance."""

    clip: nn.Module
    preprocess: Callable[[Any], torch.Tensor]
    tokenizer: Callable[..., torch.Tensor]
    name: str
    source: str  # "random-init", "tag:<tag>" or "sha256:<hex>" of the local file


@functools.cache
def register_shipped_configs() -> None:
    """Make ``nearl-tiny`` and friends known to ``open_clip.create_model``."""
    open_clip.add_model_config(MODEL_CONFIG_DIR)


def build_backbone(cfg: ModelConfig) -> Backbone:
    """One factory call: model + eval transform + tokenizer, all weights frozen."""
    register_shipped_configs()
    pretrained, source = _resolve_weights(cfg)
    try:
        with _quiet_random_init(pretrained is None), torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)  # weights not in a checkpoint are the same in every process
            clip, _, preprocess = open_clip.create_model_and_transforms(cfg.name, pretrained=pretrained)
    except (RuntimeError, AssertionError, KeyError, ValueError) as err:
        if pretrained and Path(pretrained).is_file():
            raise BackboneError(
                f"checkpoint {pretrained} does not fit model '{cfg.name}' ({(str(err).splitlines() or [type(err).__name__])[0][:160]}); "
                "check model.name matches the file"
            ) from None
        raise
    tokenizer = open_clip.get_tokenizer(cfg.name)
    freeze(clip)
    return Backbone(clip=clip, preprocess=preprocess, tokenizer=tokenizer, name=cfg.name, source=source)


@contextlib.contextmanager
def _quiet_random_init(active: bool):
    """open_clip warns that no weights were loaded; for random init that is what was asked."""
    previous = logging.root.manager.disable
    if active:
        logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def freeze(module: nn.Module) -> None:
    """Frozen means: no gradients and eval mode (no dropout, no patch dropout)."""
    for p in module.parameters():
        p.requires_grad_(False)
    module.eval()


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _resolve_weights(cfg: ModelConfig) -> tuple[str | None, str]:
    """Return (argument for open_clip, provenance string) or raise a readable error."""
    name, pretrained = cfg.name, cfg.pretrained
    if name.startswith(("hf-hub:", "local-dir:")):
        if name.startswith("hf-hub:"):
            _require_hub(f"model '{name}'", "use 'local-dir:/path/to/folder' with the model's files instead")
        return None, name
    if name not in open_clip.list_models():
        raise BackboneError(
            f"unknown open_clip model '{name}'; see open_clip.list_models() for names (e.g. ViT-B-16, nearl-tiny)"
        )
    if pretrained is None:
        return None, "random-init"
    path = Path(pretrained).expanduser()
    if path.is_file():
        return str(path), f"sha256:{file_sha256(path)}"
    if _looks_like_path(pretrained):
        raise BackboneError(f"checkpoint file {pretrained} not found; fix model.pretrained or pass --pretrained FILE")
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        raise BackboneError(
            f"model '{name}' has no pretrained tag '{pretrained}'; known tags: {', '.join(tags) or 'none'}"
        )
    if not _tag_is_cached(name, pretrained):
        _require_hub(
            f"pretrained weights '{name}/{pretrained}'",
            f"download them on a connected machine and set model.pretrained to the local file "
            f"(or pass --pretrained /path/to/{name}-{pretrained}.bin)",
        )
    return pretrained, f"tag:{pretrained}"


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt"))


def _tag_is_cached(name: str, tag: str) -> bool:
    """True when the hub cache already holds the file, so no network is needed."""
    pcfg = open_clip.get_pretrained_cfg(name, tag)
    hub = pcfg.get("hf_hub", "")
    if not hub:
        return False
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub ships with open_clip
        return False
    repo, filename = os.path.split(hub.rstrip("/"))
    candidates = [filename] if filename else []
    candidates += ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    return any(isinstance(try_to_load_from_cache(repo, f), str) for f in candidates if f)


def _require_hub(what: str, remedy: str, timeout: float = 3.0) -> None:
    """Fail fast and clearly when the model hub is unreachable."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise BackboneError(f"cannot download {what}: HF_HUB_OFFLINE is set; {remedy}")
    try:
        socket.create_connection(HUB_HOST, timeout=timeout).close()
    except OSError as err:
        raise BackboneError(f"cannot download {what}: {HUB_HOST[0]} unreachable ({err}); {remedy}") from None
