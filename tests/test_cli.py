"""The ``nearl`` command line: what a hospital engineer types, and what they see."""

from __future__ import annotations

import json
import shutil

import pytest

from nearl_core.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_params_json_counts_the_models_adapter_tensors(capsys):
    """The JSON report against a direct count on the same model (the ViT-B-16 budget is test_model's)."""
    from tests.conftest import tiny_model

    code, out, _ = run(capsys, "params", "--config", "demo", "--json")
    assert code == 0
    report = json.loads(out)
    model = tiny_model("nearl-tiny")
    trainable = sum(p.numel() for p in model.adapters.parameters())
    assert report["trainable"] == trainable
    assert report["total"] == sum(p.numel() for p in model.parameters())
    assert report["payload_bytes"] == 4 * trainable


def test_params_table(capsys):
    code, out, _ = run(capsys, "params", "--config", "demo")
    assert code == 0 and "USEformer" in out and "OCA, text tower" in out and "payload" in out


def test_check_data_prints_counts(capsys, demo_root):
    code, out, _ = run(capsys, "check-data", "--data", str(demo_root / "site1"))
    assert code == 0
    assert "OK" in out and "normal" in out and "total" in out


@pytest.mark.parametrize("case, message", [("missing", "does not exist"), ("unknown-class", "unknown class 'cat'")])
def test_bad_site_folder_is_one_line_exit_2(capsys, demo_root, tmp_path, case, message):
    site = tmp_path / "site"
    if case == "unknown-class":  # a real site plus a class folder the demo config does not declare
        shutil.copytree(demo_root / "site1", site)
        (site / "train" / "cat").mkdir()
        shutil.copy(next((site / "train" / "normal").iterdir()), site / "train" / "cat" / "x.png")
    code, _, err = run(capsys, "check-data", "--data", str(site), "--config", "demo")
    assert code == 2
    assert message in err and err.count("\n") == 1 and err.startswith("nearl check-data: error:")


def test_bad_set_override_is_reported(capsys, demo_root):
    code, _, err = run(capsys, "check-data", "--data", str(demo_root / "site1"), "--set", "train.lr")
    assert err == "nearl check-data: error: --set train.lr: expected KEY=VALUE, e.g. --set train.lr=0.001\n"
    assert code == 2


def _modality_site(root, demo_root):
    """A site whose class folders are not the demo's: ct, fundus, histology (demo images, renamed classes)."""
    for split in ("train", "val", "test"):
        for new, old in (("ct", "normal"), ("fundus", "nodule"), ("histology", "opacity")):
            shutil.copytree(demo_root / "site1" / split / old, root / split / new)
    return root


def test_without_a_config_the_classes_come_from_the_folders(capsys, demo_root, tmp_path):
    site = _modality_site(tmp_path / "site", demo_root)
    code, out, _ = run(capsys, "check-data", "--data", str(site))
    assert code == 0 and "classes ct, fundus, histology" in out
    assert f"classes from {site / 'train'} (sorted folder names): ct, fundus, histology" in out
    code, _, err = run(capsys, "check-data", "--data", str(site), "--config", "demo")  # a config that names them wins
    assert code == 2 and "unknown class 'ct'" in err
    code, out, _ = run(capsys, "check-data", "--data", str(site), "--set", "task.classes=ct,fundus,histology,mri")
    assert code == 0 and "no training images of mri" in out


def test_data_holding_the_default_configs_classes_keeps_their_order(capsys, demo_root):
    """The demo's order (normal, nodule, opacity), which its federation uses, not the sorted one."""
    code, out, _ = run(capsys, "check-data", "--data", str(demo_root / "site1"))
    assert code == 0 and "classes normal, nodule, opacity" in out and "classes from" not in out


@pytest.mark.slow
def test_nearl_train_on_own_classes_without_a_config(capsys, demo_root, tmp_path):
    site = _modality_site(tmp_path / "site", demo_root)
    code, out, err = run(capsys, "train", "--data", str(site), "--out", str(tmp_path / "a"), "--epochs", "1")
    assert code == 0, err
    assert "ct, fundus, histology" in out and "adapters saved" in out
    meta = json.loads((tmp_path / "a" / "adapters.json").read_text())
    assert meta["classes"] == ["ct", "fundus", "histology"]


def test_train_evaluate_predict_round_trip(capsys, tmp_path, demo_root):
    out_dir = tmp_path / "adapters"
    site = str(demo_root / "site1")
    code, out, _ = run(capsys, "train", "--data", site, "--out", str(out_dir), "--epochs", "1")
    assert code == 0 and "zero-shot" in out and "adapters saved" in out
    assert (out_dir / "adapters.safetensors").is_file() and (out_dir / "metrics.json").is_file()

    code, _, err = run(capsys, "train", "--data", site, "--out", str(out_dir), "--epochs", "1")
    assert code == 2 and "--overwrite" in err  # nothing is overwritten silently

    code, out, _ = run(capsys, "evaluate", "--adapters", str(out_dir), "--data", site, "--json")
    metrics = json.loads(out[out.index("{"):])
    saved = json.loads((out_dir / "metrics.json").read_text())["NEARL"]
    assert code == 0 and metrics["accuracy"] == pytest.approx(saved["accuracy"])

    image = next((demo_root / "site1" / "test" / "nodule").iterdir())
    code, out, _ = run(capsys, "predict", "--adapters", str(out_dir), str(image), "--json")
    rows = json.loads(out)
    probs = rows[0]["probabilities"]
    assert code == 0 and set(probs) == {"normal", "nodule", "opacity"}
    assert probs[rows[0]["class"]] == max(probs.values())  # the reported class is the most probable one
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-3)


def test_demo_data_refuses_to_overwrite(capsys, tmp_path):
    assert run(capsys, "demo-data", "--out", str(tmp_path), "--sites", "1")[0] == 0
    code, _, err = run(capsys, "demo-data", "--out", str(tmp_path), "--sites", "1")
    assert code == 2 and "--overwrite" in err
