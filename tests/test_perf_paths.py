"""Faster and leaner training paths give the plain path's results.

* frozen open_clip blocks written out when gradients flow through them
  (nearl_core.towers._written_out_block) vs the blocks' own call;
* ``train.checkpoint-backbone`` (frozen blocks recomputed in the backward pass) and
  ``train.micro-batch`` (gradient accumulation), with and without DP-SGD, vs one plain
  step on the whole batch;
* the imports a ClientApp process pays before any message arrives.

Timing and memory targets live in bench/, not here.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from open_clip.transformer import ResidualAttentionBlock

import nearl_core.towers as towers
from conftest import CLASSES, MODES, TINY_MODELS, images_for, randomize_adapters, tiny_model
from nearl_core.train import loss_fn

BATCH = 4


def _logits_and_grads(model, images, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and the flat adapter gradient of one loss (cross-entropy + orthogonal term)."""
    model.zero_grad(set_to_none=True)
    loss, logits = loss_fn(model, images, labels, 0.1)
    loss.backward()
    grads = [p.grad.reshape(-1) for p in model.adapters.parameters() if p.grad is not None]
    return logits.detach(), torch.cat(grads)


def _assert_same(a: torch.Tensor, b: torch.Tensor, what: str, rel: float) -> None:
    """Equal up to ``rel`` times the tensor's scale (so near-zero entries are judged by the scale)."""
    scale = b.abs().max().item()
    assert scale > 0, f"{what}: all zero, the comparison would prove nothing"
    assert (a - b).abs().max().item() <= rel * scale, f"{what} differs beyond rounding"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", TINY_MODELS)
def test_written_out_blocks_give_the_blocks_logits_and_gradients(name, mode, monkeypatch):
    """In float64 the two paths agree to 1e-15 of the gradients' scale; a wrong mask, scale or
    head split would move them by orders of magnitude more.  In float32 both paths sit about
    5e-7 from the float64 values (gradient scale 2e-2), in different directions."""
    model = tiny_model(name, mode)
    randomize_adapters(model)
    model.train()
    images, labels = images_for(model, BATCH), torch.arange(BATCH) % len(CLASSES)
    calls = []
    written_out = towers._written_out_block
    monkeypatch.setattr(towers, "_written_out_block", lambda *a: calls.append(1) or written_out(*a))
    results = {}
    for dtype in (torch.float64, torch.float32):
        model.to(dtype)
        results[dtype] = _logits_and_grads(model, images.to(dtype), labels)
    native = any(isinstance(b, ResidualAttentionBlock) for b in model.vision.blocks + model.text.blocks)
    assert bool(calls) == native  # open_clip's own blocks are written out; timm / HF blocks keep their call
    monkeypatch.setattr(towers, "_is_plain_block", lambda block: False)  # every block through its own call
    for dtype, rel in ((torch.float64, 1e-12), (torch.float32, 1e-4)):
        model.to(dtype)
        logits, grads = _logits_and_grads(model, images.to(dtype), labels)
        _assert_same(results[dtype][0], logits, f"{dtype} logits", rel)
        _assert_same(results[dtype][1], grads, f"{dtype} adapter gradients", rel)


def test_inference_keeps_the_blocks_own_call(monkeypatch):
    model = tiny_model("nearl-tiny")
    randomize_adapters(model)
    model.eval()
    monkeypatch.setattr(towers, "_written_out_block", lambda *a: pytest.fail("written out without gradients"))
    with torch.no_grad():
        model(images_for(model, 2))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_written_out_block_matches_open_clip_block(batch_first, causal):
    """Both memory layouts open_clip builds, with and without the text tower's causal mask."""
    torch.manual_seed(0)
    block = ResidualAttentionBlock(32, 4, ls_init_value=0.5, batch_first=batch_first).eval()
    for p in block.parameters():
        p.requires_grad_(False)
    x = torch.randn(3, 7, 32, requires_grad=True)  # batch-first, as the tower views hand it
    mask = torch.full((7, 7), float("-inf")).triu(1) if causal else None
    out = towers._run_block(block, x, mask, batch_first)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    ref_in = x if batch_first else x.transpose(0, 1)
    ref = block(ref_in, attn_mask=mask)
    ref = ref if batch_first else ref.transpose(0, 1)
    (ref_grad,) = torch.autograd.grad(ref.square().sum(), x)
    assert towers._is_plain_block(block)
    _assert_same(out.detach(), ref.detach(), "block output", 1e-6)
    _assert_same(grad, ref_grad, "input gradient", 1e-6)


def test_blocks_that_are_not_plain_keep_their_own_call():
    cross = ResidualAttentionBlock(16, 2, is_cross_attention=True)
    extra_bias = ResidualAttentionBlock(16, 2)
    extra_bias.attn = torch.nn.MultiheadAttention(16, 2, add_bias_kv=True, batch_first=True)
    assert not towers._is_plain_block(cross)
    assert not towers._is_plain_block(extra_bias)
