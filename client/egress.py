"""Egress check: the last gate before a reply leaves the hospital.

A reply may hold exactly

* ``arrays``  (train replies only): one ArrayRecord holding one flat array, precisely the
  adapter tensors of the agreed schema packed in its order (:func:`pack_outgoing` checks
  their names, shapes and dtypes before packing; :func:`check_reply` checks the array's
  name, dtype, length and that its bytes agree with its metadata);
* ``metrics``: one MetricRecord of scalar numbers (no lists: a list could carry
  per-sample outputs), at most :data:`MAX_METRICS` keys with short names;
* ``site``:    one ConfigRecord holding only ``name``, the site's short name.

Anything else (another record, a backbone tensor, an extra or mis-shaped tensor, a
second array, a string metric, per-sample values) raises :class:`EgressError`, which
aborts the reply: the site sends a refusal with the one-line reason instead of data.

Under secure aggregation (:mod:`client.secagg`) the plaintext update passes
:func:`pack_outgoing` before it is masked; the masked train reply may then hold only one
uint32 array of the agreed length, scalar metrics without ``num-examples`` (it travels
masked) and the site's name (:func:`check_masked_reply`), and a key-setup, key-sharing
or unmask reply only its stage's agreed record (:func:`check_secagg_reply`).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from nearl_core.errors import NearlError
from nearl_protocol import keys
from nearl_protocol.arrays import PayloadError, decode_array
from nearl_protocol.flat import FlatLayout
from nearl_protocol.schema import Schema

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


def pack_outgoing(tensors: Mapping[str, Any], schema: Schema) -> np.ndarray:
    """The adapters as the one flat array that may leave, after checking every tensor's name, shape and
    dtype against the agreed (wire) schema: the split the coordinator will apply to it."""
    try:
        return FlatLayout.of(schema).pack(tensors)
    except PayloadError as err:
        raise EgressError(f"outgoing {err}; refusing to send") from None


def _check_arrays(arrays: ArrayRecord, schema: Schema) -> None:
    try:  # one array of the schema's dtype and length, bytes that agree with it: nothing hidden after the data
        FlatLayout.of(schema).read(arrays)
    except PayloadError as err:
        raise EgressError(f"outgoing {err}; refusing to send") from None


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


# -- secure aggregation (nearl_protocol.secagg) ------------------------------------------------------------
def check_secagg_reply(content: RecordDict, stage: str) -> None:
    """A key-setup, key-sharing or unmask reply holds the stage's agreed record and the site's name, nothing else."""
    from nearl_protocol import secagg

    records = set(content.keys())
    if records != {keys.SECAGG, keys.SITE}:
        raise EgressError(f"secure-aggregation reply records {sorted(records)} differ from the allowed "
                          f"{sorted([keys.SECAGG, keys.SITE])}")
    if type(content[keys.SECAGG]) is not ConfigRecord or type(content[keys.SITE]) is not ConfigRecord:
        raise EgressError("secure-aggregation reply records must be ConfigRecords")
    try:
        secagg.check_record(content[keys.SECAGG], secagg.REPLY[stage], f"outgoing {stage} reply")
    except (secagg.SecAggError, KeyError) as err:
        raise EgressError(f"{err}; refusing to send") from None
    _check_site(content[keys.SITE])


def check_masked_reply(content: RecordDict, length: int) -> None:
    """A masked train reply holds one uint32 array of the agreed length, scalar metrics without the example
    count (it travels masked) and the site's name; the plaintext update was checked before masking."""
    allowed: dict[str, type] = {keys.ARRAYS: ArrayRecord, keys.METRICS: MetricRecord, keys.SITE: ConfigRecord}
    records = set(content.keys())
    if records != set(allowed) or any(type(content[k]) is not kind for k, kind in allowed.items()):
        raise EgressError(f"masked reply records {sorted(records)} differ from the allowed {sorted(allowed)}")
    arrays = content[keys.ARRAYS]
    if set(arrays.keys()) != {keys.MASKED}:
        raise EgressError(f"masked reply arrays {sorted(arrays.keys())} differ from the allowed ['{keys.MASKED}']")
    try:
        values = decode_array(arrays[keys.MASKED])
    except PayloadError as err:
        raise EgressError(f"outgoing '{keys.MASKED}': {err}; refusing to send") from None
    if values.dtype != np.uint32 or values.shape != (length,):
        raise EgressError(f"outgoing '{keys.MASKED}' is {values.dtype}{list(values.shape)}, expected uint32[{length}]")
    if keys.NUM_EXAMPLES in content[keys.METRICS]:
        raise EgressError(f"'{keys.NUM_EXAMPLES}' must travel masked in a secure round; refusing to send")
    _check_metrics(content[keys.METRICS])
    _check_site(content[keys.SITE])


def check_reply_size(content: RecordDict, limit: int | None) -> None:
    """The site policy's ``max-reply-bytes``: the reply as built, counted as the coordinator counts it."""
    from nearl_protocol.secagg import content_bytes

    if limit is not None and (size := content_bytes(content)) > limit:
        raise EgressError(f"{keys.SITE_POLICY}: the reply holds {size:,} bytes, this site sends at most "
                          f"{limit:,} (max-reply-bytes); refusing to send")
