"""Decoded images kept in memory, so that a long-lived process decodes each image once.

A warm site's worker (and a simulation actor) trains on the same images every round. Without
a cache every epoch of every round opens, decodes (JPEG, PNG, DICOM windowing) and resizes
each file again. The cache holds each image *after* the backbone's deterministic resize and
crop, as the uint8 array the eval transform would turn into a tensor (150 KB at 224 px),
and applies only the remaining steps (to tensor, normalize) per use, so what the model sees
is bit-identical to the uncached path.

Entries are keyed by file path, size and modification time (a replaced file is decoded
again) and by the transform's steps; the least recently used are dropped beyond
``NEARL_IMAGE_CACHE_MB`` (default 1024 MiB per process; 0 turns the cache off). It is used
only where the data loader runs in the training process (CPU sites; loader workers on CUDA
decode in parallel instead and would not keep what they decode).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from nearl_core.data import ImageDataset, Sample, load_image

ENV = "NEARL_IMAGE_CACHE_MB"
DEFAULT_MB = 1024


def split_transform(transform: Any) -> tuple[Callable, Callable, str] | None:
    """``(to_pixels, to_tensor, key)``: the steps up to the uint8 image and the rest; None if not cacheable.

    Cacheable: a torchvision ``Compose`` whose steps before ``ToTensor`` (or a subclass) are deterministic
    (no ``Random*`` augmentation), like open_clip's eval transform.
    """
    from torchvision.transforms import ToTensor  # open_clip's MaybeToTensor (timm) is a subclass

    steps = list(getattr(transform, "transforms", []) or [])
    cuts = [i for i, step in enumerate(steps) if isinstance(step, ToTensor)]
    if not cuts:
        return None
    prefix, suffix = steps[:cuts[0]], steps[cuts[0]:]
    if any(type(step).__name__.startswith("Random") for step in prefix):
        return None

    def to_pixels(image: Any) -> np.ndarray:
        for step in prefix:
            image = step(image)
        return np.array(image, dtype=np.uint8)  # a writable copy: torch wraps it without a warning

    def to_tensor(pixels: np.ndarray) -> torch.Tensor:
        out: Any = pixels
        for step in suffix:
            out = step(out)
        return out

    return to_pixels, to_tensor, repr(prefix)


class DecodedImages:
    """A bounded, least-recently-used map from (file, transform) to the decoded, resized uint8 image."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def pixels(self, path: str | Path, to_pixels: Callable[[Any], np.ndarray], key: str) -> np.ndarray:
        st = os.stat(path)
        entry = (str(path), st.st_size, st.st_mtime_ns, key)
        with self._lock:
            found = self._items.get(entry)
            if found is not None:
                self._items.move_to_end(entry)
                self.hits += 1
                return found
        pixels = to_pixels(load_image(path))
        with self._lock:
            self.misses += 1
            if pixels.nbytes <= self.max_bytes and entry not in self._items:
                self._items[entry] = pixels
                self.bytes += pixels.nbytes
                while self.bytes > self.max_bytes:
                    _, dropped = self._items.popitem(last=False)
                    self.bytes -= dropped.nbytes
        return pixels

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.bytes = 0


def _configured_bytes() -> int:
    raw = os.environ.get(ENV, str(DEFAULT_MB))
    try:
        mb = float(raw)
    except ValueError:
        raise ValueError(f"{ENV}={raw!r} is not a number; give the cache size in MiB (0 turns it off)") from None
    return max(0, int(mb * 2**20))


_shared: DecodedImages | None = None


def shared_cache() -> DecodedImages | None:
    """This process's cache (None when ``NEARL_IMAGE_CACHE_MB`` is 0)."""
    global _shared
    if _shared is None:
        size = _configured_bytes()
        if size == 0:
            return None
        _shared = DecodedImages(size)
    return _shared


class CachedImageDataset(ImageDataset):
    """:class:`ImageDataset` reading each image's resized pixels through a :class:`DecodedImages` cache."""

    def __init__(self, samples: Sequence[Sample], transform: Any, cache: DecodedImages,
                 split: tuple[Callable, Callable, str]):
        super().__init__(samples, transform)
        self.cache = cache
        self.to_pixels, self.to_tensor, self.key = split

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[index]
        return self.to_tensor(self.cache.pixels(sample.path, self.to_pixels, self.key)), sample.label


def image_dataset(samples: Sequence[Sample], transform: Any, *, in_process: bool) -> ImageDataset:
    """The split's dataset: cached when it is read in this process and the transform allows it."""
    cache = shared_cache() if in_process else None
    split = split_transform(transform) if cache is not None else None
    if cache is None or split is None:
        return ImageDataset(samples, transform)
    return CachedImageDataset(samples, transform, cache, split)
