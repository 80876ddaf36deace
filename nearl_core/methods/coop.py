"""CoOp (as federated in PromptFL): learnable context vectors in the text prompt.

    prompt of class c:  [SOS] v_1 ... v_M  <class c> <suffix> [EOS]   (v_m learnable, shared by all classes)
    prompts ─► frozen text tower ─► class emb ┐
                                              cos ─► logits
    images ─► frozen image tower ─────────────┘

Zhou et al., "Learning to Prompt for Vision-Language Models", IJCV 2022 (arXiv
2109.01134): the words of a hand-written prompt are replaced by M vectors in the token
embedding space, learned end to end through the frozen text tower.  PromptFL (Guo et al.,
"PromptFL: Let Federated Participants Cooperatively Learn Prompts Instead of Models",
IEEE TMC 2023, arXiv 2208.11625) federates exactly these vectors.  As both, we use one
class-agnostic context of M = 16 vectors (``adapter.coop-tokens``), drawn from N(0, 0.02)
(``adapter.coop-init: random``).  The suffix after the class name is the first template's
(``.`` in the shipped configs); the image tower runs without gradient.

``adapter.coop-init: template`` starts the context from the word vectors of the first
template's text before ``{class}`` (M is then that text's token count): with one
template the prompt is that template token for token, so a fresh model is exactly
zero-shot CLIP.  A random context starts elsewhere by design, as in the papers.

The class embeddings depend on the context only, never on an image: they are computed
once per step (once per sample under DP-SGD, so that per-sample hooks see the batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nearl_core.backbone import Backbone
from nearl_core.errors import ConfigError
from nearl_core.methods.base import FrozenCLIP, NearlOutput, frozen_image_features
from nearl_core.towers import TextInputs

PLACEHOLDER = "X"  # CoOp's own placeholder word; one token in CLIP's BPE and in BERT vocabularies


class ContextTokens(nn.Module):
    """The M context vectors, expanded to the batch of its input (a module, for Opacus; see QueryTokens)."""

    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.vectors = nn.Parameter(init.clone())  # (M, D_t)

    def forward(self, like: torch.Tensor) -> torch.Tensor:
        return self.vectors.unsqueeze(0).expand(like.shape[0], -1, -1)  # (Bt, M, D_t)


class CoOpAdapters(nn.Module):
    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.context = ContextTokens(init)


class CoOpCLIP(FrozenCLIP):
    """A frozen CLIP whose class prompts start with M learned context vectors."""

    method = "coop"

    def setup(self, backbone: Backbone) -> None:
        a, task = self.cfg.adapter, self.cfg.task
        prefix, _, suffix = task.templates[0].replace("{modality}", task.modality).partition("{class}")
        init_words = None
        if a.coop_init == "template":  # the prefix's word vectors, between the start and the end token
            tokens = _tokenize(backbone, [prefix.strip()])
            end = int(self.text.prepare(tokens, trim=False).eot[0])
            if end < 2:
                raise ConfigError("adapter.coop-init template needs words before {class} in the first template")
            init_words, m = self.text.word_embed(tokens)[0, 1:end].detach(), end - 1
        else:
            m = a.coop_tokens
        names = [c.replace("_", " ") for c in self.classes]
        tokens = _tokenize(backbone, [" ".join([PLACEHOLDER] * m + [name]) + suffix for name in names])
        one = _tokenize(backbone, [PLACEHOLDER])[0, 1]  # the placeholder's token id
        if not bool((tokens[:, 1:m + 1] == one).all()):
            raise ConfigError(f"coop: the tokenizer does not give one token per placeholder '{PLACEHOLDER}'")
        self._coop = self.text.prepare(tokens)  # (C, T): trimmed like every prompt here
        self.context_tokens = m
        if init_words is None:
            init_words = torch.randn(m, self.text.width) * 0.02  # CoOp's initialisation
        self.adapters = CoOpAdapters(init_words)

    @property
    def shared_text(self) -> bool:
        return True

    def dimensions(self) -> dict:
        return {"context_tokens": self.context_tokens, "init": self.cfg.adapter.coop_init, **super().dimensions()}

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        p = self._coop
        self._coop = TextInputs(fn(p.tokens), fn(p.eot), fn(p.valid))
        return out

    def class_embeddings(self, batch: int = 1) -> torch.Tensor:
        """(Bt, C, E) class embeddings under the current context; ``batch`` copies for per-sample hooks."""
        p, m = self._coop, self.context_tokens
        words = self.text.word_embed(p.tokens)  # (C, T, D_t), frozen
        c, t, d = words.shape
        ctx = self.adapters.context(words.new_zeros(batch, 1))  # (Bt, M, D_t)
        words = words.unsqueeze(0).expand(batch, c, t, d)
        words = torch.cat([words[:, :, :1], ctx.unsqueeze(1).expand(batch, c, m, d), words[:, :, m + 1:]], dim=2)
        x = self.text.embed_words(words.reshape(batch * c, t, d)).reshape(batch, c, t, d)
        valid = p.valid.repeat(batch, 1)
        for j in range(len(self.text.blocks)):
            x = self.text.block(j, x.reshape(batch * c, t, d), self.text.mask(valid)).reshape(batch, c, t, d)
        emb = self.text.head(x.reshape(batch * c, t, d), p.eot.repeat(batch))
        return F.normalize(emb, dim=-1).reshape(batch, c, -1)

    def forward(self, images: torch.Tensor) -> NearlOutput:
        """images: (B, 3, H, W) preprocessed -> class logits (B, C)."""
        image_emb = F.normalize(frozen_image_features(self, images), dim=-1)  # (B, E)
        class_emb = self.class_embeddings(len(images) if self.per_sample_text else 1)
        return self._output(self._logits(image_emb, class_emb))


def _tokenize(backbone: Backbone, texts: list[str]) -> torch.Tensor:
    return backbone.tokenizer(texts)
