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

from pathlib import Path

import pytest
import torch
from open_clip.transformer import ResidualAttentionBlock
from opacus.accountants import RDPAccountant
from torch.utils.data import DataLoader, TensorDataset

import nearl_core.towers as towers
from conftest import CLASSES, LAYOUT_MODELS, MODES, TINY_MODELS, images_for, randomize_adapters, tiny_config, tiny_model
from nearl_core.errors import ConfigError
from nearl_core.privacy import PrivateTraining
from nearl_core.train import backward, fit, loss_fn

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


# -- train.checkpoint-backbone ---------------------------------------------------------------
def _saved_bytes(model, images, labels) -> int:
    """Bytes autograd keeps for the backward of one loss (what activation memory is made of)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = loss_fn(model, images, labels, 0.1)
    loss.backward()
    return total


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", TINY_MODELS)
def test_checkpointed_backbone_gives_the_same_logits_and_gradients_with_less_kept(name, mode):
    plain = tiny_model(name, mode)
    ckpt = tiny_model(name, mode, train={"checkpoint-backbone": True})
    for model in (plain, ckpt):
        randomize_adapters(model)
        model.train()
    assert ckpt.vision.checkpoint and ckpt.text.checkpoint and not plain.vision.checkpoint
    images, labels = images_for(plain, BATCH), torch.arange(BATCH) % len(CLASSES)
    logits, grads = _logits_and_grads(ckpt, images, labels)
    plain_logits, plain_grads = _logits_and_grads(plain, images, labels)
    assert torch.equal(logits, plain_logits)  # the forward is the same computation
    _assert_same(grads, plain_grads, "adapter gradients", 1e-6)  # the recomputed blocks give the same values
    assert _saved_bytes(ckpt, images, labels) < 0.8 * _saved_bytes(plain, images, labels)


# -- train.micro-batch ---------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", LAYOUT_MODELS)
def test_micro_batches_give_the_whole_batch_loss_and_gradients(name, mode):
    """Equal up to float rounding: in a float64 model only loss_fn's float32 cross-entropy rounds
    (1e-6); in float32 the different summation order moves gradients by up to about 3e-4 of
    their scale (timm + BERT; 1e-5 on the native towers)."""
    model = tiny_model(name, mode)
    randomize_adapters(model)
    model.train()
    images, labels = images_for(model, 8), torch.arange(8) % len(CLASSES)
    sizes = []
    model.register_forward_pre_hook(lambda module, args: sizes.append(len(args[0])))
    for dtype, rel in ((torch.float64, 1e-6), (torch.float32, 1e-3)):
        model.to(dtype)
        results = {}
        for micro in (0, 3):  # 3: chunks of 3, 3 and 2 images
            model.zero_grad(set_to_none=True)
            loss, logits = backward(model, images.to(dtype), labels, 0.1, micro_batch=micro)
            grads = torch.cat([p.grad.reshape(-1) for p in model.adapters.parameters() if p.grad is not None])
            results[micro] = (loss.reshape(1), logits, grads)
        for what, got, expected in zip(("loss", "logits", "adapter gradients"), results[3], results[0]):
            _assert_same(got, expected, f"{dtype} {what}", rel)
    assert sizes == [8, 3, 3, 2] * 2


def test_fit_runs_the_configured_micro_batches():
    model = tiny_model("nearl-tiny", train={"micro-batch": 2, "batch-size": 5})
    data = TensorDataset(images_for(model, 5), torch.arange(5) % len(CLASSES))
    loader = DataLoader(data, batch_size=model.cfg.train.batch_size)
    sizes = []
    model.register_forward_pre_hook(lambda module, args: sizes.append(len(args[0])) if module.training else None)
    fit(model, loader, model.cfg, torch.device("cpu"), epochs=1, log=None)
    assert sizes == [2, 2, 1]


def test_micro_batch_must_not_be_negative():
    with pytest.raises(ConfigError, match="train.micro-batch"):
        tiny_config(train={"micro-batch": -1})


@pytest.mark.parametrize("noise", [0.0, 0.7])
def test_dp_micro_batches_clip_per_sample_and_add_noise_once(noise):
    """One DP-SGD step over 6 images == the same step in micro-batches of 4 and 2: the same
    clipped per-sample sum, the same noise (drawn once, same seed), one accounted step.
    float64: a float32 weight's rounding (3e-8 at 0.25) would hide a 1e-5 update's details."""
    deltas, steps = {}, {}
    for micro in (0, 4):
        model = tiny_model("nearl-tiny", "shared")
        randomize_adapters(model)
        model.double()
        x, y = images_for(model, 6).double(), torch.arange(6) % len(CLASSES)
        params = [p for p in model.adapters.parameters()]
        before = [p.detach().clone() for p in params]
        acc = RDPAccountant()
        sgd = torch.optim.SGD(params, lr=1.0)  # the update is the noised, clipped mean gradient itself
        with PrivateTraining(model, sgd, noise_multiplier=noise, max_grad_norm=1e-3, sample_rate=0.5,
                             expected_batch_size=6, accountant=acc, noise_seed=3) as dp:
            dp.backward(x, y, 0.1, micro)
            dp.step()
        deltas[micro] = torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(params, before)])
        steps[micro] = sum(n for _, _, n in acc.history)
    assert steps == {0: 1, 4: 1}
    _assert_same(deltas[4], deltas[0], "DP update", 1e-5)  # loss_fn rounds the cross-entropy in float32


# Imported where they are used: a ClientApp process must not pay for them before a message
# needs them (open_clip, torchvision and transformers when a backbone is built, scikit-learn
# when metrics are computed, pydicom when a DICOM file is read).
LAZY_IMPORTS = ("open_clip", "torchvision", "transformers", "timm", "sklearn", "pydicom", "torch._dynamo")


def test_importing_the_client_app_leaves_the_heavy_packages_for_later():
    import subprocess
    import sys

    code = ("import sys, client.app; "
            f"print(' '.join(m for m in {LAZY_IMPORTS!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.split() == [], f"imported by client.app: {out.stdout.strip()}"
