"""Bench d: server aggregation of 100 site updates of the ViT-B-16 adapter size.

    python bench/aggregation.py                    # 100 sites, ViT-B-16 adapter schema, FedAvg
    python bench/aggregation.py --sites 10 --model nearl-tiny --repeats 3   # a quick run

The tensors and their shapes come from the real model: ``configs/vit-b16.yaml`` built
with random init, :func:`nearl_core.adapter_io.adapter_schema` (the schema the server
agrees with the sites).  Each site's update is a Flower reply ``Message`` exactly as
``client.task`` sends it (``arrays`` ArrayRecord, ``metrics`` with ``num-examples``,
``site`` name), and the timed call is the project's own aggregation path:
``make_strategy(...).aggregate_train(round, replies)``, i.e. NEARL's reply screening
(schema, dtype, NaN/Inf and example-count checks on every tensor), the weighted mean
(for FedAvg: ``server.arrays.weighted_mean``; other strategies: Flower's own) and the
metric aggregation.  Building the outgoing messages (``configure_train``) happens
before each timed call and is not timed.

Baseline, measured alternately in the same process: a plain numpy example-weighted
average of the same arrays, already decoded.  The target (< 0.5 s) is absolute.

Two prototypes are timed beside them (they are not used by the server): screening and
averaging in one pass (each tensor decoded once, one finiteness check per site on a
flat vector), and updates that cross the wire as one flat array each.  Both must give
the strategy's aggregate bit for bit.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict  # noqa: E402

from common import bench_config, header, result  # noqa: E402

TARGET_S = 0.5


class _Grid:
    """The part of ``flwr.serverapp.Grid`` that ``configure_train`` uses."""

    def __init__(self, nodes: list[int]):
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


def _set_server_identity() -> None:
    """Messages read the process's task identity, which Flower sets inside a ServerApp."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def adapter_arrays(model_name: str) -> dict[str, np.ndarray]:
    """The real adapter tensors (names, shapes, dtypes) of ``model_name`` under the shipped config."""
    from nearl_core.adapter_io import adapter_schema, get_adapter_state
    from nearl_core.model import build_model

    model = build_model(bench_config(model_name))
    schema = adapter_schema(model)
    state = {k: v.numpy() for k, v in get_adapter_state(model).items()}
    assert {k: (tuple(v.shape), str(v.dtype)) for k, v in state.items()} == schema
    return state


def site_updates(template: dict[str, np.ndarray], sites: int, seed: int = 0
                 ) -> tuple[list[dict[str, np.ndarray]], list[int]]:
    rng = np.random.default_rng(seed)
    updates = [{k: (v + rng.standard_normal(v.shape, dtype=np.float32) * 0.01).astype(v.dtype)
                for k, v in template.items()} for _ in range(sites)]
    counts = [int(n) for n in rng.integers(20, 500, size=sites)]
    return updates, counts


def reply(node: int, arrays: dict[str, np.ndarray], n: int) -> Message:
    """A train reply as the ServerApp receives it from ``node`` (the layout of client.task._reply)."""
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}),
        "metrics": MetricRecord({"num-examples": n, "train_loss": 0.5, "train_accuracy": 0.8,
                                 "train_seconds": 1.0}),
        "site": ConfigRecord({"name": f"site{node}"}),
    })
    md = Metadata(run_id=1, message_id=f"reply-{node}", src_node_id=node, dst_node_id=0, reply_to_message_id="",
                  group_id="1", created_at=time.time(), ttl=3600.0, message_type="train")
    return Message(content=content, metadata=md)


def numpy_average(updates: list[dict[str, np.ndarray]], counts: list[int]) -> dict[str, np.ndarray]:
    total = float(sum(counts))
    out = {k: np.zeros_like(v) for k, v in updates[0].items()}
    for upd, n in zip(updates, counts):
        w = np.float32(n / total)
        for k, v in upd.items():
            out[k] += w * v
    return out


# -- a prototype of a faster path (measured for comparison only; the server does not use it) -------------
def _decode(arr: Array) -> np.ndarray:
    """An Array's ndarray without ``np.load``: the Array already carries dtype and shape, so only
    the length of the .npy header is read (``Array.numpy()`` parses the header text, ~0.1 ms)."""
    data = arr.data
    if arr.stype != "numpy.ndarray" or data[:6] != b"\x93NUMPY":
        return arr.numpy()
    offset = 10 + int.from_bytes(data[8:10], "little") if data[6] == 1 else 12 + int.from_bytes(data[8:12], "little")
    return np.frombuffer(data, dtype=np.dtype(arr.dtype), offset=offset).reshape(arr.shape)


def flat_fedavg(replies: list[Message], schema: dict[str, tuple[tuple[int, ...], str]]) -> dict[str, np.ndarray]:
    """Screen and average as the strategy does, but decode each tensor once (no header parsing) into one
    flat float32 vector per site, check finiteness once per site and accumulate one flat weighted sum.

    Accumulation order and dtype match Flower's ``aggregate_arrayrecords`` (float32, site by
    site), so the result is bit-identical to the strategy's.
    """
    names = list(schema)
    sizes = [int(np.prod(schema[k][0])) for k in names]
    offsets = np.cumsum([0, *sizes])
    flats, counts = [], []
    for msg in replies:
        rec = msg.content.array_records["arrays"]
        if set(rec) != set(schema):
            raise ValueError("adapter tensors differ from the schema")
        flat = np.empty(offsets[-1], dtype=np.float32)
        for k, lo, hi in zip(names, offsets[:-1], offsets[1:]):
            arr = rec[k]
            if tuple(arr.shape) != tuple(schema[k][0]) or str(arr.dtype) != schema[k][1]:
                raise ValueError(f"tensor {k} has the wrong shape or dtype")
            flat[lo:hi] = _decode(arr).reshape(-1)
        if not np.isfinite(flat).all():
            raise ValueError("NaN or Inf in an update")
        flats.append(flat)
        counts.append(float(next(iter(msg.content.metric_records.values()))["num-examples"]))
    total = sum(counts)
    out = flats[0] * (counts[0] / total)
    for flat, n in zip(flats[1:], counts[1:]):
        out += flat * (n / total)
    return {k: out[lo:hi].reshape(schema[k][0]) for k, lo, hi in zip(names, offsets[:-1], offsets[1:])}


def flat_wire_fedavg(replies: list[Message], total_size: int) -> np.ndarray:
    """If each update crossed the wire as ONE flat float32 Array (the schema fixes the split on both
    sides): one decode, one finiteness check and one weighted sum per site."""
    counts = [float(next(iter(m.content.metric_records.values()))["num-examples"]) for m in replies]
    total = sum(counts)
    out = None
    for msg, n in zip(replies, counts):
        flat = _decode(msg.content.array_records["arrays"]["flat"])
        if flat.shape != (total_size,) or not np.isfinite(flat).all():
            raise ValueError("bad update")
        if out is None:
            out = flat * (n / total)
        else:
            out += flat * (n / total)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, default=100)
    ap.add_argument("--model", default="ViT-B-16", help="adapter schema of this backbone (default ViT-B-16)")
    ap.add_argument("--strategy", default="fedavg", help="server strategy (default fedavg)")
    ap.add_argument("--repeats", type=int, default=5, help="timed (strategy, numpy) pairs")
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args(argv)

    from server.strategy import check_update, make_strategy

    logging.getLogger("flwr").setLevel(logging.WARNING)  # two INFO lines per round: readability only

    header(f"aggregation: {args.sites} site updates, {args.model} adapter schema, strategy {args.strategy}")
    template = adapter_arrays(args.model)
    schema = {k: (tuple(v.shape), str(v.dtype)) for k, v in template.items()}
    n_params = sum(v.size for v in template.values())
    nbytes = sum(v.nbytes for v in template.values())
    print(f"# {len(template)} adapter tensors, {n_params:,} parameters, {nbytes / 2**20:.2f} MiB per update; "
          f"{args.sites} updates = {args.sites * nbytes / 2**20:.0f} MiB")
    updates, counts = site_updates(template, args.sites)
    _set_server_identity()
    replies = [reply(i + 1, upd, n) for i, (upd, n) in enumerate(zip(updates, counts))]
    flat_replies = [reply(i + 1, {"flat": np.concatenate([upd[k].reshape(-1) for k in template])}, n)
                    for i, (upd, n) in enumerate(zip(updates, counts))]
    grid = _Grid(list(range(1, args.sites + 1)))
    strategy = make_strategy(args.strategy, schema=schema, min_nodes=args.sites, total_rounds=10 ** 6,
                             wait_timeout=5.0)
    initial = ArrayRecord({k: Array(v) for k, v in template.items()})

    state = {"round": 0, "out": None}

    def through_strategy():
        state["round"] += 1
        list(strategy.configure_train(state["round"], initial, ConfigRecord(), grid))  # not timed
        start = time.perf_counter()
        arrays, _ = strategy.aggregate_train(state["round"], replies)
        elapsed = time.perf_counter() - start
        state["out"] = arrays
        return elapsed

    def plain_numpy():
        start = time.perf_counter()
        state["np"] = numpy_average(updates, counts)
        return time.perf_counter() - start

    def prototype():
        start = time.perf_counter()
        state["proto"] = flat_fedavg(replies, schema)
        return time.perf_counter() - start

    def flat_wire():
        start = time.perf_counter()
        state["flat"] = flat_wire_fedavg(flat_replies, n_params)
        return time.perf_counter() - start

    def screening_only():
        start = time.perf_counter()
        for r in replies:
            assert check_update(r.content, schema) is None
        return time.perf_counter() - start

    for _ in range(args.warmup):
        through_strategy(), plain_numpy()
    t_strategy, t_numpy, t_proto, t_wire, t_screen = [], [], [], [], []
    for _ in range(args.repeats):  # alternate, so that all arms see the same load on a shared machine
        t_strategy.append(through_strategy())
        t_numpy.append(plain_numpy())
        t_proto.append(prototype())
        t_wire.append(flat_wire())
    for _ in range(max(1, args.repeats // 2)):
        t_screen.append(screening_only())

    # the two paths must agree (the strategy keeps float32; Flower averages in float64)
    agg = state["out"]
    worst = max(float(np.max(np.abs(agg[k].numpy() - state["np"][k]))) for k in template)
    print(f"# max |strategy - numpy| over all tensors: {worst:.2e}")
    assert worst < 1e-5, "the strategy's aggregate differs from the numpy weighted average"
    identical = all(np.array_equal(agg[k].numpy(), state["proto"][k]) for k in template)
    print(f"# prototype flat path bit-identical to the strategy's aggregate: {identical}")
    wire = np.concatenate([agg[k].numpy().reshape(-1) for k in template])
    print(f"# one-array-per-update prototype bit-identical too: {bool(np.array_equal(wire, state['flat']))}")

    value, baseline = statistics.median(t_strategy), statistics.median(t_numpy)
    screen, proto = statistics.median(t_screen), statistics.median(t_proto)
    print(f"{'':<52}{'median (s)':>12}")
    print(f"{'NEARL strategy aggregate_train (screen + mean)':<52}{value:>12.4f}")
    print(f"{'  of which: reply screening (check_update x ' + str(args.sites) + ')':<52}{screen:>12.4f}")
    print(f"{'plain numpy weighted average (baseline)':<52}{baseline:>12.4f}")
    print(f"{'prototype: screen + average in one pass':<52}{proto:>12.4f}   (not used by the server)")
    print(f"{'prototype: one flat array per update on the wire':<52}{statistics.median(t_wire):>12.4f}   "
          "(not used by the server or the sites)")
    print(f"# strategy runs (s): {' '.join(f'{t:.4f}' for t in t_strategy)}")
    print(f"# numpy runs (s):    {' '.join(f'{t:.4f}' for t in t_numpy)}")
    print(f"# prototype runs (s): {' '.join(f'{t:.4f}' for t in t_proto)}")
    print(f"# one-array runs (s): {' '.join(f'{t:.4f}' for t in t_wire)}")
    result(f"aggregation_{args.sites}_sites_seconds", value, baseline, TARGET_S, on="value", unit="s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
