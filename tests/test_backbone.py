"""Backbone loading: random init, local checkpoint files, tags that cannot be fetched."""

from __future__ import annotations

import json
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


# -- hub models from a local folder (BiomedCLIP at a site without internet) ----------------
BIOMEDCLIP = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"


def _biomedclip_like_folder(folder, seed=123):
    """What docs/architecture.md tells an offline site to copy, for a tiny timm + BERT CLIP.

    The text encoder is named by a hub id, as in BiomedCLIP's own open_clip_config.json:
    with HF_HUB_OFFLINE=1 set, building only succeeds if everything comes from the folder.
    """
    from conftest import write_tiny_bert

    register_shipped_configs()
    model_cfg = open_clip.get_model_config("nearl-tiny-timm-bert")
    hub_text = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
    model_cfg["text_cfg"].update(hf_model_name=hub_text, hf_tokenizer_name=hub_text)
    folder.mkdir(parents=True)
    (folder / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": model_cfg, "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}))
    torch.manual_seed(seed)
    source = open_clip.create_model("nearl-tiny-timm-bert", pretrained_text=False)
    torch.save(source.state_dict(), folder / "open_clip_pytorch_model.bin")
    write_tiny_bert(folder)
    return folder, source


def test_hub_model_loads_from_a_local_folder_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder, source = _biomedclip_like_folder(tmp_path / "biomedclip")
    bb = build_backbone(ModelConfig(name=BIOMEDCLIP, pretrained=str(folder)))
    assert bb.name == BIOMEDCLIP  # the hub name is kept: adapters stay comparable across sites
    assert bb.source == f"sha256:{file_sha256(folder / 'open_clip_pytorch_model.bin')}"
    for (name, a), b in zip(source.state_dict().items(), bb.clip.state_dict().values()):
        assert torch.equal(a, b), name
    assert not any(p.requires_grad for p in bb.clip.parameters())
    tokens = bb.tokenizer(["a chest x-ray image showing nodule."])
    assert tokens.shape == (1, 32) and tokens[0, 0] != tokens[0, -1]  # [CLS] ... [PAD]


@pytest.mark.parametrize("remove, named", [
    ("open_clip_config.json", "open_clip_config.json"),
    ("open_clip_pytorch_model.bin", "open_clip_pytorch_model.bin"),
    ("config.json", "config.json"),
    ("tokenizer.json", "tokenizer.json or vocab.txt"),
])
def test_a_model_folder_missing_a_file_fails_fast_naming_it(tmp_path, monkeypatch, remove, named):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder, _ = _biomedclip_like_folder(tmp_path / "biomedclip")
    (folder / remove).unlink()
    start = time.perf_counter()
    with pytest.raises(BackboneError) as err:
        build_backbone(ModelConfig(name=BIOMEDCLIP, pretrained=str(folder)))
    assert time.perf_counter() - start < 2
    message = str(err.value)
    assert named in message and str(folder) in message and "docs/architecture.md" in message
    assert "\n" not in message


def test_hub_model_offline_without_a_folder_says_how_to_give_one(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneError, match="HF_HUB_OFFLINE.*model.pretrained to a local folder"):
        build_backbone(ModelConfig(name=BIOMEDCLIP))


def test_a_folder_for_a_registered_model_is_refused(tmp_path):
    with pytest.raises(BackboneError, match="is a folder; for 'nearl-tiny' give the checkpoint file"):
        build_backbone(ModelConfig(name="nearl-tiny", pretrained=str(tmp_path)))


def test_timm_bert_random_init_is_the_same_in_every_process():
    """The Ray workers of a simulation build the timm + BERT backbone on their own."""
    a = build_backbone(ModelConfig(name="nearl-tiny-timm-bert")).clip.state_dict()
    torch.manual_seed(7)
    b = build_backbone(ModelConfig(name="nearl-tiny-timm-bert")).clip.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_hub_weights_provenance_is_the_file_hash_a_local_copy_gets(tmp_path, monkeypatch):
    """A site online (hub cache) and a site on a copied folder record the same backbone_source."""
    import huggingface_hub

    from nearl_core.backbone import _hub_weights_source

    weights = tmp_path / "open_clip_pytorch_model.bin"
    weights.write_bytes(b"not really weights")
    cached = {("org/model", "open_clip_pytorch_model.bin"): str(weights)}
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: cached.get((repo, name)))
    assert _hub_weights_source("org/model") == f"sha256:{file_sha256(weights)}"
    assert _hub_weights_source("org/other") == "hf-hub:org/other"  # nothing cached: the name, as before
