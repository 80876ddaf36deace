"""Adapter-only state: exactly the adapter tensors, saved, reloaded and checked."""

from __future__ import annotations

import hashlib
import json
import warnings

import pytest
import torch

from conftest import CLASSES, LAYOUT_MODELS, images_for, randomize_adapters, tiny_model
from nearl_core.adapter_io import (CHECKSUM_KEY, META_FILE, WEIGHTS_FILE, adapter_schema, get_adapter_state, load_adapters,
                                   read_adapters, save_adapters, set_adapter_state)
from nearl_core.backbone import build_backbone
from nearl_core.errors import AdapterFileError, UncheckedAdapterWarning
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
    with pytest.raises(AdapterFileError, match="is corrupt: its sha256"):
        read_adapters(tmp_path / "a")
    (tmp_path / "a" / META_FILE).write_text("{not json")
    with pytest.raises(AdapterFileError, match="adapter files are corrupt"):
        read_adapters(tmp_path / "a")


def flip_last_byte(path) -> None:
    """Damage a tensor value, not the header: the file still parses as safetensors."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def test_metadata_records_the_sha256_of_the_weights(tmp_path):
    save_adapters(tiny_model(), tmp_path / "a")
    meta = json.loads((tmp_path / "a" / META_FILE).read_text())
    assert meta[CHECKSUM_KEY] == hashlib.sha256((tmp_path / "a" / WEIGHTS_FILE).read_bytes()).hexdigest()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a checked folder loads without any warning
        read_adapters(tmp_path / "a")


def test_flipped_byte_is_refused_by_checksum(tmp_path):
    save_adapters(tiny_model(), tmp_path / "a")
    weights = tmp_path / "a" / WEIGHTS_FILE
    flip_last_byte(weights)
    from safetensors.torch import load_file
    assert load_file(str(weights))  # still a valid file: only the checksum notices
    with pytest.raises(AdapterFileError) as err:
        read_adapters(tmp_path / "a")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{weights} is corrupt: its sha256 is ")
    assert message.endswith("copy the adapter folder again from where it was written, or retrain")


def test_folder_without_checksum_loads_with_a_warning(tmp_path):
    model = tiny_model()
    randomize_adapters(model)
    save_adapters(model, tmp_path / "a")
    meta_file = tmp_path / "a" / META_FILE
    meta = json.loads(meta_file.read_text())
    del meta[CHECKSUM_KEY]  # as written before checksums existed
    meta_file.write_text(json.dumps(meta))
    fresh = tiny_model()
    with pytest.warns(UncheckedAdapterWarning, match=r"records no sha256 of adapters\.safetensors"):
        load_adapters(fresh, tmp_path / "a")
    assert all(torch.equal(v, get_adapter_state(model)[k]) for k, v in get_adapter_state(fresh).items())
    (tmp_path / "a" / WEIGHTS_FILE).write_bytes(b"not a safetensors file")
    with pytest.warns(UncheckedAdapterWarning), pytest.raises(AdapterFileError, match="corrupt.*re-export"):
        read_adapters(tmp_path / "a")


def test_metadata_that_is_not_an_object_is_corrupt(tmp_path):
    save_adapters(tiny_model(), tmp_path / "a")
    (tmp_path / "a" / META_FILE).write_text("[1, 2]")
    with pytest.raises(AdapterFileError, match=r"adapter files are corrupt \(adapters.json holds a JSON list"):
        read_adapters(tmp_path / "a")
