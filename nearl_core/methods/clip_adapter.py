"""CLIP-Adapter: a residual bottleneck MLP on the frozen image feature.

    images ─► frozen image tower ─► f ─► a·A(f) + (1 − a)·f ─► normalise ┐
                                                                          cos ─► logits
    class prompts ─► frozen text tower (once, at construction) ───────────┘

Gao et al., "CLIP-Adapter: Better Vision-Language Models with Feature Adapters", IJCV
2024 (arXiv 2110.04544).  A = Linear(E, E/4) → ReLU → Linear(E/4, E), both without
bias, and the residual ratio a (``adapter.clip-adapter-ratio``, 0.2 as in the paper for
most data sets) mixes the adapted and the original feature.

Two choices of ours, both so that a fresh model is exactly zero-shot CLIP and still
learns: the second linear layer starts at zero, so A(f) = 0 and the feature is
(1 − a)·f, whose direction, and so every cosine logit, is f's; and the paper's ReLU after
the second layer is dropped, because at zero-init it would pass no gradient to that
layer (ReLU'(0) = 0 in PyTorch) and the adapter would never move.  The class embeddings
are the frozen zero-shot classifier, computed once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nearl_core.backbone import Backbone
from nearl_core.methods.base import FrozenCLIP, NearlOutput, frozen_image_features


class FeatureAdapter(nn.Module):
    """A(f) = W_up ReLU(W_down f); W_up starts at zero."""

    def __init__(self, width: int, reduction: int):
        super().__init__()
        hidden = max(1, width // reduction)
        self.down = nn.Linear(width, hidden, bias=False)
        self.up = nn.Linear(hidden, width, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.up(F.relu(self.down(f)))


class CLIPAdapterAdapters(nn.Module):
    def __init__(self, width: int, reduction: int):
        super().__init__()
        self.image = FeatureAdapter(width, reduction)


class CLIPAdapterCLIP(FrozenCLIP):
    """A frozen CLIP with CLIP-Adapter on the image feature and the frozen zero-shot classifier."""

    method = "clip-adapter"

    def setup(self, backbone: Backbone) -> None:
        classifier = self.zero_shot_classifier()  # (C, E)
        self.register_buffer("classifier", classifier, persistent=False)
        self.ratio = self.cfg.adapter.clip_adapter_ratio
        self.adapters = CLIPAdapterAdapters(classifier.shape[-1], self.cfg.adapter.clip_adapter_reduction)

    def dimensions(self) -> dict:
        a = self.adapters.image
        return {"embed_width": a.down.in_features, "bottleneck": a.down.out_features, "ratio": self.ratio,
                **super().dimensions()}

    def forward(self, images: torch.Tensor) -> NearlOutput:
        """images: (B, 3, H, W) preprocessed -> class logits (B, C)."""
        f = frozen_image_features(self, images)  # (B, E), unnormalised as in the paper
        adapted = self.ratio * self.adapters.image(f) + (1 - self.ratio) * f
        return self._output(self._logits(F.normalize(adapted, dim=-1), self.classifier))
