"""--transport-dtype: adapters cross the network in fp16/bf16 (half the bytes); sites and server compute in float32."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from nearl_core.transport import decode, encode, wire_schema
from server.strategy import make_strategy, record_bytes
from tests.fed_helpers import FakeGrid, reply_from, train_reply_content
from tests.test_strategy import Recorder

SCHEMA = {"a.weight": ((64, 32), "float32"), "b.bias": ((32,), "float32")}


pytestmark = pytest.mark.usefixtures("task_identity")  # strategies build Messages (tests/conftest.py)


def random_state(seed: int) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    return {k: g.normal(size=shape).astype(dtype) for k, (shape, dtype) in SCHEMA.items()}


@pytest.mark.parametrize("transport, torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_round_trip_equals_torch_rounding_and_halves_the_bytes(transport, torch_dtype):
    state = random_state(0)
    wire = encode(state, transport)
    assert wire_schema(SCHEMA, transport) == {k: (v.shape, str(v.dtype)) for k, v in wire.items()}
    assert sum(v.nbytes for v in wire.values()) * 2 == sum(v.nbytes for v in state.values())
    back = decode(wire, SCHEMA, transport)
    for k, v in state.items():
        assert back[k].dtype == np.float32
        expected = torch.from_numpy(v).to(torch_dtype).float().numpy()  # exactly torch's round-to-nearest
        np.testing.assert_array_equal(back[k], expected)


def test_float32_transport_is_the_identity():
    state = random_state(1)
    wire = encode(state, "float32")
    assert all(np.array_equal(wire[k], state[k]) for k in state)
    assert wire_schema(SCHEMA, "float32") == SCHEMA
    with pytest.raises(ValueError, match="choose one of"):
        encode(state, "int8")


@pytest.mark.parametrize("transport", ["fp16", "bf16"])
def test_server_sends_narrow_and_aggregates_wide(transport):
    initial = ArrayRecord({k: Array(v) for k, v in random_state(2).items()})
    rec = Recorder()
    narrow = make_strategy("fedavg", schema=SCHEMA, min_nodes=1, listener=rec, total_rounds=2, transport=transport)
    wide = make_strategy("fedavg", schema=SCHEMA, min_nodes=1, total_rounds=2)
    grid = FakeGrid([1, 2])
    sent = list(narrow.configure_train(1, initial, ConfigRecord(), grid))
    sent32 = list(wide.configure_train(1, initial, ConfigRecord(), grid))
    assert {str(a.dtype) for a in sent[0].content["arrays"].values()} == {wire_schema(SCHEMA, transport)["b.bias"][1]}
    assert record_bytes(sent[0].content) < 0.52 * record_bytes(sent32[0].content)
    updates = [random_state(3), random_state(4)]
    replies = [reply_from(n, train_reply_content(f"site{n}", encode(u, transport), n=10 * n))
               for n, u in zip((1, 2), updates)]
    wire_bytes = sum(record_bytes(r.content) for r in replies)
    agg, _ = narrow.aggregate_train(1, replies)
    for k in SCHEMA:  # float32 mean of the widened updates, weighted 10:20
        widened = [decode(encode(u, transport), SCHEMA, transport)[k] for u in updates]
        np.testing.assert_allclose(agg[k].numpy(), (widened[0] * 10 + widened[1] * 20) / 30, rtol=1e-6, atol=1e-6)
        assert agg[k].numpy().dtype == np.float32
    narrow.aggregate_evaluate(1, [])
    assert rec.rounds[-1].answered == ["site1", "site2"] and not rec.rounds[-1].rejected
    assert rec.rounds[-1].bytes_received == wire_bytes  # counted as received (narrow), not after widening
    full_bytes = sum(record_bytes(train_reply_content(f"site{n}", u, n=10 * n)) for n, u in zip((1, 2), updates))
    assert wire_bytes < 0.52 * full_bytes


@pytest.mark.parametrize("transport", ["float32", "fp16", "bf16"])
def test_a_scalar_tensor_keeps_its_shape_on_the_wire(transport):
    """A 0-d adapter tensor (a gate, a temperature) must not come back as shape (1,): the schema would differ."""
    from server.federation import numpy_to_arrays

    out = encode({"gate": torch.tensor(0.5), "w": torch.ones(2, 3)}, transport)
    assert out["gate"].shape == () and out["w"].shape == (2, 3) and out["w"].flags.c_contiguous
    assert tuple(numpy_to_arrays({"gate": np.float32(0.5).reshape(())})["gate"].shape) == ()
