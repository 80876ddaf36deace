"""NEARL's trainable parts: the USEformer and the Orthogonal Cross-Attention Adapters.

Every module here takes batch-first inputs and never mixes samples (no batch norm, no
batch-level context), so per-sample gradients, and hence DP-SGD, are well defined.
Attention uses ``scaled_dot_product_attention`` over ``nn.Linear`` projections rather
than ``nn.MultiheadAttention`` (which Opacus would replace).  See docs/architecture.md
for the equations and which choices are ours rather than the paper's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class QueryTokens(nn.Module):
    """The M learnable synergy queries, expanded to the batch of its input.

    Kept as its own module whose forward takes a batch-first tensor: Opacus computes
    per-sample gradients per module, and a bare parameter beside the frozen backbone
    would make it refuse the model.
    """

    def __init__(self, num: int, width: int):
        super().__init__()
        self.tokens = nn.Parameter(torch.randn(num, width) * width**-0.5)

    def forward(self, like: torch.Tensor) -> torch.Tensor:
        return self.tokens.unsqueeze(0).expand(like.shape[0], -1, -1)  # (B, M, d)


class ScaleGate(nn.Module):
    """Learnable scalar gate g_k on an OCA update (starts at 1; the projection starts at 0)."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head attention on already projected q (B, Nq, r), k/v (B, Nk, r)."""
    b, nq, r = q.shape
    split = lambda t: t.reshape(b, t.shape[1], heads, r // heads).transpose(1, 2)  # (B, h, N, r/h)
    out = F.scaled_dot_product_attention(split(q), split(k), split(v))  # (B, h, Nq, r/h)
    return out.transpose(1, 2).reshape(b, nq, r)


class USEBlock(nn.Module):
    """One USEformer layer: queries cross-attend to image tokens and pooled class text.

    Context = [image tokens projected to d ; per-class pooled text projected to d].
    In ``shared`` text mode the text branch calls it with no image tokens.
    """

    def __init__(self, width: int, heads: int, vision_width: int, text_width: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.ctx_vision = nn.Sequential(nn.LayerNorm(vision_width), nn.Linear(vision_width, width))
        self.ctx_text = nn.Sequential(nn.LayerNorm(text_width), nn.Linear(text_width, width))
        self.ln_q = nn.LayerNorm(width)
        self.ln_ctx = nn.LayerNorm(width)
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))
        hidden = int(width * mlp_ratio)
        self.ln_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, z: torch.Tensor, image_tokens: torch.Tensor | None, class_text: torch.Tensor) -> torch.Tensor:
        # z: (B, M, d); image_tokens: (B, N_v, D_v) or None; class_text: (B, C, D_t)
        parts = [self.ctx_text(class_text)]  # (B, C, d)
        if image_tokens is not None:
            parts.insert(0, self.ctx_vision(image_tokens))  # (B, N_v, d)
        ctx = self.ln_ctx(torch.cat(parts, dim=1))  # (B, N_v + C, d)
        zq = self.ln_q(z)
        z = z + self.o(_attend(self.q(zq), self.k(ctx), self.v(ctx), self.heads))
        return z + self.mlp(self.ln_mlp(z))  # (B, M, d)


class OCA(nn.Module):
    """Orthogonal Cross-Attention Adapter for one tower layer.

    Tokens (queries, through a rank-r bottleneck) attend to the synergy queries Z.  The
    update dX is split per token by one Gram-Schmidt step into the part parallel to the
    token and the orthogonal remainder; only the remainder is added.  The output
    projection starts at zero, so a fresh adapter leaves the token unchanged.
    """

    def __init__(self, dim: int, query_width: int, rank: int, heads: int, eps: float):
        super().__init__()
        self.heads, self.eps = heads, eps
        self.ln = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, rank)
        self.k = nn.Linear(query_width, rank)
        self.v = nn.Linear(query_width, rank)
        self.out = nn.Linear(rank, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.gate = ScaleGate()

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, N, D) tokens, z: (B, M, d) queries -> (updated x, mean cos^2(dX, x))."""
        dx = self.out(_attend(self.q(self.ln(x)), self.k(z), self.v(z), self.heads))  # (B, N, D)
        dot = (dx * x).sum(-1, keepdim=True)  # (B, N, 1)
        xx = (x * x).sum(-1, keepdim=True)
        perp = dx - dot / (xx + self.eps) * x  # orthogonal to x, per token
        cos2 = dot.squeeze(-1) ** 2 / (xx.squeeze(-1) * (dx * dx).sum(-1) + self.eps)  # (B, N)
        return x + self.gate(perp), cos2.mean()
