"""Synthetic multi-site demo data: layout, determinism, site shifts, class signal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nearl_core.data import scan_site
from nearl_core.demo_data import (
    DEMO_CLASSES,
    allocate_counts,
    generate_demo_data,
    site_profile,
)
from nearl_core.errors import DataError

ARGS = dict(train_per_site=60, val_per_site=9, test_per_site=6, image_size=64, seed=3)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, list[Path]]:
    out = tmp_path_factory.mktemp("demo")
    return out, generate_demo_data(out, 3, **ARGS)


def images(site: Path, split: str, name: str) -> np.ndarray:
    files = sorted((site / split / name).glob("*.png"))
    return np.stack([np.asarray(Image.open(f)) for f in files]).astype(np.float64)


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_is_a_valid_site(demo):
    out, sites = demo
    assert sites == [out / "site1", out / "site2", out / "site3"]
    for site_dir in sites:
        site = scan_site(site_dir, DEMO_CLASSES, verify=True)
        assert site.classes == DEMO_CLASSES
        # every class folder exists (even if empty), so inference finds all classes,
        # sorted alphabetically: configs should list DEMO_CLASSES to keep this order
        assert scan_site(site_dir, verify=False).classes == tuple(sorted(DEMO_CLASSES))
        counts = site.counts()
        assert {split: sum(c.values()) for split, c in counts.items()} == {
            "train": 60, "val": 9, "test": 6,
        }
        for split in ("val", "test"):
            assert min(counts[split].values()) >= 1, (site_dir, split, counts[split])
        assert min(counts["train"].values()) >= 5
    with Image.open(next((sites[0] / "train" / "normal").glob("*.png"))) as image:
        assert image.mode == "L" and image.size == (64, 64) and image.format == "PNG"


def test_readme_says_synthetic(demo):
    out, _ = demo
    text = (out / "README.md").read_text()
    assert "SYNTHETIC" in text
    assert "no real patient" in text
    for name in DEMO_CLASSES:
        assert f"`{name}`" in text
    assert "| site1 |" in text and "| site3 |" in text
    assert "Dirichlet" in text


def test_same_arguments_give_identical_bytes(demo, tmp_path):
    out, _ = demo
    generate_demo_data(tmp_path / "again", 3, **ARGS)
    assert all_files(tmp_path / "again") == all_files(out)


def test_other_seed_gives_other_images(tmp_path):
    small = dict(train_per_site=6, val_per_site=3, test_per_site=0, image_size=32)
    generate_demo_data(tmp_path / "a", 1, seed=1, **small)
    generate_demo_data(tmp_path / "b", 1, seed=2, **small)
    first = {k: v for k, v in all_files(tmp_path / "a").items() if k.endswith(".png")}
    second = {k: v for k, v in all_files(tmp_path / "b").items() if k.endswith(".png")}
    assert first.keys() & second.keys()
    assert all(first[k] != second[k] for k in first.keys() & second.keys())
    assert not (tmp_path / "a" / "site1" / "test").exists()  # test_per_site=0: no test split


def test_site_profiles_are_deterministic_and_within_ranges():
    assert site_profile(2, seed=5) == site_profile(2, seed=5)
    profiles = [site_profile(k, seed=0) for k in range(1, 9)]
    assert len({p.offset for p in profiles}) == 8
    for p in profiles:
        assert -0.08 <= p.offset <= 0.08 and 0.75 <= p.gain <= 1.25
        assert 0.0 <= p.blur <= 1.0 and 0.01 <= p.noise <= 0.04
        assert abs(sum(p.proportions) - 1) < 1e-9
        assert min(p.proportions) >= 0.5 / len(DEMO_CLASSES) - 1e-9


def test_sites_differ_in_intensity_statistics(demo):
    _, sites = demo
    normal = [images(site, "train", "normal") for site in sites]
    means = [a.mean() for a in normal]
    spreads = [a.std() for a in normal]
    for i in range(len(sites)):
        for j in range(i + 1, len(sites)):
            assert abs(means[i] - means[j]) > 1.0 or abs(spreads[i] - spreads[j]) > 1.0
    # the brightest site is the one whose scanner adds most brightness and gain
    profiles = [site_profile(k, seed=ARGS["seed"]) for k in (1, 2, 3)]
    expected = [0.35 * p.gain + p.offset for p in profiles]  # a mid-grey tissue value
    assert int(np.argmax(means)) == int(np.argmax(expected))


def test_sites_differ_in_label_proportions(demo):
    _, sites = demo
    train_counts = [
        tuple(scan_site(s, DEMO_CLASSES, verify=False).counts()["train"].values()) for s in sites
    ]
    assert len(set(train_counts)) == len(sites)
    for k, counts in enumerate(train_counts, start=1):
        assert list(counts) == allocate_counts(60, site_profile(k, seed=ARGS["seed"]).proportions)
    shares = np.array(train_counts) / 60
    assert (shares.max(axis=0) - shares.min(axis=0)).max() > 0.1  # visible skew


def peak_over_lung(batch: np.ndarray) -> np.ndarray:
    """Brightest pixel minus the median of the chest region, per image."""
    chest = batch[:, 12:52, 8:56].reshape(len(batch), -1)
    return batch.reshape(len(batch), -1).max(axis=1) - np.median(chest, axis=1)


def test_classes_carry_a_clear_signal(demo):
    _, sites = demo
    for site in sites:
        normal, nodule, opacity = (images(site, "train", name) for name in DEMO_CLASSES)
        # nodules: small spots much brighter than the lung around them
        threshold = (peak_over_lung(normal).max() + peak_over_lung(nodule).min()) / 2
        assert peak_over_lung(nodule).mean() > peak_over_lung(normal).mean() + 40
        hits = (peak_over_lung(nodule) > threshold).mean()
        correct_rejections = (peak_over_lung(normal) <= threshold).mean()
        assert (hits + correct_rejections) / 2 > 0.9
        # opacity: a large brighter patch raises the mean of the lung fields
        lungs = (slice(None), slice(16, 48), slice(8, 56))
        assert opacity[lungs].mean() > normal[lungs].mean() + 3


def test_images_of_a_class_are_not_identical(demo):
    _, sites = demo
    nodule = images(sites[0], "train", "nodule")
    assert len({a.tobytes() for a in nodule}) == len(nodule)
    assert nodule.std(axis=0).mean() > 2


def test_refuses_to_overwrite_without_flag(tmp_path):
    small = dict(train_per_site=3, val_per_site=3, test_per_site=0, image_size=16)
    out = tmp_path / "demo"
    generate_demo_data(out, 2, **small)
    before = all_files(out)
    with pytest.raises(DataError) as info:
        generate_demo_data(out, 2, **small)
    message = str(info.value)
    assert message == f"{out / 'site1'} exists; pass --overwrite or choose another --out"
    assert all_files(out) == before


def test_overwrite_replaces_only_site_folders(tmp_path):
    small = dict(train_per_site=3, val_per_site=3, test_per_site=3, image_size=16)
    out = tmp_path / "demo"
    generate_demo_data(out, 2, **small)
    (out / "site1" / "stale.txt").write_text("old")
    (out / "keep.txt").write_text("mine")
    (out / "site3").mkdir()
    (out / "site3" / "other.png").write_bytes(b"x")
    generate_demo_data(out, 2, overwrite=True, **{**small, "test_per_site": 0})
    assert not (out / "site1" / "stale.txt").exists()
    assert not (out / "site1" / "test").exists()
    assert (out / "keep.txt").read_text() == "mine"
    assert (out / "site3" / "other.png").exists()
    assert scan_site(out / "site2", DEMO_CLASSES).counts()["train"]


def test_empty_site_folder_is_reused_without_flag(tmp_path):
    (tmp_path / "site1").mkdir()
    generate_demo_data(tmp_path, 1, train_per_site=3, val_per_site=3, test_per_site=0, image_size=16)
    assert (tmp_path / "site1" / "train").is_dir()


def test_foreign_readme_is_not_overwritten(tmp_path):
    (tmp_path / "README.md").write_text("# my project\n")
    with pytest.raises(DataError, match="README.md exists and was not written by demo-data"):
        generate_demo_data(tmp_path, 1, train_per_site=3, val_per_site=3, image_size=16)
    assert (tmp_path / "README.md").read_text() == "# my project\n"
    assert not (tmp_path / "site1").exists()


def test_out_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(DataError, match="is a file, not a folder"):
        generate_demo_data(tmp_path / "f", 1)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (dict(sites=0), "sites must be an integer >= 1 (got 0)"),
        (dict(sites=1, val_per_site=0), "val_per_site must be an integer >= 1 (got 0)"),
        (dict(sites=1, image_size=8), "image_size must be an integer >= 16 (got 8)"),
        (dict(sites=1, seed=-1), "seed must be an integer >= 0 (got -1)"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, expected):
    with pytest.raises(DataError) as info:
        generate_demo_data(tmp_path, **kwargs)
    assert expected in str(info.value) and "\n" not in str(info.value)
    assert not any(tmp_path.iterdir())


def test_allocate_counts():
    assert allocate_counts(10, (0.5, 0.3, 0.2)) == [5, 3, 2]
    assert sum(allocate_counts(7, (0.45, 0.45, 0.1))) == 7
    assert allocate_counts(4, (0.9, 0.05, 0.05), minimum=1) == [2, 1, 1]
    assert allocate_counts(2, (0.9, 0.05, 0.05), minimum=1) == [2, 0, 0]  # too few to spread
