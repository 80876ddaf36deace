"""One string that says which frozen backbone a model sits on.

Adapters trained on one backbone are meaningless on another, and averaging them across
sites with different backbones silently ruins the global model.  The coordinator sends
its fingerprint with every instruction and a site with another one refuses to train.

The fingerprint is ``<model name>|<weights>|arch=<digest>``: the weights part is the
provenance the backbone factory recorded (``sha256:<hex>`` of a local file or a hub
copy, ``tag:<tag>``), or ``random-init seed=<seed>`` for a randomly initialised
backbone; the architecture digest hashes every backbone tensor's name, shape and dtype,
so two configs that differ in depth or width never match.
"""

from __future__ import annotations

import hashlib

from torch import nn

from nearl_core.backbone import RANDOM_INIT_SEED


def architecture_digest(clip: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(clip.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
    return digest.hexdigest()[:16]


def backbone_fingerprint(clip: nn.Module, name: str, source: str) -> str:
    weights = f"random-init seed={RANDOM_INIT_SEED}" if source == "random-init" else source
    return f"{name}|{weights}|arch={architecture_digest(clip)}"


def model_fingerprint(model) -> str:
    """The fingerprint of a :class:`nearl_core.model.NearlCLIP`'s backbone."""
    return backbone_fingerprint(model.clip, model.backbone_name, model.backbone_source)
