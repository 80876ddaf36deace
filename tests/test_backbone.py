"""Backbone loading: random init, local checkpoint files, tags that cannot be fetched."""

from __future__ import annotations

import time

import open_clip
import pytest
import torch

from nearl_core.backbone import build_backbone, file_sha256, register_shipped_configs
from nearl_core.config import ModelConfig
from nearl_core.errors import BackboneError


def test_random_init_backbone_is_frozen_and_in_eval_mode():
    bb = build_backbone(ModelConfig(name="nearl-tiny"))
    assert bb.source == "random-init"
    assert not any(p.requires_grad for p in bb.clip.parameters())
    assert not bb.clip.training
    assert bb.tokenizer(["a test"]).shape == (1, 77)


def test_local_checkpoint_file_is_loaded_and_hashed(tmp_path):
    register_shipped_configs()
    torch.manual_seed(123)
    source = open_clip.create_model("nearl-tiny")
    ckpt = tmp_path / "tiny.pt"
    torch.save(source.state_dict(), ckpt)
    bb = build_backbone(ModelConfig(name="nearl-tiny", pretrained=str(ckpt)))
    assert bb.source == f"sha256:{file_sha256(ckpt)}"
    for (name, a), b in zip(source.state_dict().items(), bb.clip.state_dict().values()):
        assert torch.equal(a, b), name


def test_checkpoint_for_another_architecture_is_refused(tmp_path):
    register_shipped_configs()
    ckpt = tmp_path / "other.pt"
    torch.save(open_clip.create_model("nearl-tiny-deep-text").state_dict(), ckpt)
    with pytest.raises(BackboneError, match="does not fit model 'nearl-tiny'"):
        build_backbone(ModelConfig(name="nearl-tiny", pretrained=str(ckpt)))


def test_unreachable_tag_fails_fast_with_a_remedy(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(BackboneError) as err:
        build_backbone(ModelConfig(name="ViT-B-16", pretrained="openai"))
    assert time.perf_counter() - start < 10
    message = str(err.value)
    assert "ViT-B-16/openai" in message and "local file" in message and "\n" not in message


def test_unknown_tag_missing_file_and_unknown_model_are_named():
    with pytest.raises(BackboneError, match="no pretrained tag 'nonsense'.*openai"):
        build_backbone(ModelConfig(name="ViT-B-16", pretrained="nonsense"))
    with pytest.raises(BackboneError, match="checkpoint file /no/such/file.pt not found"):
        build_backbone(ModelConfig(name="ViT-B-16", pretrained="/no/such/file.pt"))
    with pytest.raises(BackboneError, match="unknown open_clip model 'ViT-Q-99'"):
        build_backbone(ModelConfig(name="ViT-Q-99"))


def test_random_init_is_the_same_in_every_process_and_keeps_the_callers_rng():
    """Server, sites and Ray workers each build the backbone: random init must agree."""
    torch.manual_seed(1)
    a = build_backbone(ModelConfig(name="nearl-tiny")).clip.state_dict()
    after_first = torch.rand(1)
    torch.manual_seed(2)
    b = build_backbone(ModelConfig(name="nearl-tiny")).clip.state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    torch.manual_seed(1)
    build_backbone(ModelConfig(name="nearl-tiny"))
    assert torch.equal(torch.rand(1), after_first)  # the caller's random stream is untouched
