"""Same seed, same result: the initial adapters and the aggregate do not depend on the process,
the caller's random state or the order replies arrive in."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from nearl_core.adapter_io import get_adapter_state
from nearl_core.config import load_config
from nearl_core.model import build_model
from nearl_protocol.arrays import payload_sha256
from server.strategy import make_strategy
from tests.fed_helpers import (ROOT, FakeGrid, RoundRecorder, reply_from, restore_task_identity,
                               server_task_identity, train_reply_content)

SCRIPT = ("from nearl_core.config import load_config; from nearl_core.model import build_model; "
          "from nearl_core.adapter_io import get_adapter_state; import torch, hashlib; torch.manual_seed({caller}); "
          "m = build_model(load_config('demo', {{'train.seed': {seed}}})); "
          "print(hashlib.sha256(b''.join(v.numpy().tobytes() for _, v in sorted(get_adapter_state(m).items())))"
          ".hexdigest())")


def adapters_hash(seed: int, caller: int) -> str:
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(seed=seed, caller=caller)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_initial_adapters_come_from_train_seed_in_every_process():
    """Round 0 of a federation is built by the coordinator's process: it must not depend on it."""
    first = adapters_hash(seed=0, caller=1)
    assert adapters_hash(seed=0, caller=2) == first  # another process, another caller RNG state
    assert adapters_hash(seed=1, caller=1) != first  # the seed is what decides


def test_building_a_model_leaves_the_callers_random_stream_alone():
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    build_model(load_config("demo"))
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize("name", ["fedavg", "fedadam", "fedtrimmedavg"])
def test_the_aggregate_and_its_metrics_do_not_depend_on_the_order_replies_arrive_in(name):
    saved = server_task_identity()
    try:
        schema = {"w": ((64,), "float32")}
        rng = np.random.default_rng(0)
        updates = [(f"site{i}", rng.normal(size=64).astype(np.float32), int(rng.integers(5, 500)),
                    float(rng.uniform(0.1, 3.0))) for i in range(25)]
        seen = []
        for order in (updates, updates[::-1], updates[2:] + updates[:2]):
            rounds = RoundRecorder()
            strategy = make_strategy(name, schema=schema, min_nodes=1, total_rounds=1, listener=rounds)
            initial = ArrayRecord({"w": Array(np.zeros(64, np.float32))})
            list(strategy.configure_train(1, initial, ConfigRecord(), FakeGrid([1])))
            replies = [reply_from(int(s[4:]) + 1, train_reply_content(s, {"w": v}, n=n, **{"train-loss": loss}))
                       for s, v, n, loss in order]
            arrays, metrics = strategy.aggregate_train(1, replies)
            seen.append((payload_sha256(arrays), dict(metrics)))
        assert all(x == seen[0] for x in seen), seen  # bit for bit: MLflow logs these values
    finally:
        restore_task_identity(saved)


def test_a_site_trains_the_same_update_from_the_same_message(demo_root, tmp_path):
    from flwr.app import Context, RecordDict

    from client.task import train_reply
    from nearl_protocol.messages import instruction_config
    from tests.fed_helpers import flat_record, instruction

    cfg = load_config("demo")
    config = instruction_config(nearl_config=cfg.to_dict(), transport="float32", backbone="", local_epochs=1,
                                total_rounds=1)
    sent = []
    for attempt in range(2):
        torch.manual_seed(attempt)  # whatever ran before in this worker
        arrays = flat_record({k: v.contiguous() for k, v in get_adapter_state(build_model(cfg)).items()})
        msg = instruction(RecordDict({"arrays": arrays, "config": config}))
        ctx = Context(run_id=1, node_id=1, state=RecordDict(), run_config={},
                      node_config={"site": "site1", "data-path": str(demo_root / "site1"),
                                   "state-dir": str(tmp_path / "state")})
        sent.append(payload_sha256(train_reply(msg, ctx, log=lambda *a, **k: None).content["arrays"]))
    assert sent[0] == sent[1]
