"""Config files: kebab-case YAML into validated frozen dataclasses."""

from __future__ import annotations

import pytest

from nearl_core.config import apply_overrides, load_config
from nearl_core.errors import ConfigError


def test_shipped_configs_load():
    demo = load_config("demo")
    assert demo.model.name == "nearl-tiny" and demo.model.pretrained is None
    assert demo.task.classes == ("normal", "nodule", "opacity")
    vit = load_config("vit-b16")
    assert vit.model.name == "ViT-B-16" and vit.model.pretrained == "openai" and vit.task.classes == ()


def test_prompts_fill_templates():
    cfg = load_config("demo")
    assert cfg.task.prompts() == [[f"a chest x-ray image showing {c}."] for c in cfg.task.classes]


def test_overrides_use_flat_kebab_keys_and_round_trip():
    cfg = apply_overrides(load_config("demo"), {"train.lr": "0.01", "adapter.text-conditioning": "shared"})
    assert cfg.train.lr == 0.01 and cfg.adapter.text_conditioning == "shared"
    assert cfg.flat()["train.lr"] == 0.01
    with pytest.raises(ConfigError, match="unknown config key 'train.learning-rate'"):
        apply_overrides(cfg, {"train.learning-rate": 1})


@pytest.mark.parametrize("yaml_text, message", [
    ("model: {name: x, colour: red}\n", "unknown key 'colour'"),
    ("optimiser: {}\n", "unknown section"),
    ("train: {epochs: many}\n", "train.epochs: expected a int, got 'many'"),
    ("adapter: {text-conditioning: sideways}\n", "text-conditioning must be one of"),
    ("adapter: {width: 30, heads: 4}\n", "must divide adapter.width"),
    ("task: {templates: ['no placeholder']}\n", "must contain '{class}'"),
    ("train: [1, 2]\n", "expected a mapping"),
    ("model: {name: [unclosed\n", "not valid YAML"),
])
def test_bad_config_files_get_one_line_errors(tmp_path, yaml_text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")) as err:
        load_config(path)
    assert "\n" not in str(err.value)


def test_unknown_config_name_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match="config 'nope' not found.*demo.*vit-b16"):
        load_config("nope")
