"""Layer-by-layer access to the two towers of an open_clip model.

NEARL runs the image and text towers in lockstep, one block at a time, so that the
adapters can exchange information between modalities at every depth.  open_clip only
exposes whole-tower ``encode_image`` / ``encode_text``; these small views split each
tower into ``embed -> blocks -> head`` without copying any weight, so the frozen
computation is exactly open_clip's.

Three layouts are supported, each chosen by inspecting the loaded modules (never by the
model's name):

  vision  open_clip ``VisionTransformer``            -> :class:`NativeVisionTower`
          open_clip ``TimmModel`` on a timm ViT trunk -> :class:`TimmVisionTower`
  text    open_clip's causal text transformer        -> :class:`CausalTextTower`
          open_clip ``HFTextEncoder`` (BERT-like)     -> :class:`HFTextTower`

An unknown layout is refused before anything is modified (peft's rule: check, then
mutate), with a message naming the module types that were found.

Text context trimming: prompts are tokenised to the model's full context (77 tokens for
CLIP, 256 for BiomedCLIP) but are much shorter.  Each text view cuts the context to the
longest prompt only where that is exact: under a causal mask nothing attends forward;
in a bidirectional encoder the padding is masked out as keys, and every block gets the
same key-padding mask open_clip's own forward builds.

Frozen blocks in training: the adapters' gradient flows back through every frozen
block after the first adapter.  open_clip's own blocks (native vision and causal text)
then run written out (one q/k/v matmul + ``scaled_dot_product_attention``, see
:func:`_run_block`); timm's ViT blocks and Hugging Face encoder layers already project
q/k/v with plain ``nn.Linear`` matmuls on batch-first tokens and keep their own call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from nearl_core.errors import BackboneError

if TYPE_CHECKING:  # imported where a tower is inspected: open_clip is slow to import (see backbone.py)
    from open_clip.transformer import VisionTransformer


@dataclass
class TextInputs:
    """Tokenised class prompts, trimmed to the longest prompt where that is exact."""

    tokens: torch.Tensor  # (S, T) token ids
    eot: torch.Tensor  # (S,) index of each prompt's last real token (the pooled token for causal CLIP)
    valid: torch.Tensor  # (S, T) bool, True on real tokens: positions 0..eot


class VisionTower:
    """Interface of a vision view: ``embed`` -> ``block(i)`` for each of ``blocks`` -> ``head``."""

    blocks: list[nn.Module]
    width: int
    checkpoint: bool = False  # recompute frozen block activations in the backward (train.checkpoint-backbone)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) preprocessed images -> (B, N_v, D_v) tokens entering the first block."""
        raise NotImplementedError

    def block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N_v, D_v) tokens after the last block -> (B, E) image embedding (not normalised)."""
        raise NotImplementedError


class TextTower:
    """Interface of a text view: ``prepare`` once, then ``embed`` -> ``block(j)`` -> ``head``."""

    blocks: list[nn.Module]
    width: int
    checkpoint: bool = False  # recompute frozen block activations in the backward (train.checkpoint-backbone)

    def prepare(self, tokens: torch.Tensor, trim: bool = True) -> TextInputs:
        raise NotImplementedError

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """(S, T) token ids -> (S, T, D_t) tokens entering the first block."""
        return self.embed_words(self.word_embed(tokens))

    def word_embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """(S, T) token ids -> (S, T, D_t) word vectors only (what a learned prompt replaces, e.g. CoOp's)."""
        raise NotImplementedError

    def embed_words(self, words: torch.Tensor) -> torch.Tensor:
        """(N, T, D_t) word vectors -> tokens entering the first block (positions etc. added)."""
        raise NotImplementedError

    def mask(self, valid: torch.Tensor) -> Any:
        """The attention mask for sequences whose real tokens are ``valid`` (N, T), or None."""
        raise NotImplementedError

    def block(self, j: int, x: torch.Tensor, mask: Any) -> torch.Tensor:
        raise NotImplementedError

    def head(self, x: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        """(S, T, D_t) tokens after the last block -> (S, E) text embedding (not normalised)."""
        raise NotImplementedError


# -- vision ------------------------------------------------------------------------------


class NativeVisionTower(VisionTower):
    """open_clip's own ``VisionTransformer`` split into embed / blocks / head."""

    def __init__(self, visual: VisionTransformer):
        self.visual = visual
        self.blocks = list(visual.transformer.resblocks)
        self.batch_first = getattr(visual.transformer, "batch_first", True)
        self.width = visual.transformer.width

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual._embeds(images)  # (B, N_v, D_v), after ln_pre

    def block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return _frozen(self.checkpoint, lambda y: _run_block(self.blocks[i], y, None, self.batch_first), x)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        pooled, _ = self.visual._pool(x)
        return pooled @ self.visual.proj if self.visual.proj is not None else pooled  # (B, E)


class TimmVisionTower(VisionTower):
    """open_clip's ``TimmModel`` around a timm ``VisionTransformer`` trunk (BiomedCLIP's image tower).

    Mirrors ``trunk.forward_features`` step by step (patch embedding, class token and
    position embedding, patch dropout, ``norm_pre``; then the blocks; then ``norm``),
    followed by the trunk's own pooling head and open_clip's projection ``visual.head``.
    """

    def __init__(self, visual: nn.Module):
        self.visual = visual
        self.trunk = visual.trunk
        self.blocks = list(self.trunk.blocks)
        self.width = self.trunk.embed_dim

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        t = self.trunk
        x = t.patch_embed(images)
        x = t._pos_embed(x)
        x = t.patch_drop(x)
        return t.norm_pre(x)  # (B, prefix + patches, D_v)

    def block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return _frozen(self.checkpoint, self.blocks[i], x)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        features = self.trunk.forward_head(self.trunk.norm(x))  # timm pooling (+ fc_norm, head)
        return self.visual.head(features)  # open_clip's projection to the joint space


# -- text --------------------------------------------------------------------------------


class CausalTextTower(TextTower):
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
        causal = self.owner.attn_mask is not None  # without it, every token sees the padding: keep it
        if trim and causal and self.pool_type in ("argmax", "eos"):
            tokens = tokens[:, : int(eot.max()) + 1]
        positions = torch.arange(tokens.shape[1]).unsqueeze(0)
        return TextInputs(tokens=tokens, eot=eot, valid=positions <= eot.unsqueeze(1))

    def word_embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.owner.token_embedding(tokens).to(self.owner.transformer.get_cast_dtype())

    def embed_words(self, words: torch.Tensor) -> torch.Tensor:
        cast = self.owner.transformer.get_cast_dtype()
        return words + self.owner.positional_embedding[: words.shape[1]].to(cast)  # (S, T, D_t)

    def mask(self, valid: torch.Tensor) -> torch.Tensor | None:
        """The causal mask alone: a token never sees the padding after it."""
        m, length = self.owner.attn_mask, valid.shape[1]
        return None if m is None else m[:length, :length]

    def block(self, j: int, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return _frozen(self.checkpoint, lambda y: _run_block(self.blocks[j], y, mask, self.batch_first), x)

    def head(self, x: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        """x: (S, T, D_t) -> (S, E), pooled at each prompt's end-of-text token."""
        o = self.owner
        x = o.ln_final(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), eot.to(x.device)]
        proj = o.text_projection
        if proj is None:
            return pooled
        return proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj


class HFTextTower(TextTower):
    """open_clip's ``HFTextEncoder``: a bidirectional Hugging Face encoder (BERT, RoBERTa, ...).

    Reproduces ``HFTextEncoder.forward``: the padding mask ``tokens != pad_token_id``, the
    model's embeddings, its encoder layers under the key-padding mask the model itself
    builds, then open_clip's pooler (cls / mean / cls_last_hidden_state / ...) and
    ``text.proj``.  Only right padding is assumed, as open_clip's tokenizer produces it.
    """

    def __init__(self, encoder: nn.Module):
        self.encoder = encoder
        self.model = encoder.transformer
        self.config = encoder.config
        self.blocks = list(self.model.encoder.layer)
        self.width = int(self.config.hidden_size)
        self.pad_id = self.config.pad_token_id

    def prepare(self, tokens: torch.Tensor, trim: bool = True) -> TextInputs:
        """Real tokens are the non-padding ones; trim only padding beyond the longest prompt."""
        valid = tokens != self.pad_id
        lengths = valid.sum(dim=1)
        if not bool((valid == (torch.arange(tokens.shape[1]) < lengths.unsqueeze(1))).all()):
            raise BackboneError("the text tokenizer does not pad on the right; NEARL's text view needs right padding")
        if trim:
            tokens, valid = tokens[:, : int(lengths.max())], valid[:, : int(lengths.max())]
        return TextInputs(tokens=tokens, eot=lengths - 1, valid=valid)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.embeddings(input_ids=tokens)  # (S, T, D_t): word + position + type, LayerNorm

    def word_embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.embeddings.word_embeddings(tokens)

    def embed_words(self, words: torch.Tensor) -> torch.Tensor:
        return self.model.embeddings(inputs_embeds=words)  # the same sums and LayerNorm as from token ids

    def mask(self, valid: torch.Tensor) -> Any:
        """The model's own key-padding mask (bidirectional), in its attention implementation's format."""
        dtype = next(self.model.parameters()).dtype
        meta = torch.empty(*valid.shape, 0, dtype=dtype, device=valid.device)  # shape/dtype/device only
        return _bidirectional_mask(self.config, meta, valid.long())

    def block(self, j: int, x: torch.Tensor, mask: Any) -> torch.Tensor:
        return _frozen(self.checkpoint, lambda y: _hf_layer(self.blocks[j], y, mask), x)

    def head(self, x: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        """x: (S, T, D_t) -> (S, E) through the HF pooler (if any), open_clip's pooler and projection."""
        from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

        valid = torch.arange(x.shape[1], device=x.device).unsqueeze(0) <= eot.to(x.device).unsqueeze(1)
        hf_pooler = getattr(self.model, "pooler", None)
        out = BaseModelOutputWithPoolingAndCrossAttentions(
            last_hidden_state=x, pooler_output=hf_pooler(x) if hf_pooler is not None else None
        )
        return self.encoder.proj(self.encoder.pooler(out, valid.long()))


def _bidirectional_mask(config: Any, meta: torch.Tensor, attention_mask: torch.Tensor) -> Any:
    """What ``BertModel.forward`` passes to its layers for this padding mask."""
    try:
        from transformers.masking_utils import create_bidirectional_mask
    except ImportError:  # transformers 4.x: additive 4D mask
        from transformers.modeling_attn_mask_utils import _prepare_4d_attention_mask

        return _prepare_4d_attention_mask(attention_mask, meta.dtype)
    return create_bidirectional_mask(config=config, inputs_embeds=meta, attention_mask=attention_mask)


def _frozen(checkpoint: bool, run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``run(x)`` for one frozen block; under ``checkpoint``, only ``x`` is kept for the backward.

    The adapters' gradient needs every later frozen block's activations; checkpointing
    trades keeping them for one more forward of the block during the backward pass
    (non-reentrant, so the recomputation sees the same autograd state).  The block has
    no randomness in eval mode, so the recomputed values, and the gradients, are the
    same.  Only where a gradient will flow (grad enabled and ``x`` requires it).
    """
    if checkpoint and torch.is_grad_enabled() and x.requires_grad:
        from torch.utils.checkpoint import checkpoint as recompute

        return recompute(run, x, use_reentrant=False)
    return run(x)


def _hf_layer(layer: nn.Module, x: torch.Tensor, mask: Any) -> torch.Tensor:
    out = layer(x, mask)
    return out[0] if isinstance(out, tuple) else out  # transformers 4.x layers return tuples


def _run_block(block: nn.Module, x: torch.Tensor, mask: torch.Tensor | None, batch_first: bool) -> torch.Tensor:
    """One frozen open_clip block on batch-first tokens ``x`` (N, L, D).

    When the adapters' gradient has to flow back through the block (grad enabled and
    ``x`` requires it), ``nn.MultiheadAttention`` leaves its fused kernel and, for
    batch-first blocks, projects q/k/v from a transposed input as a batched matmul over
    L broadcast copies of the weight (a quarter of a ViT-B-16 train step on the CPU).
    The same block written out (:func:`_written_out_block`) computes the same values
    with one plain matmul.  Without gradients the block's own call keeps the fused
    no-grad kernel, as open_clip's inference does.
    """
    if torch.is_grad_enabled() and x.requires_grad and _is_plain_block(block):
        return _written_out_block(block, x, mask)
    if not batch_first:
        return block(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)
    return block(x, attn_mask=mask)


def _is_plain_block(block: nn.Module) -> bool:
    """open_clip's self-attention ``ResidualAttentionBlock`` around a standard packed-projection MHA.

    Anything else (cross-attention blocks with ``ln_1_kv``, separate q/k/v weights, extra
    key/value biases, zero-attention padding, a subclass with its own forward) keeps
    the block's own call, so the written-out path never guesses at a layout.
    """
    from open_clip.transformer import ResidualAttentionBlock

    attn = getattr(block, "attn", None)
    return (type(block) is ResidualAttentionBlock and not hasattr(block, "ln_1_kv")
            and type(attn) is nn.MultiheadAttention and attn._qkv_same_embed_dim
            and attn.bias_k is None and attn.bias_v is None and not attn.add_zero_attn)


def _written_out_block(block: nn.Module, x: torch.Tensor, mask: torch.Tensor | None,
                       delta: Any = None) -> torch.Tensor:
    """``ResidualAttentionBlock.forward`` on batch-first ``x`` (N, L, D), attention spelled out.

    Mirrors open_clip (``ln_1`` -> attention -> ``ls_1`` residual, ``ln_2`` -> MLP -> ``ls_2``
    residual) and ``F.multi_head_attention_forward`` in eval mode (packed in-projection,
    ``scaled_dot_product_attention`` with the mask cast to the tokens' dtype as
    open_clip's ``attention`` does, no dropout since the backbone is in eval mode, output
    projection), with the q/k/v projection as one (N*L, D) x (D, 3D) matmul.

    ``delta`` (LoRA, nearl_core/methods/lora.py) adds ``delta.qkv(y)`` to the packed q/k/v
    projection and ``delta.out(a)`` to the output projection: open_clip's attention has no
    separate projection modules to attach them to.
    """
    attn = block.attn
    n, length, width = x.shape
    heads = attn.num_heads
    y = block.ln_1(x)
    qkv = F.linear(y, attn.in_proj_weight, attn.in_proj_bias)  # (N, L, 3D)
    if delta is not None:
        qkv = qkv + delta.qkv(y)
    q, k, v = qkv.view(n, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)  # (N, h, L, D/h)
    m = mask.to(y.dtype) if mask is not None else None
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=m)  # (N, h, L, D/h)
    a = a.transpose(1, 2).reshape(n, length, width)
    out = F.linear(a, attn.out_proj.weight, attn.out_proj.bias)
    x = x + block.ls_1(out if delta is None else out + delta.out(a))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


# -- layout detection ----------------------------------------------------------------------


def _describe(module: nn.Module | None, inner: str) -> str:
    """``TimmModel(trunk=ConvNeXt)``: the wrapper type and, where present, what it wraps."""
    if module is None:
        return "None"
    wrapped = getattr(module, inner, None)
    name = type(module).__name__
    return f"{name}({inner}={type(wrapped).__name__})" if isinstance(wrapped, nn.Module) else name


def _is_timm_vit(visual: nn.Module) -> bool:
    trunk = getattr(visual, "trunk", None)
    if trunk is None or not isinstance(getattr(visual, "head", None), nn.Module):
        return False
    try:
        from timm.models.vision_transformer import VisionTransformer as TimmViT
    except ImportError:  # pragma: no cover - timm ships with open_clip's timm towers
        return False
    return isinstance(trunk, TimmViT) and hasattr(trunk, "blocks")


def _is_hf_encoder(text: nn.Module) -> bool:
    model = getattr(text, "transformer", None)
    return (
        model is not None
        and hasattr(text, "pooler") and hasattr(text, "proj") and hasattr(text, "config")
        and hasattr(model, "embeddings")
        and isinstance(getattr(getattr(model, "encoder", None), "layer", None), nn.ModuleList)
        and not getattr(text.config, "is_decoder", False)
    )


def towers_of(clip: nn.Module) -> tuple[VisionTower, TextTower]:
    """Inspect a loaded open_clip model and return its tower views, or refuse it."""
    from open_clip.transformer import TextTransformer, VisionTransformer

    visual = getattr(clip, "visual", None)
    text_owner = clip.text if hasattr(clip, "text") else clip
    found = f"visual={_describe(visual, 'trunk')}, text={_describe(getattr(clip, 'text', clip), 'transformer')}"

    if isinstance(visual, VisionTransformer) and getattr(visual, "attn_pool", None) is None:
        vision: VisionTower = NativeVisionTower(visual)
    elif visual is not None and _is_timm_vit(visual):
        vision = TimmVisionTower(visual)
    else:
        raise BackboneError(
            f"unsupported vision tower layout ({found}); NEARL needs an open_clip ViT without attentional "
            "pooling or an open_clip timm tower on a timm VisionTransformer"
        )

    has_causal_text = hasattr(text_owner, "transformer") and hasattr(text_owner.transformer, "resblocks")
    if has_causal_text and not (isinstance(text_owner, TextTransformer) and text_owner.cls_emb is not None):
        text: TextTower = CausalTextTower(text_owner)
    elif _is_hf_encoder(text_owner):
        text = HFTextTower(text_owner)
    else:
        raise BackboneError(
            f"unsupported text tower layout ({found}); NEARL needs open_clip's causal text transformer "
            "or an open_clip Hugging Face encoder with embeddings and encoder.layer (BERT-like)"
        )
    return vision, text
