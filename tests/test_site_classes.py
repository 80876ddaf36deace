"""A site and the coordinator's class list: another class is refused in one line, a missing one is reported."""

from __future__ import annotations

import logging
import shutil

import pytest

from client.task import cached_site
from nearl_core.demo_data import generate_demo_data
from nearl_core.errors import DataError


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return generate_demo_data(root, 1, train_per_site=6, val_per_site=3, test_per_site=0)[0]


def test_a_site_holding_a_class_the_federation_does_not_name_is_refused(site, tmp_path):
    copy = tmp_path / "site"
    shutil.copytree(site, copy)
    shutil.copytree(copy / "train" / "normal", copy / "train" / "ct")
    with pytest.raises(DataError) as err:
        cached_site(copy, ("normal", "nodule", "opacity"))
    assert str(err.value) == (f"site folder {copy} holds class 'ct', which the federation's config does not name "
                              "(its classes: normal, nodule, opacity); rename or remove it, or ask the coordinator "
                              "to add it to task.classes")


def test_a_site_lacking_a_class_is_told_and_trains_on_the_others(site, caplog):
    with caplog.at_level(logging.WARNING, logger="nearl.site"):
        data = cached_site(site, ("normal", "nodule", "opacity", "mri"))
    assert data.classes == ("normal", "nodule", "opacity", "mri")
    assert [r.getMessage() for r in caplog.records] == [
        f"site folder {site} has no training images of mri (the federation's classes: normal, nodule, opacity, mri); "
        "it trains on the others"]
