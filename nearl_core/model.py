"""NEARL on a frozen open_clip CLIP: the forward pass, top to bottom.

    images ─► vision embed ─► [block_k ─► USE_k ─► OCA_v,k] x L ─► head ─► image emb ┐
                                        ▲  Z_k                                    cos ─► logits
    class prompts ─► text embed ─► [block_k ─► OCA_t,k] x L ─► head ─► class emb ───┘

Both towers advance in lockstep (paired by relative depth when their depths differ).
At every step the USEformer updates the synergy queries Z from this image's tokens and
the pooled class text; each tower's OCA then lets its tokens attend to Z and adds only
the component orthogonal to each token.  All OCA output projections start at zero, so
a freshly built model gives exactly the zero-shot CLIP logits.

Text conditioning (``adapter.text-conditioning``):
  per-image  the text stream is run once per image (B, C*P prompts), conditioned on that
             image's Z: full two-way interaction, cost grows with B*C.
  shared     the text stream sees queries built from text context only, so class
             embeddings depend on parameters alone: computed once per step and cached
             for inference (:meth:`NearlCLIP.cache_text`).

The methods NEARL is measured against (``adapter.method``: CoOp, CLIP-Adapter, LoRA, a
linear probe, full fine-tuning) share the frozen backbone, the class prompts and the
rule of what trains (:mod:`nearl_core.methods.base`) and live in their own files under
``nearl_core/methods/``; :func:`build_model` at the end of this file picks one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nearl_core.adapters import OCA, QueryTokens, USEBlock
from nearl_core.backbone import Backbone, build_backbone
from nearl_core.config import AdapterConfig, NearlConfig
from nearl_core.errors import ConfigError
from nearl_core.methods.base import (ADAPTER_PREFIX, FrozenCLIP, NearlOutput, is_adapter_param,  # noqa: F401
                                     trainable_prefix)
from nearl_core.methods.clip_adapter import CLIPAdapterCLIP
from nearl_core.methods.coop import CoOpCLIP
from nearl_core.methods.full_ft import FullFineTuneCLIP
from nearl_core.methods.linear_probe import LinearProbeCLIP
from nearl_core.methods.lora import LoRACLIP


def lockstep_schedule(vision_layers: int, text_layers: int) -> list[tuple[int | None, int | None]]:
    """Pair layers by relative depth: step k runs vision block i and/or text block j (None = wait).

    Block i of a tower with L_x layers ends at relative depth (i+1)/L_x; it runs at the
    first step k of L = max(L_v, L_t) with k/L >= (i+1)/L_x, so the last blocks meet.
    """
    steps = max(vision_layers, text_layers)
    schedule, done_v, done_t = [], 0, 0
    for k in range(1, steps + 1):
        want_v, want_t = k * vision_layers // steps, k * text_layers // steps
        schedule.append((done_v if want_v > done_v else None, done_t if want_t > done_t else None))
        done_v, done_t = want_v, want_t
    return schedule


class NearlAdapters(nn.Module):
    """Every trainable tensor of NEARL, in one module (the payload of a federation)."""

    def __init__(self, cfg: AdapterConfig, vision_width: int, text_width: int, vision_layers: int, text_layers: int):
        super().__init__()
        d, r, h = cfg.width, cfg.rank, cfg.heads
        steps = max(vision_layers, text_layers)
        self.queries = QueryTokens(cfg.queries, d)
        self.useformer = nn.ModuleList(USEBlock(d, h, vision_width, text_width, cfg.mlp_ratio) for _ in range(steps))
        self.oca_vision = nn.ModuleList(OCA(vision_width, d, r, h, cfg.eps) for _ in range(vision_layers))
        self.oca_text = nn.ModuleList(OCA(text_width, d, r, h, cfg.eps) for _ in range(text_layers))


class NearlCLIP(FrozenCLIP):
    """A frozen open_clip CLIP plus NEARL adapters, bound to a list of class prompts."""

    method = "nearl"

    def setup(self, backbone: Backbone) -> None:
        vision, text = self.vision, self.text
        self.schedule = lockstep_schedule(len(vision.blocks), len(text.blocks))
        self.adapters = NearlAdapters(self.cfg.adapter, vision.width, text.width, len(vision.blocks), len(text.blocks))
        self._text_cache: tuple | None = None
        self._cache_enabled = False

    @property
    def shared_text(self) -> bool:
        return self.cfg.adapter.text_conditioning == "shared"

    def components(self) -> dict[str, int]:
        a = self.adapters
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        return {"useformer": count(a.useformer) + count(a.queries), "oca_vision": count(a.oca_vision),
                "oca_text": count(a.oca_text)}

    def dimensions(self) -> dict:
        a = self.cfg.adapter
        return {"queries": a.queries, "width": a.width, "rank": a.rank, "heads": a.heads, **super().dimensions()}

    # -- modes -------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "NearlCLIP":
        super().train(mode)
        self._text_cache = None
        return self

    def cache_text(self, enabled: bool = True) -> None:
        """In ``shared`` mode, compute class text once and reuse it until disabled or trained."""
        if enabled and self.cfg.adapter.text_conditioning != "shared":
            raise ConfigError("text caching needs adapter.text-conditioning: shared")
        self._text_cache = None
        self._cache_enabled = enabled

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._text_cache = None
        return out

    # -- forward -------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> NearlOutput:
        """images: (B, 3, H, W) preprocessed -> class logits (B, C)."""
        if self.cfg.adapter.text_conditioning == "shared":
            return self._forward_shared(images)
        return self._forward_per_image(images)

    def _forward_per_image(self, images: torch.Tensor) -> NearlOutput:
        p = self._prompts
        xv = self.vision.embed(images)  # (B, N_v, D_v)
        b = xv.shape[0]
        xt0 = self.text.embed(p.tokens)  # (S, T, D_t), S = C*P prompts
        xt = xt0.unsqueeze(0).expand(b, *xt0.shape)  # (B, S, T, D_t): one text stream per image
        z = self.adapters.queries(xv)  # (B, M, d)
        xv, xt, _, ortho = self._lockstep(xv, xt, z, None)
        image_emb = F.normalize(self.vision.head(xv), dim=-1)  # (B, E)
        return NearlOutput(self._logits(image_emb, self._class_embeddings(xt)), ortho)  # per image: (B, C, E)

    def _forward_shared(self, images: torch.Tensor) -> NearlOutput:
        cached = self._cache_enabled and not torch.is_grad_enabled()
        if cached and self._text_cache is not None:
            class_emb, pooled_per_step, ortho = self._text_cache
        else:
            text_batch = images.shape[0] if self.per_sample_text else 1
            class_emb, pooled_per_step, ortho = self._shared_text(text_batch)
            if cached:
                self._text_cache = (class_emb, pooled_per_step, ortho)
        xv = self.vision.embed(images)  # (B, N_v, D_v)
        b = xv.shape[0]
        z = self.adapters.queries(xv)
        for k, (i, _) in enumerate(self.schedule):
            if i is not None:
                xv = self.vision.block(i, xv)
            ctx = pooled_per_step[k].expand(b, -1, -1)  # (B, C, D_t), the same for every image
            z = self.adapters.useformer[k](z, xv, ctx)
            if i is not None:
                xv, o = self.adapters.oca_vision[i](xv, z)
                ortho = ortho + o
        image_emb = F.normalize(self.vision.head(xv), dim=-1)  # (B, E)
        return NearlOutput(self._logits(image_emb, class_emb), ortho / self._num_ocas())

    def _shared_text(self, batch: int = 1) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """Text stream conditioned on text-only queries.

        Returns (Bt, C, E) class embeddings, the per-step pooled class context and the
        ortho sum.  ``batch`` = 1 computes it once; ``batch`` = B repeats the identical
        computation per sample so that per-sample gradient hooks (DP-SGD) see the batch.
        """
        p = self._prompts
        xt0 = self.text.embed(p.tokens)  # (S, T, D_t)
        xt = xt0.unsqueeze(0).expand(batch, *xt0.shape)  # (Bt, S, T, D_t)
        zt = self.adapters.queries(xt)  # (Bt, M, d)
        pooled, ortho = [], xt.new_zeros(())
        for k, (_, j) in enumerate(self.schedule):
            if j is not None:
                xt = self._text_block(j, xt)
            pooled.append(self._pool_classes(xt))  # (Bt, C, D_t)
            zt = self.adapters.useformer[k](zt, None, pooled[-1])
            if j is not None:
                xt, o = self._text_oca(j, xt, zt)
                ortho = ortho + o
        return self._class_embeddings(xt), pooled, ortho

    def _lockstep(self, xv, xt, z, zt):
        """Run both towers block by block with the USEformer and OCAs between blocks."""
        ortho = xv.new_zeros(())
        for k, (i, j) in enumerate(self.schedule):
            if i is not None:
                xv = self.vision.block(i, xv)  # (B, N_v, D_v)
            if j is not None:
                xt = self._text_block(j, xt)  # (B, S, T, D_t)
            z = self.adapters.useformer[k](z, xv, self._pool_classes(xt))  # (B, M, d)
            if i is not None:
                xv, o = self.adapters.oca_vision[i](xv, z)
                ortho = ortho + o
            if j is not None:
                xt, o = self._text_oca(j, xt, z)
                ortho = ortho + o
        return xv, xt, z, ortho / self._num_ocas()

    def _text_oca(self, j: int, xt: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bt, s, t, dt = xt.shape
        out, o = self.adapters.oca_text[j](xt.reshape(bt, s * t, dt), z)  # batch-first for per-sample grads
        return out.reshape(bt, s, t, dt), o

    def _pool_classes(self, xt: torch.Tensor) -> torch.Tensor:
        """Mean over each prompt's real tokens, then over its templates: (Bt, S, T, D) -> (Bt, C, D)."""
        valid = self._prompts.valid.to(xt.dtype).unsqueeze(-1)  # (S, T, 1)
        per_prompt = (xt * valid).sum(2) / valid.sum(1)  # (Bt, S, D)
        bt, _, dt = per_prompt.shape
        return per_prompt.reshape(bt, len(self.classes), self.num_templates, dt).mean(2)

    def _num_ocas(self) -> int:
        return len(self.adapters.oca_vision) + len(self.adapters.oca_text)


# adapter.method -> the class that implements it: NEARL here, each baseline in its own file
MODEL_CLASSES: dict[str, type[FrozenCLIP]] = {
    "nearl": NearlCLIP,
    "coop": CoOpCLIP,
    "clip-adapter": CLIPAdapterCLIP,
    "lora": LoRACLIP,
    "linear-probe": LinearProbeCLIP,
    "full-ft": FullFineTuneCLIP,
}


def build_model(cfg: NearlConfig, classes: tuple[str, ...] | None = None,
                backbone: Backbone | None = None) -> FrozenCLIP:
    """One factory call: the frozen backbone + the method's parts (``adapter.method``) for these classes.

    The method's random parts (NEARL's query tokens and projections, CoOp's context, LoRA's
    down-projections) are drawn from ``train.seed`` in a forked RNG: the same config gives
    the same initial adapters in every process, so a federation's round 0 (built by the
    coordinator) is reproducible, and the caller's own random stream is left as it was.
    """
    method = cfg.adapter.method
    if method not in MODEL_CLASSES:  # a validated config cannot get here; a hand-built one can
        raise ConfigError(f"adapter.method '{method}' is unknown; valid methods: {', '.join(MODEL_CLASSES)}")
    classes = tuple(classes) if classes else cfg.task.classes
    backbone = backbone or build_backbone(cfg.model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        return MODEL_CLASSES[method](backbone, cfg, classes)
