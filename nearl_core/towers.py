"""Layer-by-layer access to open_clip's two towers.

NEARL runs the image and text towers in lockstep, one block at a time, so that the
adapters can exchange information between modalities at every depth.  open_clip only
exposes whole-tower ``encode_image`` / ``encode_text``; these small views split each
tower into ``embed -> blocks -> head`` without copying any weight, so the frozen
computation is exactly open_clip's.

Layouts are detected by inspecting the loaded model, never by its name.  An unknown
layout is refused before anything is modified (peft's rule: check, then mutate).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from open_clip.transformer import TextTransformer, VisionTransformer

from nearl_core.errors import BackboneError


class VisionTower:
    """open_clip's native ``VisionTransformer`` split into embed / blocks / head."""

    def __init__(self, visual: VisionTransformer):
        self.visual = visual
        self.blocks = list(visual.transformer.resblocks)
        self.batch_first = getattr(visual.transformer, "batch_first", True)
        self.width = visual.transformer.width

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual._embeds(images)  # (B, N_v, D_v), after ln_pre

    def block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return _run_block(self.blocks[i], x, None, self.batch_first)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        pooled, _ = self.visual._pool(x)
        return pooled @ self.visual.proj if self.visual.proj is not None else pooled  # (B, E)


@dataclass
class TextInputs:
    """Tokenised class prompts, trimmed to the longest prompt (exact under the causal mask)."""

    tokens: torch.Tensor  # (S, T) token ids
    eot: torch.Tensor  # (S,) index of the pooled (end-of-text) token
    valid: torch.Tensor  # (S, T) bool, True up to and including the end-of-text token


class TextTower:
    """open_clip's native causal text transformer (flattened into CLIP, or a TextTransformer)."""

    def __init__(self, owner: nn.Module):
        self.owner = owner  # CLIP (flattened attributes) or TextTransformer
        self.blocks = list(owner.transformer.resblocks)
        self.batch_first = getattr(owner.transformer, "batch_first", True)
        self.width = owner.transformer.width
        self.pool_type = getattr(owner, "text_pool_type", getattr(owner, "pool_type", "argmax"))
        self.eos_id = getattr(owner, "text_eos_id", getattr(owner, "eos_id", None))

    def prepare(self, tokens: torch.Tensor, trim: bool = True) -> TextInputs:
        """Locate each prompt's pooled token and cut the padding nobody attends to."""
        if self.pool_type == "argmax":
            eot = tokens.argmax(dim=-1)
        elif self.pool_type == "eos":
            eot = (tokens == self.eos_id).int().argmax(dim=-1)
        else:
            eot = torch.full((tokens.shape[0],), tokens.shape[1] - 1, dtype=torch.long)
        if trim and self.pool_type in ("argmax", "eos"):
            tokens = tokens[:, : int(eot.max()) + 1]
        positions = torch.arange(tokens.shape[1]).unsqueeze(0)
        return TextInputs(tokens=tokens, eot=eot, valid=positions <= eot.unsqueeze(1))

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        o = self.owner
        cast = o.transformer.get_cast_dtype()
        x = o.token_embedding(tokens).to(cast)
        return x + o.positional_embedding[: tokens.shape[1]].to(cast)  # (S, T, D_t)

    def mask(self, length: int) -> torch.Tensor | None:
        m = self.owner.attn_mask
        return None if m is None else m[:length, :length]

    def block(self, i: int, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return _run_block(self.blocks[i], x, mask, self.batch_first)

    def head(self, x: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        """x: (S, T, D_t) -> (S, E), pooled at each prompt's end-of-text token."""
        o = self.owner
        x = o.ln_final(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), eot.to(x.device)]
        proj = o.text_projection
        if proj is None:
            return pooled
        return proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj


def _run_block(block: nn.Module, x: torch.Tensor, mask: torch.Tensor | None, batch_first: bool) -> torch.Tensor:
    if not batch_first:
        return block(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)
    return block(x, attn_mask=mask)


def towers_of(clip: nn.Module) -> tuple[VisionTower, TextTower]:
    """Inspect a loaded open_clip model and return its tower views, or refuse it."""
    visual = getattr(clip, "visual", None)
    text_owner = clip.text if hasattr(clip, "text") else clip
    found = f"visual={type(visual).__name__}, text={type(getattr(clip, 'text', clip)).__name__}"
    if not isinstance(visual, VisionTransformer) or getattr(visual, "attn_pool", None) is not None:
        raise BackboneError(
            f"unsupported vision tower layout ({found}); NEARL needs an open_clip ViT without attentional pooling"
        )
    has_causal_text = hasattr(text_owner, "transformer") and hasattr(text_owner.transformer, "resblocks")
    if not has_causal_text or (isinstance(text_owner, TextTransformer) and text_owner.cls_emb is not None):
        raise BackboneError(f"unsupported text tower layout ({found}); NEARL needs open_clip's causal text transformer")
    return VisionTower(visual), TextTower(text_owner)
