"""Split one pooled data set into virtual hospitals, deterministically given the seed.

Flower Datasets' partitioners decide which image goes to which site (Dirichlet label
skew, IID, pathological); we only pool the images and write each virtual site as a
``manifest.csv`` with absolute paths, so that a virtual site is read by exactly the same
code as a real hospital's folder and no image is copied.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nearl_core.data import IMAGE_SUFFIXES, SPLITS, scan_site
from nearl_core.errors import DataError


@dataclass(frozen=True)
class Pool:
    """Every image available to the simulation, with its label index."""

    paths: tuple[str, ...]
    labels: tuple[int, ...]
    classes: tuple[str, ...]


def in_order(pool: Pool, classes: tuple[str, ...]) -> Pool:
    """The same images with their labels numbered in ``classes``' order (the same set of names)."""
    index = {name: i for i, name in enumerate(classes)}
    return Pool(pool.paths, tuple(index[pool.classes[label]] for label in pool.labels), tuple(classes))


def pool_images(root: str | Path, classes: tuple[str, ...] | None = None, cache: Path | None = None) -> Pool:
    """Pool a demo-data root (site folders), a site / ImageFolder root, or a MedMNIST ``.npz``."""
    root = Path(root)
    if root.suffix == ".npz":
        return _pool_npz(root, cache or root.with_suffix(""), classes)
    if not root.is_dir():
        raise DataError(f"--data {root} does not exist; give an ImageFolder root, a folder of site folders or a .npz")
    sites = sorted(p for p in root.iterdir() if p.is_dir() and ((p / "train").is_dir() or (p / "manifest.csv").is_file()))
    if (root / "train").is_dir() or (root / "manifest.csv").is_file():
        sites = [root]
    if sites:
        return _pool_sites(sites, classes)
    return _pool_class_folders(root, classes)


def _pool_sites(sites: list[Path], classes: tuple[str, ...] | None) -> Pool:
    paths, labels, names = [], [], None
    for site_root in sites:
        site = scan_site(site_root, classes, verify=False)
        names = names or site.classes
        if site.classes != names:
            raise DataError(f"{site_root} has classes {site.classes}, other sites {names}; set task.classes in the config")
        for samples in site.splits.values():
            paths += [str(s.path.resolve()) for s in samples]
            labels += [s.label for s in samples]
    return Pool(tuple(paths), tuple(labels), tuple(names or ()))


def _pool_class_folders(root: Path, classes: tuple[str, ...] | None) -> Pool:
    """A plain ``root/<class>/*`` folder."""
    found = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
    names = classes or found
    unknown = set(found) - set(names)
    if not found or unknown:
        raise DataError(f"{root}: expected <class>/ folders (found {list(found)}, unknown {sorted(unknown)})")
    paths, labels = [], []
    for i, name in enumerate(names):
        for f in sorted((root / name).glob("*")) if (root / name).is_dir() else []:
            if f.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(str(f.resolve()))
                labels.append(i)
    return Pool(tuple(paths), tuple(labels), tuple(names))


def _pool_npz(npz: Path, cache: Path, classes: tuple[str, ...] | None) -> Pool:
    """MedMNIST-style arrays (``train_images``/``train_labels``, ...), written once as PNGs."""
    from PIL import Image

    if not npz.is_file():
        raise DataError(f"--data {npz} not found; give a MedMNIST-style .npz file (e.g. pneumoniamnist.npz)")
    arrays = np.load(npz)
    keys = [s for s in ("train", "val", "test") if f"{s}_images" in arrays]
    if not keys:
        raise DataError(f"{npz} has no '<split>_images' arrays; expected MedMNIST keys train_images, train_labels")
    images = np.concatenate([arrays[f"{s}_images"] for s in keys])
    labels = np.concatenate([arrays[f"{s}_labels"].reshape(-1) for s in keys]).astype(int)
    names = classes or tuple(f"class{i}" for i in range(int(labels.max()) + 1))
    paths = []
    for i, (img, label) in enumerate(zip(images, labels)):
        path = cache / names[label] / f"{i:06d}.png"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.astype(np.uint8)).save(path)
        paths.append(str(path.resolve()))
    return Pool(tuple(paths), tuple(int(x) for x in labels), tuple(names))


def partition(pool: Pool, sites: int, alpha: str | float, seed: int) -> list[list[int]]:
    """Indices per site: ``alpha`` a float (Dirichlet label skew), ``iid``, or ``pathological:K``."""
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    n = len(pool.paths)
    if n < 3 * sites:
        raise DataError(f"{n} images cannot make {sites} sites of at least 3 images; use fewer --sites or more data")
    spec = str(alpha)
    if spec == "iid":
        part = IidPartitioner(num_partitions=sites)
    elif spec.startswith("pathological:"):
        k = int(spec.split(":", 1)[1])
        part = PathologicalPartitioner(num_partitions=sites, partition_by="label", num_classes_per_partition=k,
                                       seed=seed)
    else:
        try:
            value = float(spec)
        except ValueError:
            raise DataError(f"--alpha {spec}: give a positive number, 'iid' or 'pathological:K'") from None
        if value <= 0:
            raise DataError(f"--alpha {spec}: the Dirichlet concentration must be > 0")
        minimum = 3  # one train, one val and one test image per site
        part = DirichletPartitioner(num_partitions=sites, partition_by="label", alpha=value,
                                    min_partition_size=minimum, self_balancing=False, seed=seed)
    # IidPartitioner cuts contiguous chunks: the pool (ordered by site and class) is shuffled first.
    part.dataset = Dataset.from_dict({"index": list(range(n)), "label": list(pool.labels)}).shuffle(seed=seed)
    try:
        return [sorted(int(i) for i in part.load_partition(k)["index"]) for k in range(sites)]
    except ValueError as err:  # the Dirichlet partitioner gives up when sites keep coming out too small
        raise DataError(f"--alpha {spec} with {sites} sites over {n} images: {err}; raise --alpha, "
                        "use fewer --sites or more data") from None


def split_site(indices: list[int], seed: int, val_frac: float = 0.15, test_frac: float = 0.15) -> dict[str, list[int]]:
    """Each virtual site's own train/val/test split (at least one train and one val image)."""
    rng = np.random.default_rng(seed)
    order = [indices[i] for i in rng.permutation(len(indices))]
    n_val = max(1, round(len(order) * val_frac))
    n_test = max(1, round(len(order) * test_frac)) if len(order) >= 3 else 0
    return {"val": order[:n_val], "test": order[n_val:n_val + n_test], "train": order[n_val + n_test:]}


def write_virtual_sites(pool: Pool, parts: list[list[int]], out: Path, seed: int) -> list[Path]:
    """out/site1..siteN/manifest.csv (absolute paths; the images stay where they are)."""
    roots = []
    for k, indices in enumerate(parts, start=1):
        site = out / f"site{k}"
        site.mkdir(parents=True, exist_ok=True)
        splits = split_site(indices, seed + k)
        with open(site / "manifest.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["path", "label", "split"])
            for split in SPLITS:
                for i in splits.get(split, []):
                    writer.writerow([pool.paths[i], pool.classes[pool.labels[i]], split])
        roots.append(site)
    return roots


def summary_table(pool: Pool, parts: list[list[int]]) -> list[dict]:
    """Rows ``{site, <class>: count, total}``: examples per site per class."""
    rows = []
    for k, indices in enumerate(parts, start=1):
        counts = np.bincount([pool.labels[i] for i in indices], minlength=len(pool.classes))
        rows.append({"site": f"site{k}", **{c: int(n) for c, n in zip(pool.classes, counts)}, "total": len(indices)})
    return rows


def format_summary(pool: Pool, rows: list[dict]) -> str:
    cols = ["site", *pool.classes, "total"]
    width = max(8, *(len(c) + 2 for c in cols))
    lines = ["".join(f"{c:>{width}}" for c in cols)]
    lines += ["".join(f"{str(r[c]):>{width}}" for c in cols) for r in rows]
    return "\n".join(lines)
