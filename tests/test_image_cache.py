"""Decoded-image cache: bit-identical tensors, each file decoded once, replaced files decoded again."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torchvision import transforms as T

from nearl_core import image_cache
from nearl_core.data import ImageDataset, scan_site
from nearl_core.image_cache import CachedImageDataset, DecodedImages, image_dataset, split_transform


def clip_like_transform(size: int = 24) -> T.Compose:
    """The shape of open_clip's eval transform: resize, crop, RGB, to tensor, normalize."""
    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                      lambda im: im.convert("RGB"), T.ToTensor(),
                      T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])


@pytest.fixture
def samples(demo_root):
    return scan_site(demo_root / "site1").samples("train")[:6]


@pytest.fixture
def counted(monkeypatch):
    calls = []
    real = image_cache.load_image

    def load(path):
        calls.append(str(path))
        return real(path)

    monkeypatch.setattr(image_cache, "load_image", load)
    return calls


def test_cached_tensors_are_bit_identical_to_the_plain_dataset_and_each_file_is_decoded_once(samples, counted):
    transform = clip_like_transform()
    plain = ImageDataset(samples, transform)
    cached = CachedImageDataset(samples, transform, DecodedImages(2**30), split_transform(transform))
    for _ in range(3):  # three epochs
        for i in range(len(samples)):
            (a, la), (b, lb) = plain[i], cached[i]
            assert la == lb and a.dtype == b.dtype and torch.equal(a, b)
    assert len(counted) == len(samples)
    assert cached.cache.hits == 2 * len(samples) and cached.cache.misses == len(samples)


def test_a_replaced_file_is_decoded_again(samples, counted, tmp_path):
    from PIL import Image

    path = tmp_path / "x.png"
    Image.new("RGB", (30, 30), (10, 20, 30)).save(path)
    transform = clip_like_transform()
    to_pixels, to_tensor, key = split_transform(transform)
    cache = DecodedImages(2**30)
    first = cache.pixels(path, to_pixels, key)
    Image.new("RGB", (30, 30), (200, 20, 30)).save(path)
    os.utime(path, ns=(1, 1))  # a different modification time, whatever the clock's resolution
    second = cache.pixels(path, to_pixels, key)
    assert len(counted) == 2 and not np.array_equal(first, second)


def test_the_cache_keeps_within_its_size_dropping_the_least_recently_used(samples, counted):
    transform = clip_like_transform()
    to_pixels, _, key = split_transform(transform)
    one = to_pixels(image_cache.load_image(samples[0].path)).nbytes
    cache = DecodedImages(2 * one)
    counted.clear()
    for s in (samples[0], samples[1], samples[0], samples[2], samples[0]):
        cache.pixels(s.path, to_pixels, key)
    assert cache.bytes <= 2 * one
    assert len(counted) == 3  # samples[0] stayed (recently used), samples[1] was dropped for samples[2]


def test_random_augmentations_and_loader_workers_are_never_cached(samples, monkeypatch):
    augmented = T.Compose([T.RandomResizedCrop(24), T.ToTensor()])
    assert split_transform(augmented) is None
    assert type(image_dataset(samples, augmented, in_process=True)) is ImageDataset
    assert type(image_dataset(samples, clip_like_transform(), in_process=False)) is ImageDataset
    assert type(image_dataset(samples, clip_like_transform(), in_process=True)) is CachedImageDataset


def test_the_cache_size_comes_from_the_environment(monkeypatch):
    monkeypatch.setattr(image_cache, "_shared", None)
    monkeypatch.setenv(image_cache.ENV, "0")
    assert image_cache.shared_cache() is None
    monkeypatch.setenv(image_cache.ENV, "lots")
    with pytest.raises(ValueError, match="NEARL_IMAGE_CACHE_MB='lots' is not a number"):
        image_cache.shared_cache()
    monkeypatch.setenv(image_cache.ENV, "2")
    assert image_cache.shared_cache().max_bytes == 2 * 2**20


def test_the_backbones_own_eval_transform_is_cached_and_gives_the_same_tensors(samples):
    from nearl_core.backbone import build_backbone
    from nearl_core.config import load_config

    preprocess = build_backbone(load_config("demo").model).preprocess
    split = split_transform(preprocess)
    assert split is not None, preprocess
    cached = CachedImageDataset(samples, preprocess, DecodedImages(2**30), split)
    plain = ImageDataset(samples, preprocess)
    assert all(torch.equal(plain[i][0], cached[i][0]) for i in range(len(samples)))
