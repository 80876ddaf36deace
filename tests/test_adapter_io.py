"""Adapter-only state: exactly the adapter tensors, saved, reloaded and checked."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import CLASSES, LAYOUT_MODELS, images_for, randomize_adapters, tiny_model
from nearl_core.adapter_io import (META_FILE, WEIGHTS_FILE, adapter_schema, get_adapter_state, load_adapters,
                                   read_adapters, save_adapters, set_adapter_state)
from nearl_core.backbone import build_backbone
from nearl_core.errors import AdapterFileError
from nearl_core.model import build_model


def test_state_holds_exactly_the_trainable_tensors():
    model = tiny_model()
    state = get_adapter_state(model)
    trainable = {n.removeprefix("adapters.") for n, p in model.named_parameters() if p.requires_grad}
    assert set(state) == trainable
    assert sum(v.numel() for v in state.values()) == sum(p.numel() for p in model.adapters.parameters())
    assert set(adapter_schema(model)) == trainable


@pytest.mark.parametrize("name", LAYOUT_MODELS)  # one model per tower layout
def test_round_trip_gives_identical_logits(name, tmp_path):
    model = tiny_model(name)
    randomize_adapters(model)
    save_adapters(model, tmp_path / "a")
    fresh = tiny_model(name, seed=0)  # same backbone seed, zero-init adapters
    x = images_for(model, 3)
    with torch.no_grad():
        before = fresh(x).logits
        load_adapters(fresh, tmp_path / "a")
        assert torch.equal(model(x).logits, fresh(x).logits)
    assert not torch.equal(before, fresh(x).logits)
    meta = json.loads((tmp_path / "a" / META_FILE).read_text())
    assert meta["backbone"] == name and meta["classes"] == list(CLASSES)
    assert meta["backbone_source"] == "random-init" and meta["config"]["adapter"]["rank"] == 24
    assert meta["templates"] and meta["version"]


def test_mismatched_backbone_is_refused(tmp_path):
    save_adapters(tiny_model("nearl-tiny"), tmp_path / "a")
    other = tiny_model("nearl-tiny-deep-text")
    with pytest.raises(AdapterFileError, match="trained on backbone 'nearl-tiny'.*nearl-tiny-deep-text"):
        load_adapters(other, tmp_path / "a")


def test_mismatched_classes_are_refused(tmp_path):
    model = tiny_model()
    save_adapters(model, tmp_path / "a")
    other = build_model(model.cfg, ("nodule", "normal", "opacity"), backbone=build_backbone(model.cfg.model))
    with pytest.raises(AdapterFileError, match="is for classes .*same order"):
        load_adapters(other, tmp_path / "a")


def test_other_backbone_weights_are_refused(tmp_path):
    model = tiny_model()
    save_adapters(model, tmp_path / "a")
    state, meta = read_adapters(tmp_path / "a")
    meta["backbone_source"] = "sha256:abc"
    (tmp_path / "a" / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(AdapterFileError, match="backbone weights sha256:abc"):
        load_adapters(model, tmp_path / "a")


def test_shape_mismatch_and_missing_tensors_are_refused():
    model = tiny_model()
    state = get_adapter_state(model)
    name = next(iter(state))
    with pytest.raises(AdapterFileError, match="missing"):
        set_adapter_state(model, {k: v for k, v in state.items() if k != name})
    bad = dict(state)
    bad[name] = torch.zeros(7, 7)
    with pytest.raises(AdapterFileError, match=f"'{name}' has shape"):
        set_adapter_state(model, bad)


def test_existing_adapters_are_not_overwritten_silently(tmp_path):
    model = tiny_model()
    save_adapters(model, tmp_path)
    with pytest.raises(AdapterFileError, match="already exists.*--overwrite"):
        save_adapters(model, tmp_path)
    save_adapters(model, tmp_path, overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_missing_and_corrupt_files_give_one_line_errors(tmp_path):
    with pytest.raises(AdapterFileError, match="not found") as err:
        read_adapters(tmp_path / "nowhere")
    assert "\n" not in str(err.value)
    save_adapters(tiny_model(), tmp_path / "a")
    (tmp_path / "a" / WEIGHTS_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterFileError, match="corrupt"):
        read_adapters(tmp_path / "a")
