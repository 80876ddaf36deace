"""LoRA: low-rank updates of the attention projections of both towers.

    images ─► [frozen block with W_q,k,v,o + s·B A] x L_v ─► image emb ┐
                                                                       cos ─► logits
    class prompts ─► [frozen block with W_q,k,v,o + s·B A] x L_t ─► class emb ┘

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022 (arXiv
2106.09685); on both towers of CLIP, as in CLIP-LoRA (Zanella and Ben Ayed, "Low-Rank
Few-Shot Adaptation of Vision-Language Models", CVPR Workshops 2024, arXiv 2405.18541).
Every query, key, value and output projection W of every block gets W x + s·B(A x),
with rank r (``adapter.lora-rank``), s = alpha / r (``adapter.lora-alpha``), A initialised
as ``nn.Linear`` (Kaiming-uniform, as peft) and B at zero, so a fresh model is zero-shot.

Written here rather than with peft (which is not a dependency of the project):

* open_clip's own blocks compute q, k and v with one packed ``in_proj_weight`` inside
  ``nn.MultiheadAttention``; there is no q/k/v module to wrap.  peft's support for
  ``nn.MultiheadAttention`` merges the update into that weight before each call, so the
  update never sees the batch, and Opacus cannot take per-sample gradients of it (DP-SGD
  must apply to every method).  Here the update is applied to the activations: open_clip
  blocks run through the written-out block of nearl_core/towers.py with the update added,
  timm and Hugging Face blocks get forward hooks on their own q/k/v/output ``nn.Linear``
  layers for the duration of one block call, then the hooks are removed.
* the backbone object is shared (a site caches it across messages, the simulation across
  arms), so nothing may stay attached to it: the hooks exist only inside the call, which
  also holds when ``train.checkpoint-backbone`` recomputes the block in the backward pass.

Every update takes the sample batch first (the text stream is regrouped from (Bt*S, T, D)
to (Bt, S*T, D) for it), so Opacus' own ``nn.Linear`` samplers give per-sample gradients.
The class embeddings depend on parameters only: once per step, once per sample under DP.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from nearl_core.backbone import Backbone
from nearl_core.errors import BackboneError
from nearl_core.methods.base import FrozenCLIP, NearlOutput
from nearl_core.towers import CausalTextTower, NativeVisionTower, _frozen, _is_plain_block, _written_out_block


class LowRank(nn.Module):
    """x -> s·B(A x) on batch-first x (B, ..., D_in); B starts at zero."""

    def __init__(self, d_in: int, d_out: int, rank: int, scale: float):
        super().__init__()
        self.scale = scale
        self.down = nn.Linear(d_in, rank, bias=False)  # A
        self.up = nn.Linear(rank, d_out, bias=False)  # B
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x)) * self.scale


class AttentionLoRA(nn.Module):
    """The four updates of one attention layer of width D."""

    def __init__(self, width: int, rank: int, scale: float):
        super().__init__()
        self.q, self.k, self.v, self.o = (LowRank(width, width, rank, scale) for _ in range(4))


class LoRAAdapters(nn.Module):
    def __init__(self, vision_width: int, vision_layers: int, text_width: int, text_layers: int, rank: int,
                 scale: float):
        super().__init__()
        self.vision = nn.ModuleList(AttentionLoRA(vision_width, rank, scale) for _ in range(vision_layers))
        self.text = nn.ModuleList(AttentionLoRA(text_width, rank, scale) for _ in range(text_layers))


class Grouped:
    """One layer's updates applied to (G*N, L, D) tokens as (G, N*L, D): the sample batch G first."""

    def __init__(self, lora: AttentionLoRA, groups: int):
        self.lora, self.groups = lora, groups

    def _apply(self, update: LowRank, x: torch.Tensor) -> torch.Tensor:
        out = update(x.reshape(self.groups, -1, x.shape[-1]))
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def qkv(self, y: torch.Tensor) -> torch.Tensor:  # open_clip's and timm's packed projection
        return torch.cat([self._apply(u, y) for u in (self.lora.q, self.lora.k, self.lora.v)], dim=-1)

    def q(self, y: torch.Tensor) -> torch.Tensor:
        return self._apply(self.lora.q, y)

    def k(self, y: torch.Tensor) -> torch.Tensor:
        return self._apply(self.lora.k, y)

    def v(self, y: torch.Tensor) -> torch.Tensor:
        return self._apply(self.lora.v, y)

    def out(self, a: torch.Tensor) -> torch.Tensor:
        return self._apply(self.lora.o, a)


@contextmanager
def hooked(targets: list[tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]]) -> Iterator[None]:
    """Add ``update(input)`` to each target module's output, only inside the ``with``."""
    handles = [m.register_forward_hook(lambda _m, args, out, f=f: out + f(args[0])) for m, f in targets]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _hook_targets(block: nn.Module, delta: Grouped) -> list[tuple[nn.Module, Callable]]:
    """The q/k/v/output ``nn.Linear`` layers of a timm ViT block or a Hugging Face encoder layer."""
    if hasattr(block, "attn"):  # timm: attn.qkv (packed) and attn.proj
        return [(block.attn.qkv, delta.qkv), (block.attn.proj, delta.out)]
    attn = block.attention  # Hugging Face BERT-like: attention.self.query/key/value, attention.output.dense
    return [(attn.self.query, delta.q), (attn.self.key, delta.k), (attn.self.value, delta.v),
            (attn.output.dense, delta.out)]


class LoRACLIP(FrozenCLIP):
    """A frozen CLIP with low-rank updates on every attention projection of both towers."""

    method = "lora"

    def setup(self, backbone: Backbone) -> None:
        v, t = self.vision, self.text
        self._native_vision, self._native_text = isinstance(v, NativeVisionTower), isinstance(t, CausalTextTower)
        for native, tower in ((self._native_vision, v), (self._native_text, t)):
            if native and not all(map(_is_plain_block, tower.blocks)):
                raise BackboneError(f"lora needs open_clip's standard attention blocks in {type(tower).__name__}")
        self._checkpoint = v.checkpoint
        v.checkpoint = t.checkpoint = False  # checkpointing wraps our own block call, hooks included
        a = self.cfg.adapter
        self.adapters = LoRAAdapters(v.width, len(v.blocks), t.width, len(t.blocks), a.lora_rank,
                                     a.lora_alpha / a.lora_rank)

    @property
    def shared_text(self) -> bool:
        return True

    def dimensions(self) -> dict:
        a = self.cfg.adapter
        return {"rank": a.lora_rank, "alpha": a.lora_alpha, "targets": "q, k, v, out", **super().dimensions()}

    def forward(self, images: torch.Tensor) -> NearlOutput:
        """images: (B, 3, H, W) preprocessed -> class logits (B, C)."""
        x = self.vision.embed(images)  # (B, N_v, D_v)
        for i in range(len(self.vision.blocks)):
            x = self._block(True, i, x, None, len(images))
        image_emb = F.normalize(self.vision.head(x), dim=-1)
        return self._output(self._logits(image_emb, self.class_embeddings(len(images) if self.per_sample_text else 1)))

    def class_embeddings(self, batch: int = 1) -> torch.Tensor:
        """(Bt, C, E) class embeddings through the updated text tower; ``batch`` copies for per-sample hooks."""
        p = self._prompts
        x0 = self.text.embed(p.tokens)  # (S, T, D_t), frozen
        s, t, d = x0.shape
        x = x0.unsqueeze(0).expand(batch, s, t, d).reshape(batch * s, t, d)
        mask = self.text.mask(p.valid.repeat(batch, 1))
        for j in range(len(self.text.blocks)):
            x = self._block(False, j, x, mask, batch)
        return self._class_embeddings(x.reshape(batch, s, t, d))

    def _block(self, vision: bool, i: int, x: torch.Tensor, mask, groups: int) -> torch.Tensor:
        """Frozen block i of a tower with this layer's updates, on (groups*N, L, D) tokens."""
        tower, lora = (self.vision, self.adapters.vision) if vision else (self.text, self.adapters.text)
        delta, block = Grouped(lora[i], groups), tower.blocks[i]
        if self._native_vision if vision else self._native_text:
            run = lambda y: _written_out_block(block, y, mask, delta)  # noqa: E731
        else:
            def run(y: torch.Tensor) -> torch.Tensor:
                with hooked(_hook_targets(block, delta)):
                    return tower.block(i, y) if vision else tower.block(i, y, mask)
        return _frozen(self._checkpoint, run, x)
