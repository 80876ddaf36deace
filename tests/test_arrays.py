"""The server's fast array path is exact: the same values as Flower's np.load and FedAvg, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from nearl_protocol.arrays import PayloadError, decode_array, payload_sha256
from server.arrays import weighted_mean


@pytest.mark.parametrize("value", [
    np.arange(24, dtype=np.float32).reshape(2, 3, 4),
    np.array(3.5, dtype=np.float32),  # 0-d
    np.zeros((0, 5), np.float64),
    np.arange(6, dtype=np.int16).reshape(3, 2),
    np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4)),
    np.array([1.5, -2.25], dtype=">f4"),  # big-endian
])
def test_decode_array_equals_flowers_numpy(value):
    arr = Array(value)
    fast, slow = decode_array(arr), arr.numpy()
    assert fast.dtype == slow.dtype and fast.shape == slow.shape
    np.testing.assert_array_equal(fast, slow)


def test_weighted_mean_is_bit_identical_to_flowers_fedavg():
    rng = np.random.default_rng(0)
    schema = {"a": ((17, 9), "float32"), "b": ((31,), "float32"), "c": ((2, 2, 5), "float32")}
    records, weights, contents = [], [], []
    for i in range(7):
        rec = ArrayRecord({k: Array(rng.normal(size=s).astype(d)) for k, (s, d) in schema.items()})
        w = int(rng.integers(1, 500))
        records.append(rec)
        weights.append(float(w))
        contents.append(RecordDict({"arrays": rec, "metrics": MetricRecord({"num-examples": w}),
                                    "config": ConfigRecord({})}))
    ours = weighted_mean(records, weights, schema)
    flowers = aggregate_arrayrecords(contents, "num-examples")
    for k, (shape, dtype) in schema.items():
        a, b = ours[k].numpy(), flowers[k].numpy()
        assert a.shape == shape and a.dtype == b.dtype == np.dtype(dtype)
        assert np.array_equal(a, b), k  # same operations, same order: exact


def _forged(value: np.ndarray, **meta) -> Array:
    """An Array whose metadata says one thing while its bytes hold another (a hostile site's reply)."""
    arr = Array(value)
    return Array(dtype=meta.get("dtype", arr.dtype), shape=tuple(meta.get("shape", arr.shape)), stype=arr.stype,
                 data=meta.get("data", arr.data))


@pytest.mark.parametrize("arr, match", [
    (lambda: _forged(np.zeros(5, np.float32), shape=[6]), "metadata says"),
    (lambda: _forged(np.zeros(6, np.float64), dtype="float32"), "metadata says"),
    (lambda: _forged(np.zeros(6, np.float32), data=Array(np.zeros(6, np.float32)).data + b"\0" * 8), "data bytes"),
    (lambda: _forged(np.zeros(6, np.float32), data=Array(np.zeros(6, np.float32)).data[:-4]), "data bytes"),
    (lambda: _forged(np.zeros(6, np.float32), data=b"not an npy file at all"), "not an .npy"),
])
def test_bytes_that_disagree_with_the_metadata_are_refused(arr, match):
    with pytest.raises(PayloadError, match=match):
        decode_array(arr())


def test_payload_hash_covers_names_and_bytes():
    a = ArrayRecord({"x": Array(np.zeros(3, np.float32)), "y": Array(np.ones(2, np.float32))})
    b = ArrayRecord({"x": Array(np.zeros(3, np.float32)), "y": Array(np.full(2, 2.0, np.float32))})
    c = ArrayRecord({"y": Array(np.zeros(3, np.float32)), "x": Array(np.ones(2, np.float32))})
    assert payload_sha256(a) == payload_sha256(ArrayRecord(dict(a.items())))
    assert len({payload_sha256(a), payload_sha256(b), payload_sha256(c)}) == 3
