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

import re

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from nearl_core.errors import NearlError
from nearl_protocol import keys
from nearl_protocol.arrays import PayloadError, decode_array
from nearl_protocol.schema import Schema, schema_problem

MAX_METRICS = 256
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
METRIC_NAME = re.compile(r"^[A-Za-z0-9_.\-/]{1,120}$")


class EgressError(NearlError):
    """A reply would carry something other than adapter tensors and scalar metrics."""


def check_reply(content: RecordDict, schema: Schema, *, with_arrays: bool) -> None:
    """Raise :class:`EgressError` unless ``content`` holds only what may leave the site."""
    allowed: dict[str, type] = {keys.METRICS: MetricRecord, keys.SITE: ConfigRecord}
    if with_arrays:
        allowed[keys.ARRAYS] = ArrayRecord
    records = set(content.keys())
    if records != set(allowed):
        raise EgressError(f"reply records {sorted(records)} differ from the allowed {sorted(allowed)}")
    for key, kind in allowed.items():
        if type(content[key]) is not kind:
            raise EgressError(f"reply record '{key}' is a {type(content[key]).__name__}, expected {kind.__name__}")
    if with_arrays:
        _check_arrays(content[keys.ARRAYS], schema)
    _check_metrics(content[keys.METRICS])
    _check_site(content[keys.SITE])


def _check_arrays(arrays: ArrayRecord, schema: Schema) -> None:
    problem = schema_problem(arrays, schema)
    if problem:
        raise EgressError(f"outgoing {problem}; refusing to send")
    for name, arr in arrays.items():
        try:
            decode_array(arr)  # bytes agree with the stated layout: nothing hidden after the data
        except PayloadError as err:
            raise EgressError(f"tensor '{name}': {err}; refusing to send") from None


def _check_metrics(metrics: MetricRecord) -> None:
    if len(metrics) > MAX_METRICS:
        raise EgressError(f"{len(metrics)} metrics in the reply, at most {MAX_METRICS} allowed")
    for key, value in metrics.items():
        if not METRIC_NAME.match(key):
            raise EgressError(f"metric name {key!r} is not allowed (letters, digits, _ . - / only)")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise EgressError(f"metric '{key}' is a {type(value).__name__}; only scalar numbers may leave the site")


def _check_site(site: ConfigRecord) -> None:
    if set(site.keys()) != {keys.SITE_NAME}:
        raise EgressError(f"site record holds {sorted(site.keys())}; only '{keys.SITE_NAME}' may leave the site")
    name = site[keys.SITE_NAME]
    if not isinstance(name, str) or not SITE_NAME.match(name):
        raise EgressError(f"site name {name!r} must be 1-64 letters, digits, '_', '.' or '-'")


def valid_site_name(name: str) -> bool:
    return bool(SITE_NAME.match(name))
