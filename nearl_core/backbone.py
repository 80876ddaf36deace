"""Build the frozen open_clip backbone, with weights from a tag, a local file or folder, or nowhere.

Nothing here downloads unless the user asked for a pretrained tag or a hub model; when
it cannot be fetched (no network, ``HF_HUB_OFFLINE=1``) we fail within seconds with a
message that says how to provide local files instead of letting a hub client retry for
minutes.  The project's tiny CLIP configs (random init, for tests and the demo) are
registered with open_clip's model registry so they are built by the same factory call.

Hub models with a Hugging Face text tower (BiomedCLIP) need four kinds of files: the
open_clip config, the CLIP weights, the text encoder's ``config.json`` and its tokenizer.
A site without internet keeps ``model.name: hf-hub:<repo>`` (so that adapters stay
comparable across sites) and sets ``model.pretrained`` to a folder holding all four; see
docs/architecture.md.  Hugging Face parts of shipped configs live in folders under
``model_configs/`` and are found from the package, never from the hub.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from nearl_core.config import ModelConfig
from nearl_core.errors import BackboneError


def _open_clip():
    """open_clip, imported on first use rather than with this module.

    Importing open_clip takes torchvision (and through it ``torch._dynamo``) and, when it
    is installed, transformers: about 2.5 s and 200 MiB on a 2-core CPU.  A Flower
    ClientApp process imports this module before any message arrives, and not every
    message builds a backbone, so the cost is paid where a model is built.
    """
    import open_clip

    return open_clip

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
HUB_HOST = ("huggingface.co", 443)
# Random init is seeded: every process of a federation (server, each site, each Ray
# worker) must build the *same* frozen backbone, or adapters trained at one site would
# be meaningless at another.
RANDOM_INIT_SEED = 0
# The weights file open_clip takes from a model folder, in open_clip's order of preference
# (the same order as its hub download: safetensors first).
FOLDER_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                  "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth")
HUB_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")
FOLDER_HELP = "see 'BiomedCLIP without internet' in docs/architecture.md"


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
    """Make ``nearl-tiny`` and friends known to ``open_clip.create_model`` (once per process).

    A shipped config may name a Hugging Face text encoder by a folder relative to
    ``model_configs/`` (e.g. ``hf/nearl-tiny-bert``: ``config.json`` + tokenizer files).
    open_clip would take that for a hub repository, so the registered copy carries the
    absolute path of this installation; it is written once to a content-addressed
    folder under the temp dir, which every process (Ray workers included) can share.
    """
    _register_tiny_timm_vit()
    configs = {}
    for path in sorted(MODEL_CONFIG_DIR.glob("*.json")):
        model_cfg = json.loads(path.read_text())
        text_cfg = model_cfg.get("text_cfg", {})
        for key in ("hf_model_name", "hf_tokenizer_name"):
            if text_cfg.get(key) and (MODEL_CONFIG_DIR / text_cfg[key]).is_dir():
                text_cfg[key] = str(MODEL_CONFIG_DIR / text_cfg[key])
        configs[path.name] = json.dumps(model_cfg, indent=2, sort_keys=True)
    digest = hashlib.sha256(json.dumps(configs, sort_keys=True).encode()).hexdigest()[:16]
    target = Path(tempfile.gettempdir()) / f"nearl-model-configs-{digest}"
    target.mkdir(parents=True, exist_ok=True)
    for name, text in configs.items():
        if not (target / name).is_file() or (target / name).read_text() != text:
            partial = target / f".{name}.{os.getpid()}.tmp"
            partial.write_text(text)
            os.replace(partial, target / name)  # atomic: a concurrent reader sees old or new, never half
    _open_clip().add_model_config(target)


def _register_tiny_timm_vit() -> None:
    """``nearl_tiny_vit``: a timm ViT shaped like ``vit_base_patch16_224`` (class token, token
    pooling, no fc_norm) but tiny, for the timm-tower tests.  open_clip cannot pass sizes
    to timm, so the test trunk must be a registered timm model name."""
    import timm
    from timm.models import build_model_with_cfg, register_model
    from timm.models.vision_transformer import VisionTransformer

    if "nearl_tiny_vit" in timm.list_models("nearl_tiny_vit"):
        return

    def nearl_tiny_vit(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
        args = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, mlp_ratio=2.0)
        kwargs["pretrained_cfg"] = kwargs.get("pretrained_cfg") or {"input_size": (3, 32, 32), "num_classes": 0}
        return build_model_with_cfg(VisionTransformer, "nearl_tiny_vit", pretrained, **dict(args, **kwargs))

    register_model(nearl_tiny_vit)


def build_backbone(cfg: ModelConfig) -> Backbone:
    """One factory call: model + eval transform + tokenizer, all weights frozen."""
    register_shipped_configs()
    folder = _model_folder(cfg)
    extra: dict[str, Any] = {}
    if folder is not None:  # hf-hub model from a local copy, or a local-dir: name
        text_cfg, weights = _check_model_folder(folder)
        oc_name, pretrained = f"local-dir:{folder}", None
        source = cfg.name if cfg.name.startswith("local-dir:") else f"sha256:{file_sha256(weights)}"
        if text_cfg is not None:  # the HF encoder's config.json and tokenizer come from the folder too
            extra["text_cfg"] = {**text_cfg, "hf_model_name": str(folder), "hf_tokenizer_name": str(folder),
                                 "hf_model_pretrained": False}
    else:
        pretrained, source = _resolve_weights(cfg)
        oc_name, weights = cfg.name, (Path(pretrained) if pretrained and Path(pretrained).is_file() else None)
    try:
        with _quiet_random_init(pretrained is None and folder is None), torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)  # weights not in a checkpoint are the same in every process
            # pretrained_text=False: a Hugging Face text tower never fetches base weights on its own;
            # its weights come from the CLIP checkpoint, or it is randomly initialised like the rest.
            clip, _, preprocess = _open_clip().create_model_and_transforms(
                oc_name, pretrained=pretrained, pretrained_text=False, **extra
            )
    except (RuntimeError, AssertionError, KeyError, ValueError) as err:
        if weights is not None:
            raise BackboneError(
                f"checkpoint {weights} does not fit model '{cfg.name}' ({(str(err).splitlines() or [type(err).__name__])[0][:160]}); "
                "check model.name matches the file"
            ) from None
        raise
    tokenizer = _open_clip().get_tokenizer(oc_name)
    if cfg.name.startswith("hf-hub:") and folder is None:
        source = _hub_weights_source(cfg.name[len("hf-hub:"):])
    freeze(clip)
    return Backbone(clip=clip, preprocess=preprocess, tokenizer=tokenizer, name=cfg.name, source=source)


def _model_folder(cfg: ModelConfig) -> Path | None:
    """The local folder holding the whole model, if the config points at one."""
    if cfg.name.startswith("local-dir:"):
        return Path(cfg.name[len("local-dir:"):]).expanduser()
    if cfg.pretrained is None or not Path(cfg.pretrained).expanduser().is_dir():
        return None
    if not cfg.name.startswith("hf-hub:"):
        raise BackboneError(
            f"model.pretrained {cfg.pretrained} is a folder; for '{cfg.name}' give the checkpoint file itself "
            "(folders hold whole hf-hub: models)"
        )
    return Path(cfg.pretrained).expanduser()


def _check_model_folder(folder: Path) -> tuple[dict | None, Path]:
    """Fail in one line, before building anything, when a model folder lacks a file.

    Returns the open_clip text config when the text tower is a Hugging Face encoder
    (None otherwise) and the weights file open_clip will load.
    """
    if not folder.is_dir():
        raise BackboneError(f"model folder {folder} not found; fix model.pretrained ({FOLDER_HELP})")
    config_path = folder / "open_clip_config.json"
    if not config_path.is_file():
        raise BackboneError(f"model folder {folder} has no open_clip_config.json; copy it from the model's hub "
                            f"repository ({FOLDER_HELP})")
    try:
        model_cfg = json.loads(config_path.read_text())["model_cfg"]
        text_cfg = dict(model_cfg.get("text_cfg", {}))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise BackboneError(f"{config_path} is not an open_clip config (no 'model_cfg' section); "
                            "copy open_clip_config.json from the model's hub repository again") from None
    missing = []
    weights = next((folder / f for f in FOLDER_WEIGHTS if (folder / f).is_file()), None)
    if weights is None:
        missing.append("the CLIP weights (open_clip_model.safetensors or open_clip_pytorch_model.bin)")
    hf_name = text_cfg.get("hf_model_name")
    if hf_name:
        if not (folder / "config.json").is_file():
            missing.append(f"config.json (the text encoder's config, from {hf_name})")
        if not any((folder / f).is_file() for f in TOKENIZER_FILES):
            missing.append(f"the tokenizer (tokenizer.json or vocab.txt, from {text_cfg.get('hf_tokenizer_name') or hf_name})")
    if missing:
        raise BackboneError(f"model folder {folder} lacks {'; '.join(missing)}; add them ({FOLDER_HELP})")
    return (text_cfg if hf_name else None), weights


def _hub_weights_source(model_id: str) -> str:
    """sha256 of the weights file open_clip took from the hub cache: the same string a site
    gets from a local copy of that file, so online and offline sites agree on provenance."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub ships with open_clip
        return f"hf-hub:{model_id}"
    for filename in HUB_WEIGHTS:
        path = try_to_load_from_cache(model_id, filename)
        if isinstance(path, str):
            return f"sha256:{file_sha256(path)}"
    return f"hf-hub:{model_id}"


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
    if name.startswith("hf-hub:"):
        _require_hub(f"model '{name}'", f"set model.pretrained to a local folder with the model's files ({FOLDER_HELP})")
        return None, name
    if name not in _open_clip().list_models():
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
    tags = _open_clip().list_pretrained_tags_by_model(name)
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
    pcfg = _open_clip().get_pretrained_cfg(name, tag)
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
