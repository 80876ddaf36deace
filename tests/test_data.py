"""Site folder scanning, manifest parsing, image loading (PNG/JPEG/DICOM)."""

from __future__ import annotations

import errno
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from nearl_core.data import (
    IMAGE_SUFFIXES,
    SPLITS,
    ImageDataset,
    Sample,
    SiteData,
    format_counts,
    infer_classes,
    load_image,
    scan_site,
)
from nearl_core.errors import DataError, NearlError

# ---------------------------------------------------------------------------
# helpers


def make_png(path: Path, value: int = 128, size: tuple[int, int] = (8, 6)) -> Path:
    """A uniform gray PNG; its path goes into a text chunk so that no two files are identical
    (the same bytes in two splits is an error of its own, tested with deliberate copies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    info.add_text("made-for", str(path))
    Image.new("L", size, value).save(path, pnginfo=info)
    return path


def make_site(root: Path, layout: dict[str, dict[str, int]]) -> Path:
    """ImageFolder site: layout = {split: {class: number of images}}."""
    for split, classes in layout.items():
        for name, count in classes.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                make_png(root / split / name / f"img{i:02d}.png", value=10 * i)
    return root


def write_manifest(root: Path, text: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "manifest.csv"
    path.write_text(text, encoding="utf-8")
    return path


def scan_error(*args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        scan_site(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


BASIC = {"train": {"a": 3, "b": 2}, "val": {"a": 1, "b": 1}}


# ---------------------------------------------------------------------------
# constants


def test_constants():
    assert IMAGE_SUFFIXES == frozenset({".png", ".jpg", ".jpeg", ".dcm"})
    assert SPLITS == ("train", "val", "test")
    assert issubclass(DataError, NearlError)


# ---------------------------------------------------------------------------
# ImageFolder layout


def test_imagefolder_scan_counts_and_inferred_classes(tmp_path):
    root = make_site(tmp_path / "site", {**BASIC, "test": {"a": 1, "b": 4}})
    site = scan_site(root)
    assert isinstance(site, SiteData)
    assert site.root == root
    assert site.classes == ("a", "b")
    assert set(site.splits) == {"train", "val", "test"}
    assert site.counts() == {
        "train": {"a": 3, "b": 2},
        "val": {"a": 1, "b": 1},
        "test": {"a": 1, "b": 4},
    }
    assert site.labels("train") == [0, 0, 0, 1, 1]
    assert site.missing_classes() == ()
    assert all(isinstance(s, Sample) and s.path.is_file() for s in site.splits["train"])


def test_test_split_is_optional(tmp_path):
    site = scan_site(make_site(tmp_path / "site", BASIC))
    assert set(site.splits) == {"train", "val"}


def test_infer_classes_is_sorted_from_train_folders(tmp_path):
    root = make_site(tmp_path / "s", {"train": {"zeta": 1, "alpha": 1, "Mid": 1}, "val": {"alpha": 1}})
    assert infer_classes(root) == ("Mid", "alpha", "zeta")


def test_given_classes_fix_the_label_order(tmp_path):
    root = make_site(tmp_path / "s", BASIC)
    site = scan_site(root, ["b", "a"])
    assert site.classes == ("b", "a")
    assert site.labels("train") == [1, 1, 1, 0, 0]
    assert site.counts()["train"] == {"b": 2, "a": 3}


def test_samples_are_sorted_by_path_and_scans_are_deterministic(tmp_path):
    root = tmp_path / "site"
    names = [f"{n}.png" for n in ("k", "c", "x", "a", "m", "b")]
    random.Random(3).shuffle(names)
    for name in names:
        make_png(root / "train" / "a" / name)
    make_png(root / "val" / "a" / "v.png")
    first = scan_site(root)
    paths = [s.path for s in first.splits["train"]]
    assert paths == sorted(paths)
    assert [p.name for p in paths] == ["a.png", "b.png", "c.png", "k.png", "m.png", "x.png"]
    assert scan_site(root) == first


def test_suffixes_match_case_insensitively_and_nested_folders_are_read(tmp_path):
    root = make_site(tmp_path / "s", BASIC)
    make_png(root / "train" / "a" / "UPPER.PNG")
    Image.new("RGB", (5, 5), (1, 2, 3)).save(root / "train" / "a" / "photo.JPEG", format="JPEG")
    make_png(root / "train" / "b" / "patient7" / "x.png")
    site = scan_site(root)
    assert site.counts()["train"] == {"a": 5, "b": 3}


def test_missing_class_is_valid_and_reported(tmp_path):
    root = make_site(tmp_path / "s", {"train": {"a": 2}, "val": {"a": 1, "c": 1}})
    site = scan_site(root, ("a", "b", "c"))
    assert site.missing_classes() == ("b", "c")
    assert site.missing_classes("val") == ("b",)
    assert site.counts()["train"] == {"a": 2, "b": 0, "c": 0}


def test_empty_class_folder_counts_zero(tmp_path):
    root = make_site(tmp_path / "s", BASIC)
    (root / "train" / "c").mkdir()
    site = scan_site(root)
    assert site.classes == ("a", "b", "c")
    assert site.missing_classes() == ("c",)


def test_hidden_files_and_notes_are_ignored(tmp_path):
    root = make_site(tmp_path / "s", BASIC)
    (root / "train" / ".DS_Store").write_bytes(b"\0junk")
    (root / "train" / "a" / ".DS_Store").write_bytes(b"\0junk")
    (root / "train" / "a" / "Thumbs.db").write_bytes(b"\0junk")
    (root / "train" / "README").write_text("notes")
    (root / "train" / "notes.txt").write_text("notes")
    (root / "train" / ".cache").mkdir()
    (root / "train" / ".cache" / "x.bin").write_bytes(b"\0")
    site = scan_site(root)
    assert site.classes == ("a", "b")
    assert site.counts()["train"] == {"a": 3, "b": 2}


def test_labels_of_absent_split_is_a_data_error(tmp_path):
    site = scan_site(make_site(tmp_path / "s", BASIC))
    with pytest.raises(DataError, match=r"has no 'test' split \(it has: train, val\)"):
        site.labels("test")


# ---------------------------------------------------------------------------
# ImageFolder errors


def test_missing_root(tmp_path):
    message = scan_error(tmp_path / "nope")
    assert str(tmp_path / "nope") in message and "does not exist" in message


def test_root_is_a_file(tmp_path):
    path = tmp_path / "file.png"
    make_png(path)
    message = scan_error(path)
    assert f"{path} is not a folder" in message


def test_neither_layout(tmp_path):
    (tmp_path / "s").mkdir()
    message = scan_error(tmp_path / "s")
    assert "neither a train/ folder nor a manifest.csv" in message
    assert str(tmp_path / "s") in message
    with pytest.raises(DataError, match="neither a train/ folder"):
        infer_classes(tmp_path / "s")


@pytest.mark.parametrize("split", ["train", "val"])
def test_required_split_missing(tmp_path, split):
    root = make_site(tmp_path / "s", {s: c for s, c in BASIC.items() if s != split})
    message = scan_error(root, ("a", "b"))
    assert f"{root / split} is missing" in message


def test_empty_split_folder(tmp_path):
    root = make_site(tmp_path / "s", {"train": {"a": 1}, "val": {"a": 0}})
    message = scan_error(root)
    assert f"split folder {root / 'val'} contains no images" in message


def test_train_without_class_folders(tmp_path):
    (tmp_path / "s" / "train").mkdir(parents=True)
    (tmp_path / "s" / "val").mkdir()
    message = scan_error(tmp_path / "s")
    assert "has no class folders" in message


def test_unknown_class_folder(tmp_path):
    root = make_site(tmp_path / "s", {**BASIC, "test": {"x": 1}})
    message = scan_error(root, ("a", "b"))
    assert message == (
        f"unknown class 'x' in {root / 'test' / 'x'}; "
        "add it to task.classes in the config or remove the folder"
    )


def test_val_class_absent_from_train_is_unknown_when_inferred(tmp_path):
    root = make_site(tmp_path / "s", {"train": {"a": 1}, "val": {"a": 1, "b": 1}})
    message = scan_error(root)
    assert "unknown class 'b'" in message


def test_non_image_in_class_folder(tmp_path):
    root = make_site(tmp_path / "s", BASIC)
    bad = root / "val" / "b" / "report.pdf"
    bad.write_bytes(b"%PDF")
    message = scan_error(root)
    assert f"{bad} is not an image" in message
    assert "remove it or convert it" in message


def test_image_at_split_level(tmp_path):
    root = make_site(tmp_path / "s", BASIC)
    stray = make_png(root / "train" / "stray.png")
    message = scan_error(root)
    assert f"image {stray} is not inside a class folder" in message


def test_unexpected_file_at_split_level(tmp_path):
    root = make_site(tmp_path / "s", BASIC)
    (root / "train" / "labels.csv").write_text("x")
    message = scan_error(root)
    assert f"unexpected file {root / 'train' / 'labels.csv'}" in message


def test_duplicate_given_classes(tmp_path):
    root = make_site(tmp_path / "s", BASIC)
    assert "class 'a' is listed twice" in scan_error(root, ("a", "b", "a"))


def test_corrupt_png_is_named_when_verifying(tmp_path):
    root = make_site(tmp_path / "s", BASIC)
    bad = root / "train" / "b" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    message = scan_error(root)
    assert f"cannot read image {bad}" in message
    assert "replace or remove the file" in message
    site = scan_site(root, verify=False)  # verification is what catches it
    assert site.counts()["train"]["b"] == 3
    with pytest.raises(DataError, match="cannot read image"):
        load_image(bad)


def test_truncated_jpeg_is_named(tmp_path):
    root = make_site(tmp_path / "s", BASIC)
    good = root / "val" / "a" / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(good)
    good.write_bytes(good.read_bytes()[:40])
    message = scan_error(root)
    assert str(good) in message


def noise_image(path: Path, fmt: str, size: int = 64) -> Path:
    """An RGB noise image (so compression leaves much pixel data to cut)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(size).integers(0, 255, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, fmt)
    return path


def cut(path: Path, keep: float) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


@pytest.mark.parametrize("name, fmt, keep", [
    ("half.jpg", "JPEG", 0.5),      # header intact: PIL's verify() alone passes it
    ("no-end.jpg", "JPEG", 0.99),   # only the last bytes missing
    ("half.png", "PNG", 0.5),
    ("no-end.png", "PNG", 0.999),
])
def test_image_cut_short_is_named(tmp_path, name, fmt, keep):
    root = make_site(tmp_path / "s", BASIC)
    bad = cut(noise_image(root / "train" / "b" / name, fmt), keep)
    with Image.open(bad) as image:  # the header still parses: only a full decode notices
        assert image.size == (64, 64)
    message = scan_error(root)
    assert message.startswith(f"cannot read image {bad} (") and "replace or remove the file" in message


def test_intact_jpeg_passes_full_decode(tmp_path):
    root = make_site(tmp_path / "s", BASIC)
    noise_image(root / "train" / "b" / "fine.jpg", "JPEG")
    assert scan_site(root).counts()["train"]["b"] == 3


@pytest.mark.parametrize("manifest", [False, True])
@pytest.mark.parametrize("how", ["copy", "symlink"])
def test_same_image_in_two_splits_names_both_paths(tmp_path, manifest, how):
    root = make_site(tmp_path / "s", {**BASIC, "test": {"a": 1, "b": 1}})
    original = root / "train" / "b" / "img01.png"
    duplicate = root / "test" / "a" / "renamed.png"
    if how == "copy":
        shutil.copy(original, duplicate)
    else:
        duplicate.symlink_to(original)
    if manifest:
        write_manifest(root, f"path,label,split\n{original.relative_to(root)},b,train\n"
                             f"val/a/img00.png,a,val\n{duplicate.relative_to(root)},a,test\n")
    message = scan_error(root, ("a", "b"))
    assert message.startswith(f"the same image is in split 'train' as {original} and in split 'test' as {duplicate}")
    assert "keep each image in one split only" in message
    assert scan_site(root, ("a", "b"), verify=False).counts()["test"]["a"] >= 1  # verification checks hashes


def test_identical_pixels_in_different_files_are_not_duplicates(tmp_path):
    root = make_site(tmp_path / "s", BASIC)  # train/a/img00 and val/a/img00: same gray, other bytes
    assert np.array_equal(np.asarray(load_image(root / "train" / "a" / "img00.png")),
                          np.asarray(load_image(root / "val" / "a" / "img00.png")))
    scan_site(root)


def test_symlink_loop_file_is_one_line(tmp_path):
    root = make_site(tmp_path / "s", BASIC)
    loop = root / "train" / "a" / "loop.png"
    loop.symlink_to(loop)
    assert scan_error(root) == f"{loop} is a symbolic link loop; remove or fix the link"


def test_mutual_symlink_loop_between_folders_is_one_line(tmp_path):
    root = make_site(tmp_path / "s", BASIC)
    first, second = root / "val" / "b" / "x", root / "val" / "b" / "y"
    first.symlink_to(second)
    second.symlink_to(first)
    assert scan_error(root) == f"{first} is a symbolic link loop; remove or fix the link"


@pytest.mark.parametrize("target", ["..", "../..", "../../.."])  # class folder, split folder, site root
def test_folder_linking_back_up_is_one_line(tmp_path, target):
    root = make_site(tmp_path / "s", BASIC)
    link = root / "train" / "a" / "patient1" / "scans"
    link.parent.mkdir()
    link.symlink_to(target)
    real = os.path.realpath(link.parent / target)
    assert scan_error(root) == (f"{link} links back to {real}, a folder that contains it "
                                "(a symbolic link loop); remove the link")


def test_looped_split_folder_is_not_silently_skipped(tmp_path):
    root = make_site(tmp_path / "s", BASIC)
    (root / "test").symlink_to(root / "test")
    message = scan_error(root)
    assert message == (f"{root / 'test'} is a symbolic link that cannot be followed (broken or a loop); "
                       "remove or fix the link")


def test_linked_sub_folder_elsewhere_is_fine(tmp_path):
    root = make_site(tmp_path / "s", BASIC)
    make_png(tmp_path / "archive" / "p9.png", value=3)
    (root / "train" / "a" / "archive").symlink_to(tmp_path / "archive")
    assert scan_site(root).counts()["train"]["a"] == 4


def test_manifest_row_with_symlink_loop(tmp_path):
    root = manifest_site(tmp_path / "s")
    loop = root / "images" / "loop.png"
    loop.symlink_to(loop)
    write_manifest(root, "path,label,split\nimages/p1.png,a,train\nimages/loop.png,a,val\n")
    assert scan_error(root) == (f"{root / 'manifest.csv'} line 3: {loop} is a symbolic link loop; "
                                "fix the path or remove the row")


def deny(monkeypatch, denied: Path) -> None:
    """Make listing or reading ``denied`` fail as for a folder or file without read permission.

    The tests run as root here, for whom chmod does not take access away.
    """
    real_scandir, real_read = os.scandir, Path.read_bytes

    def scandir(path):
        if Path(path) == denied:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_scandir(path)

    def read_bytes(self):
        if self == denied:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_read(self)

    monkeypatch.setattr("nearl_core.data.os.scandir", scandir)
    monkeypatch.setattr(Path, "read_bytes", read_bytes)


@pytest.mark.parametrize("where", ["split", "class", "sub-folder"])
def test_unreadable_folder_is_one_line(tmp_path, monkeypatch, where):
    root = make_site(tmp_path / "s", BASIC)
    make_png(root / "val" / "b" / "p1" / "x.png")
    folder = {"split": root / "val", "class": root / "val" / "b", "sub-folder": root / "val" / "b" / "p1"}[where]
    deny(monkeypatch, folder)
    assert scan_error(root, ("a", "b")) == (
        f"cannot list folder {folder} (Permission denied); give the account running nearl read access "
        "to it (e.g. chmod -R u+rX) or move it out of the site folder")


def test_unreadable_image_is_one_line(tmp_path, monkeypatch):
    root = make_site(tmp_path / "s", BASIC)
    image = root / "val" / "b" / "img00.png"
    deny(monkeypatch, image)
    assert scan_error(root) == (f"cannot read image {image} (Permission denied); "
                                "give the account running nearl read access to it")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads folders without permission")
def test_unreadable_folder_by_permissions(tmp_path):
    root = make_site(tmp_path / "s", BASIC)
    folder = root / "train" / "b"
    folder.chmod(0)
    try:
        assert scan_error(root).startswith(f"cannot list folder {folder} (Permission denied)")
    finally:
        folder.chmod(0o755)


# ---------------------------------------------------------------------------
# manifest layout


def manifest_site(root: Path) -> Path:
    """Images in a flat folder, described by a manifest."""
    for name in ("p1", "p2", "p3", "p4", "p5"):
        make_png(root / "images" / f"{name}.png")
    return root


def test_manifest_layout(tmp_path):
    root = manifest_site(tmp_path / "s")
    absolute = make_png(tmp_path / "elsewhere" / "abs.png")
    write_manifest(
        root,
        "path,label,split\n"
        "images/p3.png,pneumonia,train\n"
        "images/p1.png,normal,train\n"
        f"{absolute},normal,train\n"
        "images/p2.png,normal,val\n"
        "\n"
        "images/p4.png, pneumonia ,val\n"
        "images/p5.png,normal,test\n",
    )
    assert infer_classes(root) == ("normal", "pneumonia")
    site = scan_site(root)
    assert site.classes == ("normal", "pneumonia")
    assert site.counts() == {
        "train": {"normal": 2, "pneumonia": 1},
        "val": {"normal": 1, "pneumonia": 1},
        "test": {"normal": 1, "pneumonia": 0},
    }
    train = site.splits["train"]
    assert [s.path for s in train] == sorted([absolute, root / "images/p1.png", root / "images/p3.png"])
    assert site.labels("train") == [0, 0, 1]


def test_manifest_extra_columns_bom_and_column_order(tmp_path):
    root = manifest_site(tmp_path / "s")
    (root / "manifest.csv").write_bytes(
        "\ufeffsplit,patient,Label,path\ntrain,7,x,images/p1.png\nval,8,x,images/p2.png\n".encode()
    )
    site = scan_site(root)
    assert site.counts() == {"train": {"x": 1}, "val": {"x": 1}}


def test_manifest_wins_over_folders(tmp_path):
    root = make_site(tmp_path / "s", BASIC)
    write_manifest(root, "path,label,split\ntrain/a/img00.png,q,train\nval/b/img00.png,q,val\n")
    site = scan_site(root)
    assert site.classes == ("q",)
    assert site.counts() == {"train": {"q": 1}, "val": {"q": 1}}


MANIFEST_ERRORS = [
    ("path,label\nimages/p1.png,a\n", "line 1 lacks column(s) split"),
    ("path,label,split,label\nimages/p1.png,a,train,a\n", "line 1 repeats column(s) label"),
    ("path,label,split\nimages/p1.png,a,train\nimages/p2.png,a,validation\n",
     "line 3 has split 'validation'; use one of train, val, test"),
    ("path,label,split\nimages/p1.png,a,train\nimages/none.png,a,val\n",
     "line 3: {root}/images/none.png does not exist"),
    ("path,label,split\nimages/p1.png,a,train\nimages/p2.png,a\n",
     "line 3 has 2 fields but the header has 3"),
    ("path,label,split\nimages/p1.png,a,train\nimages/p1.png,a,val\n",
     "line 3 lists {root}/images/p1.png again (first on line 2)"),
    ("path,label,split\nimages/p1.png,,train\n", "line 2 has an empty label"),
    ("path,label,split\n,a,train\n", "line 2 has an empty path"),
    ("path,label,split\nnotes.txt,a,train\n", "line 2: {root}/notes.txt is not an image"),
    ("path,label,split\nimages/p1.png,a,train\nimages/p2.png,a,test\n", "has no rows with split 'val'"),
    ("", "is empty; its first line must be the header path,label,split"),
]


@pytest.mark.parametrize(("text", "expected"), MANIFEST_ERRORS)
def test_manifest_errors_name_file_and_line(tmp_path, text, expected):
    root = manifest_site(tmp_path / "s")
    (root / "notes.txt").write_text("x")
    manifest = write_manifest(root, text)
    message = scan_error(root, ("a",))
    assert str(manifest) in message
    assert expected.format(root=root) in message


def test_manifest_unknown_label(tmp_path):
    root = manifest_site(tmp_path / "s")
    manifest = write_manifest(
        root, "path,label,split\nimages/p1.png,a,train\nimages/p2.png,zzz,val\n"
    )
    message = scan_error(root, ("a",))
    assert message == (
        f"unknown class 'zzz' in {manifest} line 3; "
        "add it to task.classes in the config or remove the row"
    )


def test_manifest_without_train_rows_cannot_infer_classes(tmp_path):
    root = manifest_site(tmp_path / "s")
    write_manifest(root, "path,label,split\nimages/p1.png,a,val\n")
    assert "has no rows with split 'train'" in scan_error(root)


def test_manifest_corrupt_image_named(tmp_path):
    root = manifest_site(tmp_path / "s")
    (root / "images" / "p2.png").write_bytes(b"not a png")
    write_manifest(root, "path,label,split\nimages/p1.png,a,train\nimages/p2.png,a,val\n")
    assert f"cannot read image {root / 'images' / 'p2.png'}" in scan_error(root)


# ---------------------------------------------------------------------------
# DICOM


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", **tags) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.PhotometricInterpretation = photometric
    if pixels.ndim == 3:
        ds.SamplesPerPixel = 3
        ds.PlanarConfiguration = 0
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
    else:
        ds.SamplesPerPixel = 1
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        ds.save_as(path, enforce_file_format=True)
    except TypeError:  # pydicom 2
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(path, write_like_original=False)
    return path


# raw stored values; with slope 2 / intercept -1000 they become 2*raw - 1000
RAW = np.array([0, 899, 950, 1000, 1050, 4095], dtype=np.uint16)


def test_dicom_monochrome2_rescale_and_window(tmp_path):
    pixels = np.tile(RAW, (4, 1))  # 4 rows x 6 columns
    path = write_dicom(
        tmp_path / "ct.dcm", pixels,
        RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=1000, WindowWidth=400,
    )
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (6, 4)
    array = np.asarray(image).astype(int)
    assert (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all()
    row = array[0, :, 0]
    assert (array[:, :, 0] == row).all()
    # window [800, 1200] in rescaled units: below -> 0, above -> 255, linear inside
    assert row[0] == 0 and row[1] == 0 and row[5] == 255
    assert abs(row[2] - 64) <= 2   # rescaled 900: a quarter into the window
    assert abs(row[3] - 128) <= 2  # rescaled 1000: the centre
    assert abs(row[4] - 192) <= 2  # rescaled 1100 (it would be 159 without the rescale)


def test_dicom_without_window_is_min_max_scaled(tmp_path):
    pixels = np.tile(np.array([100, 200, 500], dtype=np.uint16), (2, 1))
    array = np.asarray(load_image(write_dicom(tmp_path / "x.dcm", pixels)))[0, :, 0]
    assert list(array) == [0, 64, 255]


def test_dicom_monochrome1_is_inverted(tmp_path):
    pixels = np.tile(np.array([100, 200, 500], dtype=np.uint16), (2, 1))
    image = load_image(write_dicom(tmp_path / "m1.dcm", pixels, photometric="MONOCHROME1"))
    assert image.mode == "RGB" and image.size == (3, 2)
    assert list(np.asarray(image)[0, :, 1]) == [255, 191, 0]


def test_dicom_constant_image_gives_zeros(tmp_path):
    pixels = np.full((3, 3), 500, dtype=np.uint16)
    array = np.asarray(load_image(write_dicom(tmp_path / "c.dcm", pixels)))
    assert array.shape == (3, 3, 3) and not array.any()


def test_dicom_rgb_stays_rgb(tmp_path):
    pixels = np.zeros((2, 2, 3), dtype=np.uint8)
    pixels[..., 0] = 255
    pixels[1, 1] = (0, 0, 255)
    image = load_image(write_dicom(tmp_path / "rgb.dcm", pixels, photometric="RGB"))
    array = np.asarray(image)
    assert tuple(array[0, 0]) == (255, 0, 0) and tuple(array[1, 1]) == (0, 0, 255)


def test_dicom_in_site_scan_and_errors(tmp_path):
    root = make_site(tmp_path / "s", BASIC)
    write_dicom(root / "train" / "a" / "scan.dcm", np.tile(RAW, (2, 1)))
    assert scan_site(root).counts()["train"]["a"] == 4
    garbage = root / "val" / "a" / "junk.dcm"
    garbage.write_bytes(b"definitely not dicom" * 20)
    assert f"cannot read image {garbage}" in scan_error(root)
    garbage.unlink()
    no_pixels = root / "val" / "a" / "meta.dcm"
    write_dicom(no_pixels, np.tile(RAW, (2, 1)))
    ds = pydicom.dcmread(no_pixels)
    del ds.PixelData
    ds.save_as(no_pixels)
    assert f"DICOM file {no_pixels} has no pixel data" in scan_error(root)


@pytest.mark.parametrize("missing", [1, 100])
def test_dicom_with_pixel_data_cut_short_is_named(tmp_path, missing):
    root = make_site(tmp_path / "s", BASIC)
    scan = write_dicom(root / "train" / "a" / "scan.dcm", np.tile(RAW, (64, 4)))
    scan.write_bytes(scan.read_bytes()[:-missing])
    assert pydicom.dcmread(scan).Rows == 64  # the header still parses: only decoding notices
    message = scan_error(root)
    assert message.startswith(f"cannot decode pixel data of DICOM file {scan} (")
    assert "replace the file if it was cut short" in message


# ---------------------------------------------------------------------------
# other images, dataset, table


def test_load_image_png_variants_are_rgb(tmp_path):
    gray = make_png(tmp_path / "g.png", value=77, size=(5, 4))
    image = load_image(gray)
    assert image.mode == "RGB" and image.size == (5, 4)
    assert (np.asarray(image) == 77).all()
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (2, 2), (10, 20, 30, 40)).save(rgba)
    assert tuple(np.asarray(load_image(rgba))[0, 0]) == (10, 20, 30)


def test_load_image_16_bit_png_is_rescaled_not_clipped(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.array([[1000, 2000, 5000]], dtype=np.uint16)).save(path)
    assert list(np.asarray(load_image(path))[0, :, 0]) == [0, 64, 255]


def test_load_image_rejects_unknown_suffix(tmp_path):
    path = tmp_path / "x.bmp"
    Image.new("L", (2, 2)).save(path)
    with pytest.raises(DataError, match=r"x\.bmp is not an image"):
        load_image(path)


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


def test_image_dataset_returns_transformed_tensor_and_label(tmp_path):
    root = make_site(tmp_path / "s", BASIC)
    site = scan_site(root)
    dataset = ImageDataset(site.splits["train"], to_tensor)
    assert len(dataset) == 5
    tensor, label = dataset[4]
    assert label == 1
    assert tensor.shape == (3, 6, 8) and tensor.dtype == torch.float32
    assert torch.allclose(tensor, torch.full_like(tensor, 10 / 255))
    batch, labels = next(iter(torch.utils.data.DataLoader(dataset, batch_size=5)))
    assert batch.shape == (5, 3, 6, 8) and labels.tolist() == [0, 0, 0, 1, 1]


def test_format_counts_table(tmp_path):
    root = make_site(tmp_path / "s", {**BASIC, "test": {"a": 0, "b": 4}})
    (root / "train" / "pneumothorax").mkdir()
    text = format_counts(scan_site(root))
    lines = text.splitlines()
    assert lines[0].split() == ["class", "train", "val", "test", "total"]
    rows = {line.split()[0]: line.split()[1:] for line in lines if not line.startswith("-")}
    assert rows["a"] == ["3", "1", "0", "4"]
    assert rows["b"] == ["2", "1", "4", "7"]
    assert rows["pneumothorax"] == ["0", "0", "0", "0"]
    assert rows["total"] == ["5", "2", "4", "11"]
