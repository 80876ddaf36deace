"""Virtual hospitals: deterministic partitions, real label skew, readable site folders."""

from __future__ import annotations

import numpy as np
import pytest

from nearl_core.data import scan_site
from nearl_core.errors import DataError
from simulation.partition import partition, pool_images, split_site, summary_table, write_virtual_sites

CLASSES = ("normal", "nodule", "opacity")


@pytest.fixture(scope="module")
def pool(demo_root):
    return pool_images(demo_root, CLASSES)


def _label_share(pool, parts):
    counts = np.array([np.bincount([pool.labels[i] for i in p], minlength=3) for p in parts], dtype=float)
    return counts / counts.sum(1, keepdims=True)


def test_pool_holds_every_demo_image(pool, demo_root):
    assert len(pool.paths) == 2 * (48 + 12 + 12)
    assert pool.classes == CLASSES and set(pool.labels) == {0, 1, 2}


@pytest.mark.parametrize("alpha", ["0.5", "iid", "pathological:2"])
def test_partition_is_deterministic_and_complete(pool, alpha):
    a, b = partition(pool, 4, alpha, seed=3), partition(pool, 4, alpha, seed=3)
    assert a == b
    flat = [i for p in a for i in p]
    assert len(flat) == len(set(flat)) and set(flat) <= set(range(len(pool.paths)))
    assert partition(pool, 4, alpha, seed=4) != a


def test_dirichlet_skew_grows_as_alpha_shrinks(pool):
    spread = {}
    for alpha in ("0.1", "100", "iid"):
        share = _label_share(pool, partition(pool, 4, alpha, seed=0))
        spread[alpha] = float(np.abs(share - share.mean(0)).mean())
    assert spread["0.1"] > 2 * spread["100"]
    assert spread["0.1"] > 2 * spread["iid"]


def test_pathological_sites_see_only_k_classes(pool):
    for p in partition(pool, 4, "pathological:1", seed=0):
        assert len({pool.labels[i] for i in p}) == 1


def test_virtual_sites_are_read_like_real_ones(pool, tmp_path):
    parts = partition(pool, 3, "0.5", seed=0)
    roots = write_virtual_sites(pool, parts, tmp_path, seed=0)
    for root, indices in zip(roots, parts):
        site = scan_site(root, CLASSES, verify=True)
        assert sum(len(s) for s in site.splits.values()) == len(indices)
        assert site.splits["train"] and site.splits["val"]
    rows = summary_table(pool, parts)
    assert [r["total"] for r in rows] == [len(p) for p in parts]


def test_each_site_split_is_disjoint_and_deterministic():
    s1, s2 = split_site(list(range(40)), seed=1), split_site(list(range(40)), seed=1)
    assert s1 == s2 and len(s1["val"]) == 6 and len(s1["test"]) == 6 and len(s1["train"]) == 28
    assert not set(s1["train"]) & set(s1["val"]) and not set(s1["val"]) & set(s1["test"])


def test_bad_partition_requests_are_explained(pool):
    with pytest.raises(DataError, match="--alpha banana"):
        partition(pool, 4, "banana", seed=0)
    with pytest.raises(DataError, match="cannot make 100 sites"):
        partition(pool, 100, "0.5", seed=0)
