"""Full fine-tuning: every weight of a private copy of the backbone trains.

    images ─► image tower (trainable) ─► normalise ┐
                                                   cos ─► logits
    class prompts ─► text tower (trainable) ───────┘

The upper reference of what adaptation can reach, and the lower reference of what it
costs: every round moves the whole model both ways.  The forward pass is zero-shot
CLIP's (through the same tower views, with the text context trimmed to the longest
prompt), so a fresh model is exactly zero-shot.  Every weight of both towers trains;
the logit scale (CLIP's temperature) stays frozen, as for every other method, so that
all methods are compared at the same scale (``is_adapter_param``).

Three consequences, each enforced:

* the model trains a deep copy of the backbone: the backbone object a process caches
  (a site's ``cached_backbone``, the simulation's shared one) must stay frozen for
  every other model built on it;
* it is refused above :data:`MAX_PARAMETERS` (50M): a round moves 8 bytes per parameter
  per site (download and upload, fp32), 400 MB at the limit and 1.2 GB for ViT-B-16's
  150M, and AdamW holds two more copies of the model in memory;
* it cannot train under DP-SGD (``nearl_core.config.FULL_FT_DP_REFUSAL``): per-sample
  gradients of open_clip's ``nn.MultiheadAttention`` would need Opacus to replace it,
  which changes the model's outputs.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
import torch.nn.functional as F

from nearl_core.backbone import Backbone
from nearl_core.config import NearlConfig
from nearl_core.errors import ConfigError
from nearl_core.methods.base import FrozenCLIP, NearlOutput

MAX_PARAMETERS = 50_000_000


class FullFineTuneCLIP(FrozenCLIP):
    """Zero-shot CLIP whose every backbone weight trains (on a private copy of the backbone)."""

    method = "full-ft"

    def __init__(self, backbone: Backbone, cfg: NearlConfig, classes: tuple[str, ...], *, any_size: bool = False):
        """``any_size``: skip the size limit (bench/methods.py times full fine-tuning of ViT-B-16)."""
        size = sum(p.numel() for p in backbone.clip.parameters())
        if size > MAX_PARAMETERS and not any_size:
            raise ConfigError(
                f"adapter.method full-ft trains all {size / 1e6:.1f}M weights of {backbone.name}, above the "
                f"{MAX_PARAMETERS / 1e6:g}M this project allows (each round would move {8 * size / 1e9:.2f} GB per "
                "site and AdamW keeps two more copies of the model); use lora or nearl for this backbone")
        super().__init__(replace(backbone, clip=copy.deepcopy(backbone.clip)), cfg, classes)

    def setup(self, backbone: Backbone) -> None:
        pass  # nothing to add: the rule makes every weight of the (copied) towers trainable

    def components(self) -> dict[str, int]:
        visual = sum(p.numel() for p in self.clip.visual.parameters())
        trainable = sum(p.numel() for p in self.adapter_parameters().values())
        return {"image_tower": visual, "text_tower": trainable - visual}

    def forward(self, images: torch.Tensor) -> NearlOutput:
        """images: (B, 3, H, W) preprocessed -> class logits (B, C)."""
        xv = self.vision.embed(images)
        for i in range(len(self.vision.blocks)):
            xv = self.vision.block(i, xv)
        image_emb = F.normalize(self.vision.head(xv), dim=-1)  # (B, E)
        xt = self.text.embed(self._prompts.tokens).unsqueeze(0)  # (1, S, T, D_t): text does not depend on images
        for j in range(len(self.text.blocks)):
            xt = self._text_block(j, xt)
        return self._output(self._logits(image_emb, self._class_embeddings(xt)[0]))
