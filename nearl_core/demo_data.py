"""Synthetic, chest-X-ray-like demo data for several virtual hospitals.

Nobody can ship real patient images with a repository, yet a federation needs data
that behaves like a multi-site medical task to be tried, tested and benchmarked. This
module draws such data procedurally: a dark field with two brighter "lung" ellipses
and smooth texture, plus a class-specific finding:

- ``normal``: background only;
- ``nodule``: one to three small bright round blobs with soft edges inside the lungs;
- ``opacity``: one large diffuse, cloudy brightening inside one lung.

Each site differs the way real hospitals do: its scanner shifts intensity, contrast,
sharpness and noise (acquisition shift), and its case mix differs (label skew drawn from
a Dirichlet distribution). Everything is deterministic in ``seed``: the same arguments
give byte-identical PNG files.
"""

from __future__ import annotations

import functools
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from nearl_core.errors import DataError

DEMO_CLASSES = ("normal", "nodule", "opacity")

README_TITLE = "# NEARL demo data: SYNTHETIC images"
_SPLIT_ORDER = ("train", "val", "test")

# Ranges the per-site acquisition shift is drawn from; wide enough to matter to a model,
# narrow enough that every site still shows recognisable anatomy.
OFFSET_RANGE = (-0.08, 0.08)   # added brightness, fraction of full scale
GAIN_RANGE = (0.75, 1.25)      # contrast multiplier
BLUR_RANGE = (0.0, 1.0)        # Gaussian blur sigma in pixels of a 64-pixel image
NOISE_RANGE = (0.01, 0.04)     # additive Gaussian noise std, fraction of full scale
DIRICHLET_ALPHA = 1.0
UNIFORM_MIX = 0.5              # share of the uniform distribution in each site's class mix


@dataclass(frozen=True)
class SiteProfile:
    """How one virtual hospital's scanner and case mix differ from the others."""

    name: str
    offset: float
    gain: float
    blur: float
    noise: float
    proportions: tuple[float, ...]


def site_profile(site_index: int, seed: int = 0) -> SiteProfile:
    """The acquisition shift and class mix of site ``site_index`` (1-based) for ``seed``.

    Drawn from its own seeded generator so a site's profile does not depend on how many
    sites are generated.
    """
    rng = np.random.default_rng([seed, site_index, 7919])
    dirichlet = rng.dirichlet(np.full(len(DEMO_CLASSES), DIRICHLET_ALPHA))
    proportions = (1 - UNIFORM_MIX) * dirichlet + UNIFORM_MIX / len(DEMO_CLASSES)
    return SiteProfile(
        name=f"site{site_index}",
        offset=float(rng.uniform(*OFFSET_RANGE)),
        gain=float(rng.uniform(*GAIN_RANGE)),
        blur=float(rng.uniform(*BLUR_RANGE)),
        noise=float(rng.uniform(*NOISE_RANGE)),
        proportions=tuple(float(p) for p in proportions),
    )


def generate_demo_data(
    out: str | Path,
    sites: int,
    *,
    train_per_site: int = 96,
    val_per_site: int = 24,
    test_per_site: int = 24,
    image_size: int = 64,
    seed: int = 0,
    overwrite: bool = False,
) -> list[Path]:
    """Write ``out/site1 .. out/siteN`` in the ImageFolder layout plus ``out/README.md``.

    Refuses to touch a non-empty site folder (or a README it did not write) unless
    ``overwrite`` is set, so a user's own data is never replaced silently. Returns the
    site folders in order.
    """
    out = Path(out).expanduser()
    _check_arguments(sites, train_per_site, val_per_site, test_per_site, image_size, seed)
    site_dirs = [out / f"site{k}" for k in range(1, sites + 1)]
    _check_targets(out, site_dirs, overwrite)
    split_sizes = {"train": train_per_site, "val": val_per_site, "test": test_per_site}
    profiles = [site_profile(k, seed) for k in range(1, sites + 1)]
    all_counts = []
    for k, (site_dir, profile) in enumerate(zip(site_dirs, profiles), start=1):
        if site_dir.exists():
            shutil.rmtree(site_dir)
        all_counts.append(_write_site(site_dir, k, profile, split_sizes, image_size, seed))
    (out / "README.md").write_text(
        _readme(profiles, all_counts, split_sizes, image_size, seed), encoding="utf-8"
    )
    return site_dirs


# ---------------------------------------------------------------------------
# Checks


def _check_arguments(
    sites: int, train: int, val: int, test: int, image_size: int, seed: int
) -> None:
    limits = [
        ("sites", sites, 1),
        ("train_per_site", train, 1),
        ("val_per_site", val, 1),
        ("test_per_site", test, 0),
        ("image_size", image_size, 16),
        ("seed", seed, 0),
    ]
    for name, value, minimum in limits:
        if int(value) != value or value < minimum:
            raise DataError(
                f"{name} must be an integer >= {minimum} (got {value!r}); choose another value"
            )


def _check_targets(out: Path, site_dirs: list[Path], overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} is a file, not a folder; choose another --out")
    for site_dir in site_dirs:
        if site_dir.exists() and not site_dir.is_dir():
            raise DataError(f"{site_dir} is a file; remove it or choose another --out")
        if site_dir.is_dir() and any(site_dir.iterdir()) and not overwrite:
            raise DataError(f"{site_dir} exists; pass --overwrite or choose another --out")
    readme = out / "README.md"
    if readme.is_file() and not overwrite and not _is_our_readme(readme):
        raise DataError(
            f"{readme} exists and was not written by demo-data; "
            "pass --overwrite or choose another --out"
        )


def _is_our_readme(readme: Path) -> bool:
    try:
        with readme.open(encoding="utf-8") as handle:
            return handle.readline().rstrip("\n") == README_TITLE
    except (OSError, UnicodeDecodeError):
        return False


# ---------------------------------------------------------------------------
# Writing


def allocate_counts(total: int, proportions: tuple[float, ...], minimum: int = 0) -> list[int]:
    """Split ``total`` images over classes in ``proportions`` (largest remainder).

    ``minimum`` images per class are guaranteed where ``total`` allows, taken from the
    largest classes, so small val/test splits still contain every class.
    """
    shares = np.asarray(proportions, dtype=np.float64) * total
    counts = np.floor(shares).astype(int)
    order = np.argsort(-(shares - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    if total >= minimum * len(counts):
        for i in range(len(counts)):
            while counts[i] < minimum:
                counts[int(np.argmax(counts))] -= 1
                counts[i] += 1
    return [int(c) for c in counts]


def _write_site(
    site_dir: Path,
    site_index: int,
    profile: SiteProfile,
    split_sizes: dict[str, int],
    image_size: int,
    seed: int,
) -> dict[str, list[int]]:
    counts: dict[str, list[int]] = {}
    for split_index, split in enumerate(_SPLIT_ORDER):
        total = split_sizes[split]
        if total == 0:
            continue
        minimum = 0 if split == "train" else 1
        counts[split] = allocate_counts(total, profile.proportions, minimum)
        labels = np.repeat(np.arange(len(DEMO_CLASSES)), counts[split])
        for name in DEMO_CLASSES:
            (site_dir / split / name).mkdir(parents=True, exist_ok=True)
        for i, label in enumerate(labels):
            rng = np.random.default_rng([seed, site_index, split_index, i])
            pixels = render_image(rng, DEMO_CLASSES[label], image_size, profile)
            path = site_dir / split / DEMO_CLASSES[label] / f"{split}_{i:04d}.png"
            Image.fromarray(pixels, mode="L").save(path, format="PNG")
    return counts


# ---------------------------------------------------------------------------
# Rendering (all coordinates in [-1, 1], intensities in [0, 1])


def render_image(rng: np.random.Generator, label: str, size: int, profile: SiteProfile) -> np.ndarray:
    """One ``size`` x ``size`` uint8 image of class ``label`` as seen by ``profile``'s scanner."""
    y, x = _grid(size)
    image, lungs = _anatomy(rng, x, y, size)
    if label == "nodule":
        image = image + _nodules(rng, x, y, lungs)
    elif label == "opacity":
        image = image + _opacity(rng, x, y, size, lungs)
    elif label != "normal":
        raise ValueError(f"unknown demo class {label!r}")
    return _acquire(rng, image, size, profile)


@dataclass(frozen=True)
class _Lung:
    cx: float
    cy: float
    rx: float
    ry: float
    mask: np.ndarray


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    centres = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    y, x = np.meshgrid(centres, centres, indexing="ij")
    y.flags.writeable = False
    x.flags.writeable = False
    return y, x


def _soft_ellipse(
    x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float, edge: float
) -> np.ndarray:
    """1 inside the ellipse, 0 outside, with a logistic edge ``edge`` (radius units) wide."""
    r = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
    return 1.0 / (1.0 + np.exp((r - 1.0) / edge))


def _anatomy(
    rng: np.random.Generator, x: np.ndarray, y: np.ndarray, size: int
) -> tuple[np.ndarray, list[_Lung]]:
    body = _soft_ellipse(x, y, rng.uniform(-0.03, 0.03), 0.08, rng.uniform(0.82, 0.9), 1.0, 0.08)
    image = 0.08 + 0.10 * body + 0.03 * _smooth_field(rng, size, 4)
    lungs = []
    for side in (-1.0, 1.0):
        cx = side * rng.uniform(0.36, 0.44)
        cy = rng.uniform(-0.08, 0.04)
        rx, ry = rng.uniform(0.24, 0.30), rng.uniform(0.50, 0.62)
        mask = _soft_ellipse(x, y, cx, cy, rx, ry, 0.12)
        lungs.append(_Lung(cx, cy, rx, ry, mask))
    lung_mask = np.maximum(lungs[0].mask, lungs[1].mask)
    ribs = np.sin(2 * np.pi * (rng.uniform(3.5, 4.5) * y + rng.uniform(0, 1)))
    texture = 0.035 * _smooth_field(rng, size, 6) + 0.02 * ribs
    image = image + lung_mask * (0.28 + texture)
    return image, lungs


def _point_in_lung(rng: np.random.Generator, lung: _Lung, max_radius: float) -> tuple[float, float]:
    angle = rng.uniform(0, 2 * np.pi)
    rho = max_radius * np.sqrt(rng.uniform())
    return lung.cx + rho * lung.rx * np.cos(angle), lung.cy + rho * lung.ry * np.sin(angle)


def _nodules(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, lungs: list[_Lung]) -> np.ndarray:
    finding = np.zeros_like(x)
    for _ in range(int(rng.integers(1, 4))):
        lung = lungs[int(rng.integers(len(lungs)))]
        cx, cy = _point_in_lung(rng, lung, 0.65)
        radius = rng.uniform(0.07, 0.11)
        blob = _soft_ellipse(x, y, cx, cy, radius, radius, 0.18)
        finding = np.maximum(finding, rng.uniform(0.35, 0.50) * blob)
    return finding


def _opacity(
    rng: np.random.Generator, x: np.ndarray, y: np.ndarray, size: int, lungs: list[_Lung]
) -> np.ndarray:
    lung = lungs[int(rng.integers(len(lungs)))]
    cx, cy = _point_in_lung(rng, lung, 0.35)
    rx, ry = lung.rx * rng.uniform(0.75, 1.0), lung.ry * rng.uniform(0.5, 0.75)
    patch = _soft_ellipse(x, y, cx, cy, rx, ry, 0.25)
    cloud = np.clip(0.7 + 0.3 * _smooth_field(rng, size, 7), 0.0, 1.0)
    return rng.uniform(0.30, 0.40) * patch * cloud * (0.4 + 0.6 * lung.mask)


def _acquire(
    rng: np.random.Generator, image: np.ndarray, size: int, profile: SiteProfile
) -> np.ndarray:
    """Apply the site's scanner: blur, contrast gain, brightness offset, noise; quantise."""
    blur = _blur_matrix(size, round(profile.blur * size / 64, 3))
    image = blur @ image @ blur.T
    image = image * profile.gain + profile.offset
    image = image + rng.normal(0.0, profile.noise, image.shape)
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def _smooth_field(rng: np.random.Generator, size: int, knots: int) -> np.ndarray:
    """Low-frequency noise with unit standard deviation, from a coarse random grid."""
    interp = _interpolation_matrix(size, knots)
    field = interp @ rng.standard_normal((knots, knots)) @ interp.T
    return (field - field.mean()) / (field.std() + 1e-8)


@functools.lru_cache(maxsize=32)
def _interpolation_matrix(size: int, knots: int) -> np.ndarray:
    positions = (np.arange(size) + 0.5) / size
    knot_positions = (np.arange(knots) + 0.5) / knots
    weights = np.exp(-0.5 * ((positions[:, None] - knot_positions[None, :]) * knots) ** 2)
    weights /= weights.sum(axis=1, keepdims=True)
    weights.flags.writeable = False
    return weights


@functools.lru_cache(maxsize=64)
def _blur_matrix(size: int, sigma: float) -> np.ndarray:
    """Row-normalised Gaussian blur as a matrix, so a 2-D blur is two matrix products."""
    if sigma < 0.2:
        matrix = np.eye(size)
    else:
        index = np.arange(size)
        matrix = np.exp(-0.5 * ((index[:, None] - index[None, :]) / sigma) ** 2)
        matrix /= matrix.sum(axis=1, keepdims=True)
    matrix.flags.writeable = False
    return matrix


# ---------------------------------------------------------------------------
# README


def _readme(
    profiles: list[SiteProfile],
    counts: list[dict[str, list[int]]],
    split_sizes: dict[str, int],
    image_size: int,
    seed: int,
) -> str:
    class_list = ", ".join(DEMO_CLASSES)
    lines = [
        README_TITLE,
        "",
        "**These images are SYNTHETIC.** They were procedurally generated by",
        "`nearl_core.demo_data` and show no real patient. They only imitate the look of",
        "chest X-rays so that the federation can be tried end to end; never use them to",
        "judge clinical performance.",
        "",
        f"Generated with seed {seed}, {len(profiles)} site(s), {image_size}x{image_size}",
        f"grayscale PNG images; per site {split_sizes['train']} train, {split_sizes['val']} val",
        f"and {split_sizes['test']} test images. Layout: `siteK/<split>/<class>/*.png`.",
        "The same arguments always give byte-identical files.",
        "",
        "## Classes",
        "",
        "- `normal`: dark field with two brighter elliptical lung regions with soft",
        "  edges and smooth low-frequency texture, nothing else.",
        "- `nodule`: the same anatomy plus one to three small bright round blobs with",
        "  soft edges inside the lungs.",
        "- `opacity`: the same anatomy plus one large diffuse, cloudy brightening inside",
        "  one lung.",
        "",
        "Positions, sizes and brightness are random per image.",
        "",
        "## Per-site shifts",
        "",
        "Each site imitates its own scanner (acquisition shift: brightness offset, contrast",
        "gain, blur sigma in pixels, noise std, drawn from the seed) and its own case mix",
        f"(label skew: class proportions = {1 - UNIFORM_MIX:g} x Dirichlet(alpha={DIRICHLET_ALPHA:g})",
        f"+ {UNIFORM_MIX:g} x uniform). Val and test follow the site's mix with at least one",
        "image per class.",
        "",
        f"| site | offset | gain | blur | noise | train ({class_list}) |",
        "|---|---|---|---|---|---|",
    ]
    for profile, site_counts in zip(profiles, counts):
        train = " / ".join(str(c) for c in site_counts["train"])
        blur = profile.blur * image_size / 64
        lines.append(
            f"| {profile.name} | {profile.offset:+.3f} | {profile.gain:.3f} | {blur:.2f} "
            f"| {profile.noise:.3f} | {train} |"
        )
    return "\n".join(lines) + "\n"
