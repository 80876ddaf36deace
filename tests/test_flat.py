"""Adapters on the wire as one flat array (nearl_protocol.flat): packing, reading, every malformed payload,
the layout digest, exact widening, and the aggregate equal bit for bit to the per-tensor path before it."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from nearl_core.transport import decode, encode, widen_flat, wire_schema
from nearl_protocol.arrays import PayloadError
from nearl_protocol.flat import FlatLayout
from nearl_protocol.messages import adapter_record, instruction_adapters
from server.strategy import STRATEGIES, make_strategy
from tests.fed_helpers import FakeGrid, flat_record, instruction, metadata, reply_from, train_reply_content

SCHEMA = {"a.weight": ((3, 4), "float32"), "b.bias": ((5,), "float32"), "c.gate": ((1,), "float32")}
LAYOUT = FlatLayout.of(SCHEMA)


pytestmark = pytest.mark.usefixtures("task_identity")  # strategies build Messages (tests/conftest.py)


def tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(shape).astype(dtype) for k, (shape, dtype) in SCHEMA.items()}


def test_pack_read_split_round_trip_in_schema_order_without_copies():
    values = tensors()
    shuffled = dict(reversed(list(values.items())))  # the caller's dict order does not matter
    flat = LAYOUT.pack(shuffled)
    assert flat.shape == (18,) and flat.dtype == np.float32 and LAYOUT.size == 18
    assert flat.tolist() == np.concatenate([values[k].ravel() for k in SCHEMA]).tolist()
    received = LAYOUT.read(adapter_record(flat))
    assert not received.flags.writeable  # a view of the received bytes
    back = LAYOUT.split(received)
    assert list(back) == list(SCHEMA)
    for k, v in values.items():
        assert back[k].shape == v.shape and np.array_equal(back[k], v) and np.shares_memory(back[k], received)


@pytest.mark.parametrize("tensors_, match", [
    (lambda v: {**v, "leak": np.zeros(3, np.float32)}, r"unexpected \['leak'\]"),
    (lambda v: {k: x for k, x in v.items() if k != "b.bias"}, r"missing \['b.bias'\]"),
    (lambda v: {**v, "a.weight": v["a.weight"].reshape(4, 3)}, r"'a.weight' has shape \(4, 3\), expected \(3, 4\)"),
    (lambda v: {**v, "b.bias": v["b.bias"].astype(np.float64)}, "'b.bias' has dtype float64, expected float32"),
])
def test_pack_checks_names_shapes_and_dtypes_of_the_split(tensors_, match):
    with pytest.raises(PayloadError, match=match):
        LAYOUT.pack(tensors_(tensors()))


def test_a_schema_that_mixes_dtypes_cannot_travel_flat():
    with pytest.raises(PayloadError, match="mixes dtypes"):
        FlatLayout.of({"a": ((2,), "float32"), "b": ((2,), "float16")})


def _raw(value: np.ndarray, **meta) -> Array:
    arr = Array(value)
    return Array(dtype=meta.get("dtype", arr.dtype), shape=tuple(meta.get("shape", arr.shape)), stype=arr.stype,
                 data=meta.get("data", arr.data))


GOOD = np.zeros(18, np.float32)
MALFORMED = {
    "no array": (ArrayRecord(), r"missing \['adapters'\], unexpected \[\]"),
    "a second array": (ArrayRecord({"adapters": Array(GOOD), "extra": Array(GOOD)}), r"unexpected \['extra'\]"),
    "per-tensor arrays": (ArrayRecord({k: Array(v) for k, v in tensors().items()}), r"missing \['adapters'\]"),
    "another name": (ArrayRecord({"weights": Array(GOOD)}), r"missing \['adapters'\], unexpected \['weights'\]"),
    "too long": (ArrayRecord({"adapters": Array(np.zeros(21, np.float32))}),
                 r"'adapters' holds 21 values, the adapter schema has 18 \(3 tensors\)"),
    "too short": (ArrayRecord({"adapters": Array(np.zeros(17, np.float32))}), "holds 17 values"),
    "empty": (ArrayRecord({"adapters": Array(np.zeros(0, np.float32))}), "holds 0 values"),
    "2-D": (ArrayRecord({"adapters": Array(GOOD.reshape(2, 9))}), r"has shape \(2, 9\), expected \(18,\)"),
    "float64": (ArrayRecord({"adapters": Array(GOOD.astype(np.float64))}), "has dtype float64, expected float32"),
    "float16 of the same byte count": (ArrayRecord({"adapters": Array(np.zeros(36, np.float16))}),
                                       "has dtype float16, expected float32"),
    "metadata float32, bytes float64": (ArrayRecord({"adapters": _raw(GOOD.astype(np.float64), dtype="float32")}),
                                        r"'adapters': bytes hold float64\[18\], the metadata says float32\[18\]"),
    "bytes appended": (ArrayRecord({"adapters": _raw(GOOD, data=Array(GOOD).data + b"\0" * 8)}), "data bytes"),
    "bytes cut": (ArrayRecord({"adapters": _raw(GOOD, data=Array(GOOD).data[:-4])}), "data bytes"),
    "not .npy": (ArrayRecord({"adapters": _raw(GOOD, data=b"PK\x03\x04 a zip file")}), "not an .npy payload"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_every_malformed_flat_payload_is_refused_with_a_reason(name):
    record, match = MALFORMED[name]
    with pytest.raises(PayloadError, match=match):
        LAYOUT.read(record)


@pytest.mark.parametrize("position, bad", [(0, math.nan), (11, -math.inf), (12, math.inf), (17, math.nan)])
def test_check_finite_names_the_tensor_that_holds_nan_or_inf(position, bad):
    flat = LAYOUT.pack(tensors())
    LAYOUT.check_finite(flat)
    flat[position] = bad
    name = "a.weight" if position < 12 else "b.bias" if position < 17 else "c.gate"
    with pytest.raises(PayloadError, match=f"tensor '{name}' holds NaN or Inf values"):
        LAYOUT.check_finite(flat)


def test_the_layout_digest_covers_names_shapes_dtype_and_order():
    digest = LAYOUT.digest
    assert FlatLayout.of(dict(SCHEMA)).digest == digest
    reordered = dict(reversed(list(SCHEMA.items())))  # same length, same dtype: only the digest tells
    changed = [reordered, {**SCHEMA, "c.gate": ((1, 1), "float32")}, {"x" + k: v for k, v in SCHEMA.items()},
               wire_schema(SCHEMA, "fp16")]
    assert len({digest, *(FlatLayout.of(s).digest for s in changed)}) == 1 + len(changed)
    assert FlatLayout.of(reordered).size == LAYOUT.size


def test_an_instruction_packed_with_another_layout_is_refused():
    values = tensors()
    config = ConfigRecord({"adapter-layout": LAYOUT.digest})
    msg = instruction(RecordDict({"arrays": adapter_record(LAYOUT.pack(values)), "config": config}))
    assert np.array_equal(instruction_adapters(msg, LAYOUT), LAYOUT.pack(values))
    other = FlatLayout.of(dict(reversed(list(SCHEMA.items()))))
    with pytest.raises(PayloadError, match=f"adapter layout mismatch: the coordinator packed layout {LAYOUT.digest}"):
        instruction_adapters(msg, other)
    assert instruction_adapters(instruction(RecordDict({"config": config})), LAYOUT) is None


@pytest.mark.parametrize("transport", ["float32", "fp16", "bf16"])
def test_widening_a_flat_payload_equals_widening_tensor_by_tensor(transport):
    values = {k: v * 1e3 for k, v in tensors(3).items()}
    values["a.weight"][0, :4] = [1e-40, -1e-41, 6e4, -0.0]  # subnormals, fp16's range edge, a signed zero
    wire = encode(values, transport)
    flat = FlatLayout.of(wire_schema(SCHEMA, transport)).read(flat_record(wire))
    wide = FlatLayout.of(SCHEMA).split(widen_flat(flat, transport))
    for k, v in decode(wire, SCHEMA, transport).items():
        assert wide[k].dtype == np.float32 and wide[k].tobytes() == v.tobytes()
    if transport == "float32":
        assert np.shares_memory(widen_flat(flat, transport), flat)  # no copy


# -- the aggregate over flat replies equals the per-tensor path, bit for bit ----------------------------
SITES = 25


def _updates(transport: str) -> tuple[list[dict[str, np.ndarray]], list[float]]:
    rng = np.random.default_rng(7)
    updates = [{k: (rng.standard_normal(shape) * rng.uniform(0.01, 3)).astype(dtype)
                for k, (shape, dtype) in SCHEMA.items()} for _ in range(SITES)]
    if transport != "float32":  # what the sites can send: values representable in the transport dtype
        updates = [decode(encode(u, transport), SCHEMA, transport) for u in updates]
    return updates, [float(n) for n in rng.integers(5, 5000, size=SITES)]


def _per_tensor_fedavg(updates, counts) -> dict[str, np.ndarray]:
    """The server's FedAvg before flat payloads (server/arrays.py then): every tensor of every update decoded
    and widened to float64, concatenated in schema order, acc += x * (n / total) site by site in site-name
    order (the strategy sorts replies); float64, before the cast to the schema's float32."""
    total = math.fsum(counts)
    acc = np.zeros(LAYOUT.size, np.float64)
    for i in sorted(range(SITES), key=lambda i: f"site{i:02d}"):
        acc += np.concatenate([updates[i][k].ravel().astype(np.float64) for k in SCHEMA]) * (counts[i] / total)
    out, offset = {}, 0
    for k, (shape, _) in SCHEMA.items():
        size = math.prod(shape)
        out[k] = acc[offset:offset + size].reshape(shape)
        offset += size
    return out


def _flowers_own(name: str, updates, counts) -> dict[str, np.ndarray]:
    """Every other strategy before flat payloads: Flower's class on per-tensor float64 messages, one per
    site in site-name order, weighted by the count (what NEARL's strategy handed it); float64."""
    reference = make_strategy(name, schema=SCHEMA, min_nodes=1, total_rounds=1)
    base = STRATEGIES[name]
    initial = ArrayRecord({k: Array(np.zeros(s, d)) for k, (s, d) in SCHEMA.items()})
    base.configure_train(reference, 1, initial, ConfigRecord(), FakeGrid([1]))
    messages = [Message(content=RecordDict({
        "arrays": ArrayRecord({k: Array(updates[i][k].astype(np.float64)) for k in SCHEMA}),
        "metrics": MetricRecord({"num-examples": counts[i]})}), metadata=metadata(src=i + 1, dst=0))
        for i in sorted(range(SITES), key=lambda i: f"site{i:02d}")]
    arrays, _ = base.aggregate_train(reference, 1, messages)
    return {k: arrays[k].numpy() for k in SCHEMA}


@pytest.mark.parametrize("transport", ["float32", "fp16", "bf16"])
@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_the_aggregate_of_flat_replies_is_bit_identical_to_the_per_tensor_path(name, transport):
    updates, counts = _updates(transport)
    strategy = make_strategy(name, schema=SCHEMA, min_nodes=1, total_rounds=1, transport=transport,
                             options={"outlier-factor": 0.0})
    initial = ArrayRecord({k: Array(np.zeros(s, d)) for k, (s, d) in SCHEMA.items()})
    sent = list(strategy.configure_train(1, initial, ConfigRecord(), FakeGrid([1])))
    assert set(sent[0].content["arrays"]) == {"adapters"}
    assert sent[0].content["config"]["adapter-layout"] == strategy.wire_layout.digest
    replies = [reply_from(i + 1, train_reply_content(f"site{i:02d}", encode(updates[i], transport), n=counts[i]))
               for i in range(SITES)]
    exact = []  # the strategy's float64 aggregate, before the cast to float32 hides its last bits
    inner = strategy._aggregate_updates
    strategy._aggregate_updates = lambda u, w: exact.append(inner(u, w)) or exact[-1]
    arrays, _ = strategy.aggregate_train(1, replies[::-1])  # arrival order does not matter either
    assert arrays is not None and len(exact) == 1
    want = _per_tensor_fedavg(updates, counts) if name in ("fedavg", "fedprox") else _flowers_own(name, updates, counts)
    for k in SCHEMA:
        assert exact[0][k].dtype == np.float64 and exact[0][k].tobytes() == want[k].tobytes(), k
        got = arrays[k].numpy()
        assert got.dtype == np.float32 and got.shape == SCHEMA[k][0]
        assert got.tobytes() == want[k].astype(np.float32).tobytes(), k


def test_the_payload_hash_is_the_one_of_the_bytes_as_received():
    """Under fp16 the server widens each update; the hash it reports is still the one of what the site sent."""
    from nearl_protocol.arrays import payload_sha256

    strategy = make_strategy("fedavg", schema=SCHEMA, min_nodes=1, total_rounds=1, transport="fp16")
    initial = ArrayRecord({k: Array(np.zeros(s, d)) for k, (s, d) in SCHEMA.items()})
    list(strategy.configure_train(1, initial, ConfigRecord(), FakeGrid([1])))
    content = train_reply_content("site1", encode(tensors(), "fp16"))
    want = payload_sha256(content["arrays"])
    recorded = []
    strategy.listener = type("L", (), {"evaluated": lambda *a: None,
                                       "round_finished": lambda self, report, s: recorded.append(report)})()
    strategy.aggregate_train(1, [reply_from(1, content)])
    strategy.aggregate_evaluate(1, [])
    assert recorded[0].payload_sha256 == {"site1": want}
