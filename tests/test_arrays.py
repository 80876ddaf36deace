"""The server's fast array path: the same values as Flower's np.load, and a weighted mean summed in float64."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from nearl_protocol.arrays import PayloadError, decode_array, payload_sha256
from server.arrays import CHUNK, weighted_mean, weighted_mean_flat
from server.robust import distances


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


def _records(values: list[dict[str, np.ndarray]]) -> list[ArrayRecord]:
    return [ArrayRecord({k: Array(v) for k, v in vals.items()}) for vals in values]


def test_weighted_mean_accumulates_in_float64_and_returns_the_schema_dtype():
    """Equal to a float64 reference computed by hand (sum w_i x_i / sum w_i), then cast to float32 once."""
    rng = np.random.default_rng(0)
    schema = {"a": ((17, 9), "float32"), "b": ((31,), "float32"), "c": ((2, 2, 5), "float32")}
    values = [{k: rng.normal(scale=100.0, size=s).astype(d) for k, (s, d) in schema.items()} for _ in range(7)]
    weights = [float(rng.integers(1, 500)) for _ in values]
    ours = weighted_mean(_records(values), weights, schema)
    for k, (shape, dtype) in schema.items():
        reference = sum(np.float64(w) * v[k].astype(np.float64) for w, v in zip(weights, values)) / np.float64(sum(weights))
        assert ours[k].numpy().shape == shape and ours[k].numpy().dtype == np.dtype(dtype)
        np.testing.assert_array_max_ulp(ours[k].numpy(), reference.astype(np.float32), maxulp=1)


def test_float64_accumulation_keeps_what_float32_sums_lose():
    # (1e8 + 1 - 1e8) / 3: in float32 the 1/3 vanishes next to 1e8/3 (spacing 4); Flower's float32 FedAvg gives 0
    schema = {"x": ((1,), "float32")}
    values = [{"x": np.array([v], np.float32)} for v in (1e8, 1.0, -1e8)]
    ours = weighted_mean(_records(values), [1.0, 1.0, 1.0], schema)["x"].numpy()
    assert ours.dtype == np.float32 and ours[0] == np.float32(1 / 3)
    contents = [RecordDict({"arrays": rec, "metrics": MetricRecord({"num-examples": 1}), "config": ConfigRecord({})})
                for rec in _records(values)]
    assert aggregate_arrayrecords(contents, "num-examples")["x"].numpy()[0] != np.float32(1 / 3)


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


@pytest.mark.parametrize("size", [1, CHUNK - 1, CHUNK, 2 * CHUNK + 17])
def test_the_blockwise_mean_is_bit_identical_to_summing_whole_updates(size):
    """Blocks keep each value's operations and their order: acc = acc + x_i * (w_i / sum w), i = 1..n."""
    rng = np.random.default_rng(size)
    flats = [(rng.standard_normal(size) * 10.0 ** rng.uniform(-3, 3, size)).astype(np.float32) for _ in range(9)]
    weights = [float(w) for w in rng.integers(1, 1000, size=9)]
    total = sum(weights)
    want = np.zeros(size)
    for flat, w in zip(flats, weights):
        want += flat.astype(np.float64) * (w / total)
    assert weighted_mean_flat(flats, weights).tobytes() == want.tobytes()


@pytest.mark.parametrize("size", [0, 5, CHUNK + 3])
def test_the_guards_distances_are_float64_l2_norms(size):
    rng = np.random.default_rng(1)
    values, reference = [rng.standard_normal(size).astype(np.float32) for _ in range(3)], rng.standard_normal(size)
    want = [float(np.linalg.norm(v.astype(np.float64) - reference)) for v in values]
    assert distances(values, reference) == pytest.approx(want, rel=1e-13, abs=0)
    assert distances(values[1:], reference) == distances(values, reference)[1:]  # each on its own
