"""What every method shares: a frozen open_clip CLIP bound to class prompts, and the rule of what trains.

NEARL (nearl_core/model.py) and the baselines it is measured against (this package)
differ only in the parameters they add and in how logits come out of the frozen
towers.  Everything else (class prompts, trimmed text context, the zero-shot
reference, keeping the backbone in eval mode, moving prompt tensors between devices)
lives here once, so that a comparison measures the methods and not their plumbing.

The one rule, :func:`is_adapter_param`, decides what a method trains, as peft does:
a parameter is trainable iff its name starts with the method's prefix, ``adapters.``
for every method that adds parameters and ``clip.`` for full fine-tuning, which adds
none (its logit scale and bias excepted: the temperature stays CLIP's for every method,
so that all of them are compared at the same scale).  The rule drives freezing (here,
once, after a method has built its parts), what the optimiser sees, what is saved in an
adapter file and loaded from it, the wire schema of a federation and what may leave a
site.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nearl_core.backbone import Backbone
from nearl_core.config import NearlConfig
from nearl_core.errors import ConfigError
from nearl_core.towers import TextInputs, towers_of

ADAPTER_PREFIX = "adapters."
BACKBONE_PREFIX = "clip."
_PREFIX_OF_METHOD = {"full-ft": BACKBONE_PREFIX}  # every other method: ADAPTER_PREFIX
FROZEN_SCALARS = ("clip.logit_scale", "clip.logit_bias")  # CLIP's temperature (and SigLIP's bias)


def trainable_prefix(method: str = "nearl") -> str:
    """Where a method's trainable parameters live: ``adapters.``, or ``clip.`` for full fine-tuning."""
    return _PREFIX_OF_METHOD.get(method, ADAPTER_PREFIX)


def is_adapter_param(name: str, method: str = "nearl") -> bool:
    """The one rule for what a method trains: it drives freezing, saving, loading and egress."""
    return name.startswith(trainable_prefix(method)) and name not in FROZEN_SCALARS


@dataclass
class NearlOutput:
    logits: torch.Tensor  # (B, C)
    ortho: torch.Tensor  # scalar: NEARL's mean cos^2 between OCA updates and their tokens (0 for the baselines)


class FrozenCLIP(nn.Module):
    """A frozen open_clip CLIP bound to class prompts; a subclass adds its parts in :meth:`setup`.

    After ``setup`` every parameter's ``requires_grad`` is set by :func:`is_adapter_param`
    for the subclass's ``method``, so a method cannot train anything the rule does not name.
    """

    method = ""  # the adapter.method value a subclass implements

    def __init__(self, backbone: Backbone, cfg: NearlConfig, classes: tuple[str, ...]):
        super().__init__()
        if not classes:
            raise ConfigError("no classes: set task.classes in the config or give a data folder with class folders")
        if cfg.adapter.method != self.method:
            raise ConfigError(f"{type(self).__name__} implements adapter.method {self.method}, the config says "
                              f"{cfg.adapter.method}; build models with nearl_core.model.build_model")
        vision, text = towers_of(backbone.clip)  # refuses unknown layouts before anything changes
        self.backbone_name, self.backbone_source = backbone.name, backbone.source
        self.cfg, self.classes = cfg.with_classes(tuple(classes)), tuple(classes)
        self.clip = backbone.clip
        self.preprocess = backbone.preprocess  # the backbone's eval transform (PIL image -> tensor)
        self.vision, self.text = vision, text
        vision.checkpoint = text.checkpoint = cfg.train.checkpoint_backbone  # an option: same gradients, less memory
        self.num_templates = len(cfg.task.templates)
        prompts = [p for per_class in self.cfg.task.prompts() for p in per_class]  # class-major, C*P
        full = backbone.tokenizer(prompts)
        self.register_buffer("full_tokens", full, persistent=False)  # (C*P, context) for zero-shot reference
        self._prompts = text.prepare(full)
        # under DP-SGD, text that depends on trainable parameters (not on images) is run once per
        # sample, so that per-sample gradient hooks see the sample batch first (nearl_core.privacy)
        self.per_sample_text = False
        self.setup(backbone)
        for name, p in self.named_parameters():
            p.requires_grad_(is_adapter_param(name, self.method))

    def setup(self, backbone: Backbone) -> None:
        """Build the method's own parts (``self.adapters``); called once by ``__init__``."""
        raise NotImplementedError

    # -- what the method trains ------------------------------------------------------------
    @property
    def shared_text(self) -> bool:
        """True when class embeddings depend on trainable parameters but not on the image."""
        return False

    def trainable_module(self) -> nn.Module:
        """The module holding every trainable parameter (where DP-SGD's per-sample hooks go)."""
        return self.clip if trainable_prefix(self.method) == BACKBONE_PREFIX else self.adapters

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The trainable tensors by wire name (the parameter name without the method's prefix)."""
        prefix = trainable_prefix(self.method)
        return {n[len(prefix):]: p for n, p in self.named_parameters() if is_adapter_param(n, self.method)}

    def components(self) -> dict[str, int]:
        """Trainable parameters per part of the method (``nearl params``)."""
        return {name: _count(m) for name, m in self.adapters.named_children()}

    def dimensions(self) -> dict:
        """The sizes that determine the parameter count (``nearl params``)."""
        return {"vision_layers": len(self.vision.blocks), "text_layers": len(self.text.blocks),
                "vision_width": self.vision.width, "text_width": self.text.width}

    # -- modes ------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "FrozenCLIP":
        super().train(mode)
        self.clip.eval()  # the backbone never leaves eval mode (no dropout, even when it trains)
        return self

    def _apply(self, fn, recurse=True):  # keep the prompt tensors on the model's device
        out = super()._apply(fn, recurse)
        p = self._prompts
        self._prompts = TextInputs(fn(p.tokens), fn(p.eot), fn(p.valid))
        return out

    # -- shared pieces of the forward passes --------------------------------------------------
    def _text_block(self, j: int, xt: torch.Tensor) -> torch.Tensor:
        """Frozen text block j on (Bt, S, T, D_t): every prompt separately, under its own mask."""
        bt, s, t, dt = xt.shape
        mask = self.text.mask(self._prompts.valid.repeat(bt, 1))  # causal, or key padding (bidirectional)
        out = self.text.block(j, xt.reshape(bt * s, t, dt), mask)
        return out.reshape(bt, s, t, dt)

    def _class_embeddings(self, xt: torch.Tensor) -> torch.Tensor:
        """(Bt, S, T, D_t) -> (Bt, C, E): normalised, averaged over templates, renormalised."""
        bt, s, t, dt = xt.shape
        emb = F.normalize(self.text.head(xt.reshape(bt * s, t, dt), self._prompts.eot.repeat(bt)), dim=-1)
        emb = emb.reshape(bt, len(self.classes), self.num_templates, -1).mean(2)
        return F.normalize(emb, dim=-1)

    def _logits(self, image_emb: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
        """Normalised (B, E) images against (C, E) or per-image (B, C, E) classes -> (B, C) logits."""
        if class_emb.dim() == 2:
            return self._bias(self._scale() * image_emb @ class_emb.t())
        class_emb = class_emb.expand(len(image_emb), -1, -1)  # (1, C, E) text shared by the batch, or (B, C, E)
        return self._bias(self._scale() * torch.einsum("be,bce->bc", image_emb, class_emb))

    def _scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp()

    def _bias(self, logits: torch.Tensor) -> torch.Tensor:
        bias = getattr(self.clip, "logit_bias", None)
        return logits if bias is None else logits + bias

    def _output(self, logits: torch.Tensor) -> NearlOutput:
        return NearlOutput(logits, logits.new_zeros(()))

    # -- reference -------------------------------------------------------------------------
    @torch.no_grad()
    def zero_shot_classifier(self) -> torch.Tensor:
        """(C, E) class embeddings of the frozen CLIP: open_clip's ``encode_text``, full context, template mean."""
        text_emb = self.clip.encode_text(self.full_tokens, normalize=True)  # (C*P, E)
        return F.normalize(text_emb.reshape(len(self.classes), self.num_templates, -1).mean(1), dim=-1)

    @torch.no_grad()
    def zero_shot_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Plain open_clip zero-shot logits (full context, no adapters): the baseline and the invariant."""
        image_emb = self.clip.encode_image(images, normalize=True)  # (B, E)
        return self._bias(self._scale() * image_emb @ self.zero_shot_classifier().t())


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def frozen_image_features(model: FrozenCLIP, images: torch.Tensor) -> torch.Tensor:
    """(B, E) unnormalised image features of the frozen image tower, without an autograd graph.

    For methods whose trainable parts all sit after the image tower (CLIP-Adapter, linear
    probe, CoOp): no gradient can flow into the tower, so none of its activations is kept.
    """
    with torch.no_grad():
        return model.clip.encode_image(images)


__all__ = ["ADAPTER_PREFIX", "BACKBONE_PREFIX", "FrozenCLIP", "NearlOutput", "frozen_image_features",
           "is_adapter_param", "trainable_prefix"]
