"""Reading a hospital site's image folder.

A site keeps its images on its own disk in one of two layouts:

1. ImageFolder: ``root/train/<class>/*``, ``root/val/<class>/*`` and optionally
   ``root/test/<class>/*``;
2. a ``root/manifest.csv`` with the header ``path,label,split`` (paths relative to the
   root or absolute). When a manifest exists it wins over any folders.

:func:`scan_site` turns either layout into a :class:`SiteData` index and checks it up
front, so that a misplaced file or a corrupt image is reported in one readable line
before training starts rather than as a traceback halfway through a federated round.
Checking decodes every image completely (a file cut short in a copy is otherwise only
noticed by the epoch that reaches it), refuses the same image in two splits (it would
leak training images into the validation or test metrics) and turns symbolic link
loops and unreadable folders into one-line errors.
A site that has no images of some class is valid (federations are rarely IID); it is
reported by :meth:`SiteData.missing_classes`, not refused.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import os
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nearl_core.errors import DataError

IMAGE_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".dcm"})
SPLITS = ("train", "val", "test")
REQUIRED_SPLITS = ("train", "val")
MANIFEST_NAME = "manifest.csv"
MANIFEST_COLUMNS = ("path", "label", "split")

# Files people and operating systems leave next to data; never images, never errors.
_IGNORED_NAMES = frozenset({"thumbs.db", "desktop.ini"})
_SPLIT_LEVEL_NOTE_SUFFIXES = frozenset({".txt", ".md"})


@dataclass(frozen=True)
class Sample:
    """One image of a site: where it is and the index of its class."""

    path: Path
    label: int


@dataclass(frozen=True)
class SiteData:
    """The checked index of one site's images, split by split."""

    root: Path
    classes: tuple[str, ...]
    splits: dict[str, tuple[Sample, ...]] = field(hash=False)

    def samples(self, split: str) -> tuple[Sample, ...]:
        """The samples of ``split``; a readable error when the site has no such split."""
        if split not in self.splits:
            present = ", ".join(self.splits)
            raise DataError(
                f"site {self.root} has no '{split}' split (it has: {present}); "
                f"add {self.root / split}/<class>/ folders or use another split"
            )
        return self.splits[split]

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per class in every split, zeros included, for tables and metrics."""
        table: dict[str, dict[str, int]] = {}
        for split, samples in self.splits.items():
            per_class = dict.fromkeys(self.classes, 0)
            for sample in samples:
                per_class[self.classes[sample.label]] += 1
            table[split] = per_class
        return table

    def missing_classes(self, split: str = "train") -> tuple[str, ...]:
        """Classes with no image in ``split``: valid, but worth telling the operator."""
        present = {sample.label for sample in self.samples(split)}
        return tuple(name for i, name in enumerate(self.classes) if i not in present)

    def labels(self, split: str) -> list[int]:
        """The label of every sample of ``split``, in sample order."""
        return [sample.label for sample in self.samples(split)]


# ---------------------------------------------------------------------------
# Scanning


def infer_classes(root: str | Path) -> tuple[str, ...]:
    """Class names a site declares by itself, sorted so every site agrees on the order.

    They come from the class folders under ``train/`` or, when a manifest exists, from
    the labels of its train rows. A federation should still fix the classes in its
    config: a site that lacks a class would otherwise number the others differently.
    """
    root = _check_root(root)
    manifest = root / MANIFEST_NAME
    if manifest.is_file():
        rows = _read_manifest(root, manifest)
        classes = tuple(sorted({row.label for row in rows if row.split == "train"}))
        if not classes:
            raise DataError(
                f"{manifest} has no rows with split 'train'; every site needs train and val images"
            )
        return classes
    if not _has_folder_layout(root):
        raise _no_layout(root)
    train = root / "train"
    if not _split_exists(train) or not train.is_dir():
        raise _missing_split(train)
    classes = tuple(sorted(entry.name for entry in _visible_entries(train) if _is_folder(entry)))
    if not classes:
        raise DataError(f"{train} has no class folders; put images in {train}/<class>/")
    return classes


def scan_site(
    root: str | Path, classes: Sequence[str] | None = None, *, verify: bool = True
) -> SiteData:
    """Index and check a site folder so that bad data fails before any training.

    ``classes`` fixes the class order (the federation's task classes); without it the
    site's own classes are used (:func:`infer_classes`). With ``verify`` every image is
    read once and decoded completely (:func:`verify_images`), which costs about one
    epoch of image decoding but turns a corrupt file into an error naming that file
    instead of a crash in the middle of an epoch.
    """
    root = _check_root(root)
    class_names = tuple(classes) if classes is not None else infer_classes(root)
    _check_class_names(class_names)
    manifest = root / MANIFEST_NAME
    if manifest.is_file():
        splits = _splits_from_manifest(root, manifest, class_names)
    elif _has_folder_layout(root):
        splits = _splits_from_folders(root, class_names)
    else:
        raise _no_layout(root)
    if verify:
        verify_images(splits)
    return SiteData(root=root, classes=class_names, splits=splits)


def _check_root(root: str | Path) -> Path:
    path = Path(root).expanduser()
    try:
        path.stat()
    except FileNotFoundError:
        raise DataError(f"site data folder {path} does not exist; check the --data path") from None
    except OSError as err:
        raise DataError(f"site data folder {path} cannot be opened ({_os_reason(err)}); "
                        "fix the link or the permissions, or check the --data path") from None
    if not path.is_dir():
        raise DataError(f"site data path {path} is not a folder; point --data at the site folder")
    return path


def _check_class_names(classes: tuple[str, ...]) -> None:
    if not classes:
        raise DataError("no classes given or found; add class folders under train/ or set task.classes")
    seen: set[str] = set()
    for name in classes:
        if name in seen:
            raise DataError(f"class '{name}' is listed twice; list every class once in task.classes")
        seen.add(name)


def _no_layout(root: Path) -> DataError:
    return DataError(
        f"{root} has neither a train/ folder nor a {MANIFEST_NAME}; "
        f"use root/train/<class>/ and root/val/<class>/ folders or write a {MANIFEST_NAME}"
    )


def _has_folder_layout(root: Path) -> bool:
    return any(_split_exists(root / split) for split in SPLITS)


def _split_exists(folder: Path) -> bool:
    """Whether a split folder exists; a link to nowhere (or a loop) is an error, not absence.

    ``Path.exists`` answers False for a symbolic link loop, which would make a looped
    ``test/`` silently vanish from the evaluation.
    """
    if folder.exists():
        return True
    if folder.is_symlink():
        raise DataError(f"{folder} is a symbolic link that cannot be followed (broken or a loop); "
                        "remove or fix the link")
    return False


def _missing_split(folder: Path) -> DataError:
    return DataError(
        f"{folder} is missing; every site needs {folder.name}/<class>/ folders with images"
    )


def _visible_entries(folder: Path) -> list[os.DirEntry[str]]:
    """Entries of ``folder`` minus hidden and OS clutter files, sorted by name."""
    try:
        with os.scandir(folder) as it:
            entries = [
                e for e in it if not e.name.startswith(".") and e.name.lower() not in _IGNORED_NAMES
            ]
    except OSError as err:  # typically a folder copied with permissions only its owner can read
        raise DataError(
            f"cannot list folder {folder} ({_os_reason(err)}); give the account running nearl "
            "read access to it (e.g. chmod -R u+rX) or move it out of the site folder"
        ) from None
    return sorted(entries, key=lambda e: e.name)


def _is_folder(entry: os.DirEntry[str]) -> bool:
    """Whether ``entry`` is a folder (following links); a link that cannot be followed is an error.

    ``DirEntry.is_dir`` raises for a symbolic link loop (``a -> b -> a``) or a link into
    a folder nobody may read; without this it would surface as a traceback.
    """
    try:
        return entry.is_dir()
    except OSError as err:
        what = "is a symbolic link loop" if err.errno == errno.ELOOP else f"cannot be opened ({_os_reason(err)})"
        raise DataError(f"{entry.path} {what}; remove or fix the link") from None


def _enter(folder: Path, ancestors: frozenset[str]) -> frozenset[str]:
    """``ancestors`` plus ``folder``; refuses a folder that links back to one containing it.

    A link such as ``train/a/scans -> ../..`` would otherwise be walked until the path
    grows too long, and would list every image many times.
    """
    real = os.path.realpath(folder)
    if real in ancestors:
        raise DataError(
            f"{folder} links back to {real}, a folder that contains it (a symbolic link loop); "
            "remove the link"
        )
    return ancestors | {real}


def _os_reason(err: OSError) -> str:
    """The operating system's words for ``err`` (e.g. 'Permission denied'), without the path."""
    return err.strerror or type(err).__name__


def _is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


def _unknown_class(name: str, where: Path | str) -> DataError:
    return DataError(
        f"unknown class '{name}' in {where}; add it to task.classes in the config or remove the folder"
    )


def _splits_from_folders(root: Path, classes: tuple[str, ...]) -> dict[str, tuple[Sample, ...]]:
    index = {name: i for i, name in enumerate(classes)}
    splits: dict[str, tuple[Sample, ...]] = {}
    for split in SPLITS:
        folder = root / split
        if not _split_exists(folder):
            if split in REQUIRED_SPLITS:
                raise _missing_split(folder)
            continue
        if not folder.is_dir():
            raise DataError(f"{folder} is a file, not a folder; make it a folder of class folders")
        samples = _scan_split_folder(folder, index, frozenset({os.path.realpath(root)}))
        if not samples:
            raise DataError(
                f"split folder {folder} contains no images; put images in {folder}/<class>/ "
                f"(suffixes {_suffix_list()})"
            )
        splits[split] = samples
    return splits


def _scan_split_folder(
    folder: Path, index: dict[str, int], ancestors: frozenset[str]
) -> tuple[Sample, ...]:
    samples: list[Sample] = []
    ancestors = _enter(folder, ancestors)
    for entry in _visible_entries(folder):
        if _is_folder(entry):
            if entry.name not in index:
                raise _unknown_class(entry.name, Path(entry.path))
            label = index[entry.name]
            images = _images_in_class_folder(Path(entry.path), ancestors)
            samples.extend(Sample(path, label) for path in images)
        elif _is_split_level_note(entry.name):
            continue
        elif _is_image_name(entry.name):
            raise DataError(
                f"image {entry.path} is not inside a class folder; move it to {folder}/<class>/"
            )
        else:
            raise DataError(
                f"unexpected file {entry.path} next to the class folders; remove or move it"
            )
    return tuple(sorted(samples, key=lambda s: s.path))


def _is_split_level_note(name: str) -> bool:
    lowered = name.lower()
    return lowered.startswith("readme") or Path(lowered).suffix in _SPLIT_LEVEL_NOTE_SUFFIXES


def _images_in_class_folder(folder: Path, ancestors: frozenset[str]) -> Iterator[Path]:
    """Image files in a class folder and its sub-folders; any other file is an error.

    Sub-folders are allowed (e.g. one per patient or per acquisition date), as in
    torchvision's ImageFolder. ``ancestors`` holds the real paths of the folders above,
    so that a linked sub-folder pointing back up is refused instead of walked for ever.
    """
    ancestors = _enter(folder, ancestors)
    for entry in _visible_entries(folder):
        path = Path(entry.path)
        if _is_folder(entry):
            yield from _images_in_class_folder(path, ancestors)
        elif _is_image_name(entry.name):
            yield path
        else:
            raise DataError(
                f"{path} is not an image ({_suffix_list()}); remove it or convert it"
            )


def _suffix_list() -> str:
    return "/".join(sorted(IMAGE_SUFFIXES))


# ---------------------------------------------------------------------------
# Manifest


@dataclass(frozen=True)
class _ManifestRow:
    line: int
    path: Path
    label: str
    split: str


def _read_manifest(root: Path, manifest: Path) -> list[_ManifestRow]:
    """Parse and check a manifest row by row, so every error can name its line."""
    try:
        with manifest.open(newline="", encoding="utf-8-sig") as handle:
            return _parse_manifest(root, manifest, csv.reader(handle))
    except UnicodeDecodeError:
        raise DataError(f"{manifest} is not UTF-8 text; save it as UTF-8 CSV") from None
    except csv.Error as err:
        raise DataError(f"{manifest} is not valid CSV ({err}); fix the quoting") from None


def _parse_manifest(root: Path, manifest: Path, reader: Iterator[list[str]]) -> list[_ManifestRow]:
    header = next(reader, None)
    if header is None:
        raise DataError(f"{manifest} is empty; its first line must be the header path,label,split")
    columns = _manifest_columns(manifest, [name.strip().lower() for name in header])
    rows: list[_ManifestRow] = []
    first_line: dict[Path, int] = {}
    for fields in reader:
        line = reader.line_num  # type: ignore[attr-defined]
        if not any(value.strip() for value in fields):
            continue
        where = f"{manifest} line {line}"
        if len(fields) != len(header):
            raise DataError(
                f"{where} has {len(fields)} fields but the header has {len(header)}; fix that row"
            )
        path_text, label, split = (fields[columns[c]].strip() for c in MANIFEST_COLUMNS)
        row = _ManifestRow(line, _manifest_path(root, path_text, where), label, split)
        _check_manifest_row(row, where)
        if row.path in first_line:
            raise DataError(
                f"{where} lists {row.path} again (first on line {first_line[row.path]}); "
                "keep one row per image"
            )
        first_line[row.path] = line
        rows.append(row)
    return rows


def _manifest_columns(manifest: Path, header: list[str]) -> dict[str, int]:
    duplicates = sorted({name for name in header if name and header.count(name) > 1})
    if duplicates:
        raise DataError(
            f"{manifest} line 1 repeats column(s) {', '.join(duplicates)}; name each column once"
        )
    missing = [name for name in MANIFEST_COLUMNS if name not in header]
    if missing:
        raise DataError(
            f"{manifest} line 1 lacks column(s) {', '.join(missing)}; "
            "the header must be path,label,split"
        )
    return {name: header.index(name) for name in MANIFEST_COLUMNS}


def _manifest_path(root: Path, text: str, where: str) -> Path:
    if not text:
        raise DataError(f"{where} has an empty path; give the image path relative to {root}")
    path = Path(text).expanduser()
    return path if path.is_absolute() else root / path


def _check_manifest_row(row: _ManifestRow, where: str) -> None:
    if not row.label:
        raise DataError(f"{where} has an empty label; give the class name of {row.path}")
    if row.split not in SPLITS:
        raise DataError(
            f"{where} has split '{row.split}'; use one of {', '.join(SPLITS)}"
        )
    if not _is_image_name(row.path.name):
        raise DataError(f"{where}: {row.path} is not an image ({_suffix_list()}); remove the row")
    problem = _file_problem(row.path)
    if problem:
        raise DataError(f"{where}: {row.path} {problem}; fix the path or remove the row")


def _file_problem(path: Path) -> str | None:
    """Why ``path`` is not a readable regular file, in words (None when it is one)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "does not exist"
    except OSError as err:
        return "is a symbolic link loop" if err.errno == errno.ELOOP else f"cannot be opened ({_os_reason(err)})"
    return None if stat.S_ISREG(mode) else "is not a file"


def _splits_from_manifest(
    root: Path, manifest: Path, classes: tuple[str, ...]
) -> dict[str, tuple[Sample, ...]]:
    index = {name: i for i, name in enumerate(classes)}
    grouped: dict[str, list[Sample]] = {split: [] for split in SPLITS}
    for row in _read_manifest(root, manifest):
        if row.label not in index:
            raise DataError(
                f"unknown class '{row.label}' in {manifest} line {row.line}; "
                "add it to task.classes in the config or remove the row"
            )
        grouped[row.split].append(Sample(row.path, index[row.label]))
    for split in REQUIRED_SPLITS:
        if not grouped[split]:
            raise DataError(
                f"{manifest} has no rows with split '{split}'; every site needs train and val images"
            )
    return {
        split: tuple(sorted(samples, key=lambda s: s.path))
        for split, samples in grouped.items()
        if samples
    }


# ---------------------------------------------------------------------------
# Images


def verify_images(splits: Mapping[str, Sequence[Sample]]) -> None:
    """Decode every image and refuse the same image (by content) in two splits.

    An image in both train and val/test makes the reported metrics partly measure
    memorisation; copies under another name or path are common after merging exports,
    so files are compared by the sha256 of their bytes, not by path.
    """
    first_seen: dict[str, tuple[str, Path]] = {}
    for split, samples in splits.items():
        for sample in samples:
            digest = verify_image(sample.path)
            other_split, other_path = first_seen.setdefault(digest, (split, sample.path))
            if other_split != split:
                raise DataError(
                    f"the same image is in split '{other_split}' as {other_path} and in split "
                    f"'{split}' as {sample.path} (sha256 {digest[:16]}); keep each image in one "
                    "split only, or metrics will count training images"
                )


def verify_image(path: str | Path) -> str:
    """Decode ``path`` completely, as training would, and return the sha256 of its bytes.

    The file is read once; hashing and decoding both work on those bytes. PIL's
    ``verify()`` checks structure and checksums (it catches a PNG without its end) but
    decodes no pixels, so a JPEG cut short passes it; ``load()`` decodes them and needs
    a fresh image object after ``verify()``. DICOM pixel data is decoded and passed
    through the rescale/window tags, so a short PixelData element fails here.
    """
    path = Path(path)
    data = _read_bytes(path)
    if _is_dicom(path):
        ds = _read_dicom(path, data)
        if "PixelData" not in ds or "Rows" not in ds or "Columns" not in ds:
            raise DataError(f"DICOM file {path} has no pixel data; remove it or export the image")
        _dicom_values(ds, path)
    else:
        _decode_pil(path, data)
    return hashlib.sha256(data).hexdigest()


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise _unreadable(path, err) from None


def _decode_pil(path: Path, data: bytes) -> None:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except Exception as err:  # PIL raises many types for damaged files
        raise _unreadable(path, err) from None


def load_image(path: str | Path) -> Image.Image:
    """Load any supported image as 8-bit RGB, the input every CLIP transform expects."""
    path = Path(path)
    if _is_dicom(path):
        return _load_dicom(path)
    if not _is_image_name(path.name):
        raise DataError(f"{path} is not an image ({_suffix_list()}); convert or remove it")
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                # 16-bit PNGs: convert("RGB") would clip them to white, so rescale instead.
                return _to_rgb(np.asarray(image, dtype=np.float64), invert=False)
            return image.convert("RGB")
    except DataError:
        raise
    except Exception as err:
        raise _unreadable(path, err) from None


def _is_dicom(path: Path) -> bool:
    return path.suffix.lower() == ".dcm"


def _unreadable(path: Path, err: BaseException) -> DataError:
    if isinstance(err, OSError) and err.strerror:  # from the file system: no path repeated
        fix = ("give the account running nearl read access to it" if isinstance(err, PermissionError)
               else "replace or remove the file")
        return DataError(f"cannot read image {path} ({err.strerror}); {fix}")
    reason = " ".join(str(err).split()) or type(err).__name__
    return DataError(f"cannot read image {path} ({reason}); replace or remove the file")


def _read_dicom(path: Path, data: bytes | None = None):  # -> pydicom.Dataset
    """Parse a DICOM file, from ``data`` when its bytes were already read."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    def source():
        return path if data is None else io.BytesIO(data)

    try:
        try:
            return pydicom.dcmread(source())
        except InvalidDicomError:
            # Files written without the 128-byte preamble are common in PACS exports.
            ds = pydicom.dcmread(source(), force=True)
            if "PixelData" not in ds:
                raise
            return ds
    except Exception as err:
        raise _unreadable(path, err) from None


def _load_dicom(path: Path) -> Image.Image:
    ds = _read_dicom(path)
    values = _dicom_values(ds, path)
    if int(ds.get("SamplesPerPixel", 1)) == 3:
        return _to_rgb(values, invert=False)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    return _to_rgb(values, invert=photometric == "MONOCHROME1")


def _dicom_values(ds, path: Path) -> np.ndarray:
    """Decoded pixels of the first frame, through the modality and VOI LUTs for grayscale."""
    try:
        pixels = ds.pixel_array
    except Exception as err:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise DataError(
            f"cannot decode pixel data of DICOM file {path} (transfer syntax {syntax}: "
            f"{' '.join(str(err).split())}); replace the file if it was cut short, "
            "or install a decoder plugin or convert it if it is compressed"
        ) from None
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        pixels = pixels[0]  # multi-frame: the first frame stands for the image
    if int(ds.get("SamplesPerPixel", 1)) == 3:
        return pixels.astype(np.float64)
    try:  # here, not at the top: a site without DICOM files never imports pydicom (0.5 s)
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:  # pragma: no cover - pydicom 2.x
        from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut
    try:
        values = apply_modality_lut(pixels, ds).astype(np.float64)
        return apply_voi_lut(values, ds).astype(np.float64)
    except Exception as err:
        raise DataError(
            f"cannot apply the rescale/window tags of DICOM file {path} "
            f"({' '.join(str(err).split())}); fix or remove the tags"
        ) from None


def _to_rgb(values: np.ndarray, *, invert: bool) -> Image.Image:
    """Min-max scale to 0..255, invert if asked, and give grayscale three channels."""
    values = np.nan_to_num(values.astype(np.float64))
    low, high = float(values.min()), float(values.max())
    if high > low:
        scaled = (values - low) * (255.0 / (high - low))
    else:
        scaled = np.zeros_like(values)
    scaled = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    if invert:
        scaled = 255 - scaled
    if scaled.ndim == 2:
        scaled = np.repeat(scaled[:, :, None], 3, axis=2)
    return Image.fromarray(np.ascontiguousarray(scaled), mode="RGB")


# ---------------------------------------------------------------------------
# Torch dataset and reporting


class ImageDataset(torch.utils.data.Dataset):
    """Samples of one split as (tensor, label) pairs, loading each image on demand."""

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: Callable[[Image.Image], torch.Tensor],
    ) -> None:
        self.samples = tuple(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[index]
        return self.transform(load_image(sample.path)), sample.label


def format_counts(site: SiteData) -> str:
    """A plain-text table of images per class and split, for `nearl check-data` and logs."""
    counts = site.counts()
    splits = [split for split in SPLITS if split in counts]
    header = ["class", *splits, "total"]
    rows = [
        [name, *(str(counts[s][name]) for s in splits), str(sum(counts[s][name] for s in splits))]
        for name in site.classes
    ]
    totals = [sum(counts[s].values()) for s in splits]
    rows.append(["total", *(str(t) for t in totals), str(sum(totals))])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def render(row: list[str]) -> str:
        first = row[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(row[1:], widths[1:]))
        return "  ".join([first, *rest])

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([render(header), rule, *(render(r) for r in rows[:-1]), rule, render(rows[-1])])
