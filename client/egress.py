"""Egress check: the last gate before a reply leaves the hospital.

A reply may hold exactly

* ``arrays``  (train replies only): one ArrayRecord with precisely the adapter tensors of
  the agreed schema (same names, shapes and dtypes; plain numpy arrays);
* ``metrics``: one MetricRecord of scalar numbers (no lists: a list could carry
  per-sample outputs), at most :data:`MAX_METRICS` keys with short names;
* ``site``:    one ConfigRecord holding only ``name``, the site's short name.

Anything else (another record, a backbone tensor, an extra or mis-shaped array, a
string metric, per-sample values) raises :class:`EgressError`, which aborts the reply:
the ClientApp fails the message and the server sees an error instead of data.
"""

from __future__ import annotations

import math
import re
from typing import Mapping

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from nearl_core.errors import NearlError

MAX_METRICS = 256
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
METRIC_NAME = re.compile(r"^[A-Za-z0-9_.\-/]{1,120}$")
Schema = Mapping[str, tuple[tuple[int, ...], str]]


class EgressError(NearlError):
    """A reply would carry something other than adapter tensors and scalar metrics."""


def check_reply(content: RecordDict, schema: Schema, *, with_arrays: bool) -> None:
    """Raise :class:`EgressError` unless ``content`` holds only what may leave the site."""
    allowed = {"metrics": MetricRecord, "site": ConfigRecord}
    if with_arrays:
        allowed["arrays"] = ArrayRecord
    keys = set(content.keys())
    if keys != set(allowed):
        raise EgressError(f"reply records {sorted(keys)} differ from the allowed {sorted(allowed)}")
    for key, kind in allowed.items():
        if type(content[key]) is not kind:
            raise EgressError(f"reply record '{key}' is a {type(content[key]).__name__}, expected {kind.__name__}")
    if with_arrays:
        _check_arrays(content["arrays"], schema)
    _check_metrics(content["metrics"])
    _check_site(content["site"])


def _check_arrays(arrays: ArrayRecord, schema: Schema) -> None:
    names = set(arrays.keys())
    missing, extra = sorted(set(schema) - names), sorted(names - set(schema))
    if missing or extra:
        raise EgressError(f"outgoing tensors differ from the adapter schema (missing {missing[:3]}, "
                          f"not adapter tensors {extra[:3]}); refusing to send")
    for name, (shape, dtype) in schema.items():
        arr = arrays[name]
        if arr.stype != "numpy.ndarray":
            raise EgressError(f"tensor '{name}' is serialized as {arr.stype!r}, expected numpy.ndarray")
        if tuple(arr.shape) != tuple(shape) or str(arr.dtype) != dtype:
            raise EgressError(f"tensor '{name}' is {arr.dtype}{list(arr.shape)}, the schema says {dtype}{list(shape)}")
        if len(arr.data) > _nbytes(shape, dtype) + 1024:  # npy header only; no hidden trailing bytes
            raise EgressError(f"tensor '{name}' carries {len(arr.data)} bytes, more than its shape needs")


def _nbytes(shape: tuple[int, ...], dtype: str) -> int:
    import numpy as np

    return int(math.prod(shape)) * np.dtype(dtype).itemsize


def _check_metrics(metrics: MetricRecord) -> None:
    if len(metrics) > MAX_METRICS:
        raise EgressError(f"{len(metrics)} metrics in the reply, at most {MAX_METRICS} allowed")
    for key, value in metrics.items():
        if not METRIC_NAME.match(key):
            raise EgressError(f"metric name {key!r} is not allowed (letters, digits, _ . - / only)")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise EgressError(f"metric '{key}' is a {type(value).__name__}; only scalar numbers may leave the site")


def _check_site(site: ConfigRecord) -> None:
    if set(site.keys()) != {"name"}:
        raise EgressError(f"site record holds {sorted(site.keys())}; only 'name' may leave the site")
    name = site["name"]
    if not isinstance(name, str) or not SITE_NAME.match(name):
        raise EgressError(f"site name {name!r} must be 1-64 letters, digits, '_', '.' or '-'")


def valid_site_name(name: str) -> bool:
    return bool(SITE_NAME.match(name))
