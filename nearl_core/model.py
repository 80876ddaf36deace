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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nearl_core.adapters import OCA, QueryTokens, USEBlock
from nearl_core.backbone import Backbone, build_backbone
from nearl_core.config import AdapterConfig, NearlConfig
from nearl_core.errors import ConfigError
from nearl_core.towers import TextInputs, towers_of

ADAPTER_PREFIX = "adapters."


def is_adapter_param(name: str) -> bool:
    """The one rule for what is an adapter weight: it drives freezing, saving, loading and egress."""
    return name.startswith(ADAPTER_PREFIX)


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


@dataclass
class NearlOutput:
    logits: torch.Tensor  # (B, C)
    ortho: torch.Tensor  # scalar: mean cos^2 between raw OCA updates and their tokens


class NearlCLIP(nn.Module):
    """A frozen open_clip CLIP plus NEARL adapters, bound to a list of class prompts."""

    def __init__(self, backbone: Backbone, cfg: NearlConfig, classes: tuple[str, ...]):
        super().__init__()
        if not classes:
            raise ConfigError("no classes: set task.classes in the config or give a data folder with class folders")
        vision, text = towers_of(backbone.clip)  # refuses unknown layouts before anything changes
        self.backbone_name, self.backbone_source = backbone.name, backbone.source
        self.cfg, self.classes = cfg.with_classes(tuple(classes)), tuple(classes)
        self.clip = backbone.clip
        self.preprocess = backbone.preprocess  # the backbone's eval transform (PIL image -> tensor)
        self.vision, self.text = vision, text
        vision.checkpoint = text.checkpoint = cfg.train.checkpoint_backbone  # an option: same gradients, less memory
        self.schedule = lockstep_schedule(len(vision.blocks), len(text.blocks))
        self.adapters = NearlAdapters(cfg.adapter, vision.width, text.width, len(vision.blocks), len(text.blocks))
        for name, p in self.named_parameters():
            p.requires_grad_(is_adapter_param(name))
        self.num_templates = len(cfg.task.templates)
        prompts = [p for per_class in self.cfg.task.prompts() for p in per_class]  # class-major, C*P
        full = backbone.tokenizer(prompts)
        self.register_buffer("full_tokens", full, persistent=False)  # (C*P, context) for zero-shot reference
        self._prompts = text.prepare(full)
        self._text_cache: tuple | None = None
        self._cache_enabled = False
        # shared mode under DP-SGD: run the (sample-independent) text branch once per sample
        self.per_sample_text = False

    # -- modes -------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "NearlCLIP":
        super().train(mode)
        self.clip.eval()  # the backbone never leaves eval mode
        self._text_cache = None
        return self

    def cache_text(self, enabled: bool = True) -> None:
        """In ``shared`` mode, compute class text once and reuse it until disabled or trained."""
        if enabled and self.cfg.adapter.text_conditioning != "shared":
            raise ConfigError("text caching needs adapter.text-conditioning: shared")
        self._text_cache = None
        self._cache_enabled = enabled

    def _apply(self, fn, recurse=True):  # keep the prompt tensors on the model's device
        out = super()._apply(fn, recurse)
        p = self._prompts
        self._prompts = TextInputs(fn(p.tokens), fn(p.eot), fn(p.valid))
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
        return NearlOutput(self._logits(xv, xt), ortho)

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
        logits = self._scale() * torch.einsum("be,bce->bc", image_emb, class_emb.expand(b, -1, -1))
        return NearlOutput(self._bias(logits), ortho / self._num_ocas())

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

    def _text_block(self, j: int, xt: torch.Tensor) -> torch.Tensor:
        bt, s, t, dt = xt.shape
        mask = self.text.mask(self._prompts.valid.repeat(bt, 1))  # causal, or key padding (bidirectional)
        out = self.text.block(j, xt.reshape(bt * s, t, dt), mask)  # frozen, per prompt
        return out.reshape(bt, s, t, dt)

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

    def _class_embeddings(self, xt: torch.Tensor) -> torch.Tensor:
        """(Bt, S, T, D_t) -> (Bt, C, E): normalised, averaged over templates, renormalised."""
        bt, s, t, dt = xt.shape
        emb = F.normalize(self.text.head(xt.reshape(bt * s, t, dt), self._prompts.eot.repeat(bt)), dim=-1)
        emb = emb.reshape(bt, len(self.classes), self.num_templates, -1).mean(2)
        return F.normalize(emb, dim=-1)

    def _logits(self, xv: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
        image_emb = F.normalize(self.vision.head(xv), dim=-1)  # (B, E)
        class_emb = self._class_embeddings(xt)  # (B, C, E)
        return self._bias(self._scale() * torch.einsum("be,bce->bc", image_emb, class_emb))

    def _scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp()

    def _bias(self, logits: torch.Tensor) -> torch.Tensor:
        bias = getattr(self.clip, "logit_bias", None)
        return logits if bias is None else logits + bias

    def _num_ocas(self) -> int:
        return len(self.adapters.oca_vision) + len(self.adapters.oca_text)

    # -- reference -------------------------------------------------------------------------
    @torch.no_grad()
    def zero_shot_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Plain open_clip zero-shot logits (full context, no adapters): the baseline and the invariant."""
        image_emb = self.clip.encode_image(images, normalize=True)  # (B, E)
        text_emb = self.clip.encode_text(self.full_tokens, normalize=True)  # (C*P, E)
        text_emb = F.normalize(text_emb.reshape(len(self.classes), self.num_templates, -1).mean(1), dim=-1)
        return self._bias(self._scale() * image_emb @ text_emb.t())


def build_model(cfg: NearlConfig, classes: tuple[str, ...] | None = None, backbone: Backbone | None = None) -> NearlCLIP:
    """One factory call: the frozen backbone + zero-initialised adapters for these classes.

    The adapters' random parts (query tokens, projections) are drawn from ``train.seed`` in
    a forked RNG: the same config gives the same initial adapters in every process, so a
    federation's round 0 (built by the coordinator) is reproducible, and the caller's own
    random stream is left as it was.
    """
    classes = tuple(classes) if classes else cfg.task.classes
    backbone = backbone or build_backbone(cfg.model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        return NearlCLIP(backbone, cfg, classes)
