"""Tower views (nearl_core.towers): layout detection and exactness of the timm + Hugging Face layout.

The core invariants run on every layout in tests/test_model.py; here are the checks that
are specific to a layout: the Hugging Face encoder's padding mask and poolers, refusals
that name the module types found, and DP-SGD's per-sample gradients on the timm + BERT
backbone.
"""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from open_clip.timm_model import TimmModel
from torch import nn
from transformers import AutoConfig, AutoTokenizer

from conftest import CLASSES, MODES, TINY_MODELS, images_for, tiny_model, write_tiny_bert
from nearl_core.backbone import MODEL_CONFIG_DIR, register_shipped_configs
from nearl_core.errors import BackboneError
from nearl_core.privacy import PrivateTraining, clip_per_sample
from nearl_core.towers import (CausalTextTower, HFTextTower, NativeVisionTower, TimmVisionTower, towers_of)
from nearl_core.train import loss_fn, make_optimizer

TIMM_BERT = "nearl-tiny-timm-bert"
EXPECTED_LAYOUT = {
    "nearl-tiny": (NativeVisionTower, CausalTextTower),
    "nearl-tiny-deep-text": (NativeVisionTower, CausalTextTower),
    TIMM_BERT: (TimmVisionTower, HFTextTower),
}
# (vision blocks, text blocks) as the shipped configs in nearl_core/model_configs declare them
EXPECTED_DEPTHS = {"nearl-tiny": (4, 4), "nearl-tiny-deep-text": (2, 3), TIMM_BERT: (3, 2)}


@pytest.mark.parametrize("name", TINY_MODELS)
def test_layout_is_chosen_by_inspecting_the_modules(name):
    model = tiny_model(name)
    vision_cls, text_cls = EXPECTED_LAYOUT[name]
    assert type(model.vision) is vision_cls and type(model.text) is text_cls
    assert (len(model.vision.blocks), len(model.text.blocks)) == EXPECTED_DEPTHS[name]  # every block is found


def test_hf_text_view_needs_the_padding_mask():
    """The exactness tests would notice a missing key-padding mask: without it the shorter
    prompts attend to their padding and the text features move far beyond the 1e-5 tolerance."""
    model = tiny_model(TIMM_BERT).eval()
    p = model._prompts
    assert p.valid.sum(1).unique().numel() > 1  # prompts of different lengths
    assert torch.equal(p.valid, p.tokens != model.clip.text.config.pad_token_id)  # valid == real tokens

    def run(mask_of):
        x = model.text.embed(p.tokens)
        for j in range(len(model.text.blocks)):
            x = model.text.block(j, x, mask_of(p.valid))
        return model.text.head(x, p.eot)

    with torch.no_grad():
        full = model.clip.encode_text(model.full_tokens)
        assert torch.allclose(run(model.text.mask), full, atol=1e-6)
        assert (run(lambda valid: None) - full).abs().max() > 1e-4


@pytest.mark.parametrize("pooler, proj", [
    ("cls_last_hidden_state_pooler", "mlp"),  # BiomedCLIP
    ("cls_pooler", "linear"),  # BERT's own pooler (dense + tanh on [CLS])
    ("mean_pooler", "linear"),  # mean over real tokens
])
def test_hf_text_view_reproduces_open_clip_for_each_pooler(pooler, proj):
    register_shipped_configs()
    text_cfg = {**open_clip.get_model_config(TIMM_BERT)["text_cfg"], "hf_pooler_type": pooler, "hf_proj_type": proj,
                "hf_model_pretrained": False}
    torch.manual_seed(0)
    clip = open_clip.create_model(TIMM_BERT, pretrained_text=False, text_cfg=text_cfg).eval()
    tokenizer = open_clip.get_tokenizer(TIMM_BERT)
    full = tokenizer([f"a chest x-ray image showing {c}." for c in CLASSES] + ["normal"])
    _, text = towers_of(clip)
    p = text.prepare(full)
    assert p.tokens.shape[1] < full.shape[1] and not p.valid.all()
    with torch.no_grad():
        x = text.embed(p.tokens)
        for j in range(len(text.blocks)):
            x = text.block(j, x, text.mask(p.valid))
        ours, reference = text.head(x, p.eot), clip.encode_text(full)
    assert torch.allclose(ours, reference, atol=1e-5), (ours - reference).abs().max()


def test_unsupported_timm_trunk_is_refused_naming_the_types():
    clip = tiny_model("nearl-tiny").clip
    clip.visual = TimmModel("test_convnext", embed_dim=48, image_size=32, pool="avg", proj="linear")
    with pytest.raises(BackboneError, match=r"unsupported vision tower layout \(visual=TimmModel\(trunk=ConvNeXt\)"):
        towers_of(clip)


def test_unsupported_text_encoder_is_refused_naming_the_types():
    clip = tiny_model(TIMM_BERT).clip
    encoder = clip.text
    clip.text = nn.Module()
    clip.text.transformer = nn.Linear(4, 4)  # neither causal resblocks nor embeddings + encoder.layer
    with pytest.raises(BackboneError, match=r"unsupported text tower layout \(.*text=Module\(transformer=Linear\)"):
        towers_of(clip)
    clip.text = encoder
    encoder.config.is_decoder = True  # a causal Hugging Face decoder is not this layout either
    with pytest.raises(BackboneError, match="text=HFTextEncoder"):
        towers_of(clip)


@pytest.mark.parametrize("mode", MODES)
def test_dp_per_sample_gradients_on_timm_bert_equal_single_sample_runs(mode):
    """tests/test_privacy.py's per-sample check, on the timm + Hugging Face layout (float64)."""
    model = tiny_model(TIMM_BERT, mode, train={"device": "cpu"})
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.adapters.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    model = model.double().train()
    x, y = images_for(model, 4).double(), torch.tensor([0, 1, 2, 1])
    lam = model.cfg.adapter.ortho_lambda
    params = list(model.adapters.parameters())
    singles = [torch.autograd.grad(loss_fn(model, x[i:i + 1], y[i:i + 1], lam)[0], params) for i in range(4)]
    per_sample = [torch.stack([s[j] for s in singles]) for j in range(len(params))]
    norms = torch.stack([g.reshape(4, -1).norm(dim=1) for g in per_sample], 1).norm(dim=1)
    clip = float(norms.median())
    expected = clip_per_sample(per_sample, clip)
    with PrivateTraining(model, make_optimizer(model, model.cfg.train), noise_multiplier=0.0, max_grad_norm=clip,
                         sample_rate=0.5, expected_batch_size=4) as dp:
        dp.backward(x, y, lam)
        got = clip_per_sample([p.grad_sample for p in params], clip)
    worst = max(float((a - b).abs().max()) for a, b in zip(got, expected))
    assert worst < 1e-6, worst


def test_shipped_tiny_bert_is_what_the_writer_produces(tmp_path):
    """The shipped files under model_configs/hf/nearl-tiny-bert are conftest.write_tiny_bert's output."""
    shipped = MODEL_CONFIG_DIR / "hf" / "nearl-tiny-bert"
    written = write_tiny_bert(tmp_path / "bert")
    assert sorted(f.name for f in shipped.iterdir()) == sorted(f.name for f in written.iterdir())
    assert all(f.suffix == ".json" for f in shipped.iterdir())  # Flower's app bundle carries only JSON data
    a, b = (json.loads((folder / "config.json").read_text()) for folder in (shipped, written))
    a.pop("transformers_version", None), b.pop("transformers_version", None)
    assert a == b and AutoConfig.from_pretrained(shipped).model_type == "bert"
    assert AutoTokenizer.from_pretrained(shipped).get_vocab() == AutoTokenizer.from_pretrained(written).get_vocab()
    shipped_cfg = json.loads((MODEL_CONFIG_DIR / f"{TIMM_BERT}.json").read_text())
    assert shipped_cfg["text_cfg"]["context_length"] <= a["max_position_embeddings"]
