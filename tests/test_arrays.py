"""The server's fast array path is exact: the same values as Flower's np.load and FedAvg, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from server.arrays import decode_array, weighted_mean


@pytest.mark.parametrize("value", [
    np.arange(24, dtype=np.float32).reshape(2, 3, 4),
    np.array(3.5, dtype=np.float32),  # 0-d
    np.zeros((0, 5), np.float64),
    np.arange(6, dtype=np.int16).reshape(3, 2),
    np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4)),  # falls back to np.load
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
