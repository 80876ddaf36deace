"""Linear probe: a linear classifier on the frozen, normalised image feature.

    images ─► frozen image tower ─► normalise ─► W f + b ─► x logit scale ─► logits

The classic way to measure what a frozen CLIP's image features hold (Radford et al.,
"Learning Transferable Visual Models From Natural Language Supervision", ICML 2021,
arXiv 2103.00020, trains logistic regression on them).  Here the weight starts as the
zero-shot classifier, the template-averaged class text embeddings, and the bias at zero,
as WiSE-FT initialises its head (Wortsman et al., "Robust fine-tuning of zero-shot
models", CVPR 2022, arXiv 2109.01903): a fresh probe computes exactly the zero-shot
logits, and training starts from CLIP's prior rather than from chance.  The text tower
is used once, at construction; training never runs it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nearl_core.backbone import Backbone
from nearl_core.methods.base import FrozenCLIP, NearlOutput, frozen_image_features


class LinearProbeAdapters(nn.Module):
    """The probe: one (C, E) weight and a (C,) bias, as an ``nn.Linear`` (Opacus samples it per example)."""

    def __init__(self, class_embeddings: torch.Tensor):
        super().__init__()
        classes, width = class_embeddings.shape
        self.head = nn.Linear(width, classes)
        with torch.no_grad():
            self.head.weight.copy_(class_embeddings)
            self.head.bias.zero_()


class LinearProbeCLIP(FrozenCLIP):
    """A frozen CLIP whose class scores come from a trainable linear layer on the image feature."""

    method = "linear-probe"

    def setup(self, backbone: Backbone) -> None:
        self.adapters = LinearProbeAdapters(self.zero_shot_classifier())

    def dimensions(self) -> dict:
        classes, width = self.adapters.head.weight.shape
        return {"classes": classes, "embed_width": width, **super().dimensions()}

    def forward(self, images: torch.Tensor) -> NearlOutput:
        """images: (B, 3, H, W) preprocessed -> class logits (B, C)."""
        image_emb = F.normalize(frozen_image_features(self, images), dim=-1)  # (B, E)
        return self._output(self._bias(self._scale() * self.adapters.head(image_emb)))
