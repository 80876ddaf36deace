"""Bench: what secure aggregation costs per round, against the plain round, measured in the same run.

    python bench/secagg.py                       # 3 sites, 2 rounds, demo model, 1 local epoch
    python bench/secagg.py --sites 5 --rounds 3 --drop site2

Engine: the product's own ServerApp code (:func:`server.federation.run_federation`, the
strategy, the screening) and the sites' own handlers (:func:`client.task.train_reply`,
:func:`client.task.evaluate_reply`, :func:`client.secagg.stage_reply`) on the synthetic
demo data, over an in-process Grid that answers every message at once (each site keeps
its own ``Context`` between messages, as its SuperNode does).  There is no SuperLink and
no network here: the numbers are what secure aggregation adds in computation and in
bytes.  On a real deployment each of its three extra exchanges also pays the message
latency floor (the SuperNode's poll; docs/security.md gives the loopback numbers).

The same federation runs twice, plain and with ``secure-aggregation``; per round, from the
ServerApp's own progress events: wall time (configure_train -> aggregate_evaluate) and
bytes sent + received.  RESULT lines: the secure round's median against the plain one
(ratio), the payload of one masked reply against the float32 one, and the largest
difference between the final adapters of the two runs with the final accuracy of each.
``--drop SITE`` makes one site vanish at the unmask stage of round 1 (recovered).

``--loopback`` measures the deployment instead: a real ``nearl-server`` and ``--sites``
warm ``nearl-client`` sites on 127.0.0.1 (bench/federation_overhead.py's set-up), once
plain and once with ``--secure-aggregation``; per round, from the federation's MLflow
run: wall time between round ends, the strategy's round time and bytes sent + received.
The first round (sites connecting) is left out of the medians.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import header, result  # noqa: E402


class LocalGrid:
    """A Grid whose sites answer in this process with the product's handlers (see the module docstring)."""

    def __init__(self, bindings: dict, drop: tuple[str, str, int] | None = None):
        from flwr.app import Context, RecordDict

        self.bindings = bindings
        self.contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={})
                         for n in bindings}
        self.replies: dict[str, object] = {}
        self.drop = drop  # (site, stage, round): that site gives no reply there
        self.ids = itertools.count(1)
        self.run = None
        self.deltas: list[np.ndarray] = []  # |site adapters - global adapters| of every plain train reply
        self.globals: dict[int, np.ndarray] = {}  # round -> the global adapters its train instruction carried

    def set_run(self, run) -> None:
        self.run = run

    def get_node_ids(self) -> list[int]:
        return sorted(self.bindings)

    def push_messages(self, messages) -> list[str]:
        ids = []
        for m in messages:
            mid = f"local-{next(self.ids)}"
            m.metadata.__dict__["_message_id"] = mid
            ids.append(mid)
            reply = self._answer(m)
            if reply is not None:
                reply.metadata.__dict__["_src_node_id"] = m.metadata.dst_node_id
                self.replies[mid] = reply
        return ids

    def pull_messages(self, ids) -> list:
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]

    def _answer(self, m):
        from client.secagg import stage_reply
        from client.task import evaluate_reply, train_reply
        from nearl_protocol import keys
        from nearl_protocol.arrays import decode_array

        node, kind = m.metadata.dst_node_id, m.metadata.message_type
        binding, context = self.bindings[node], self.contexts[node]
        rec = m.content.config_records.get(keys.SECAGG)
        if self.drop and rec is not None and (binding.site, rec[keys.SECAGG_STAGE], rec[keys.SERVER_ROUND]) == self.drop:
            return None
        quiet = lambda *a, **k: None  # noqa: E731
        if kind == keys.SECAGG_MESSAGE_TYPE:
            return stage_reply(m, context, quiet, binding=binding)
        handler = train_reply if kind == "train" else evaluate_reply
        if kind == "train":
            r = int(m.content[keys.CONFIG][keys.SERVER_ROUND])
            self.globals.setdefault(r, decode_array(m.content[keys.ARRAYS][keys.ADAPTERS]).astype(np.float64))
        reply = handler(m, context, quiet, binding=binding)
        if kind == "train" and rec is None and not reply.has_error() and keys.ARRAYS in reply.content:
            sent, got = (decode_array(x[keys.ARRAYS][keys.ADAPTERS]) for x in (reply.content, m.content))
            self.deltas.append(np.abs(sent.astype(np.float64) - got.astype(np.float64)))
        return reply


class Stopwatch:
    """Time spent inside secure aggregation: the server's stages (with the sites' in-process answers to
    them) and the sites' masking of their train replies."""

    def __enter__(self) -> "Stopwatch":
        import client.secagg
        import server.secagg_round

        self.seconds = 0.0
        self.patched = [(server.secagg_round.SecureRounds, "configure"), (server.secagg_round.SecureRounds, "aggregate"),
                        (client.secagg, "masked_reply")]
        self.saved = [getattr(owner, name) for owner, name in self.patched]
        for (owner, name), fn in zip(self.patched, self.saved):
            setattr(owner, name, self._timed(fn))
        return self

    def _timed(self, fn):
        def run(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
        return run

    def __exit__(self, *exc) -> None:
        for (owner, name), fn in zip(self.patched, self.saved):
            setattr(owner, name, fn)


def federate(data: Path, work: Path, sites: int, rounds: int, secure: bool, drop: str | None,
             extra: dict | None = None, roster: Path | None = None) -> dict:
    """One in-process federation; per-round seconds and bytes, final accuracy and adapters.

    ``extra``: more run-config keys (e.g. ``federation.local`` for a personalized federation).
    ``roster``: every site and the coordinator pin it (signed rounds); site ``siteK``'s SuperNode
    key is ``roster``'s folder / ``siteK`` (bench/secagg_roster.py makes them).
    """
    from flwr.supercore.task_identity import TaskIdentity

    from client.binding import SiteBinding
    from nearl_core.adapter_io import read_adapters
    from nearl_protocol import keys
    from server.events import EvalEvent, RoundEvent, read_all, select
    from server.federation import run_federation

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    work.mkdir(parents=True, exist_ok=True)
    bindings = {100 + i: SiteBinding(f"site{i + 1}", data / f"site{i + 1}", state_dir=work / f"state-site{i + 1}",
                                     coordinator="in-process", roster=roster,
                                     auth_key=roster.parent / f"site{i + 1}" if roster else None)
                for i in range(sites)}
    grid = LocalGrid(bindings, (drop, "unmask", 1) if drop else None)
    progress = work / "progress.jsonl"
    run_config = {"num-server-rounds": rounds, "config": "demo", "min-nodes": sites, "local-epochs": 1,
                  "mlflow-uri": "", "checkpoint-dir": "", "progress-file": str(progress), "wait-timeout": 5.0,
                  "secure-aggregation": secure, **({"roster": str(roster)} if roster else {}), **(extra or {})}
    t0 = time.perf_counter()
    with Stopwatch() as secagg_time:
        out = run_federation(grid, run_config, workdir=work)
    events = read_all(progress)
    rounds_ev = select(events, RoundEvent)
    final_eval = [e for e in select(events, EvalEvent) if e.step == rounds]
    return {"seconds": [e.seconds for e in rounds_ev], "bytes": [e.bytes_sent + e.bytes_received for e in rounds_ev],
            "not_applied": [e.not_applied for e in rounds_ev], "total": time.perf_counter() - t0,
            "accuracy": final_eval[-1].metrics.get(keys.MLFLOW_EVAL_ACCURACY) if final_eval else float("nan"),
            "secagg_seconds": secagg_time.seconds, "globals": grid.globals,
            "deltas": np.concatenate(grid.deltas) if grid.deltas else np.zeros(1),
            "clipped": [e.train.get(keys.MLFLOW_SECAGG_CLIPPED) for e in rounds_ev],
            "adapters": {k: v.numpy() for k, v in read_adapters(Path(out["adapters"]))[0].items()}}


def loopback(args: argparse.Namespace) -> int:
    """Plain vs secure rounds of a real loopback federation (see the module docstring)."""
    from mlflow.tracking import MlflowClient

    from bench.federation_overhead import nearl_rounds
    from nearl_protocol import keys

    header("secure aggregation vs plain rounds on loopback (nearl-server + warm nearl-client, demo model)")
    runs = {}
    with tempfile.TemporaryDirectory(prefix="nearl-bench-secagg-loop-") as tmp:
        for name, extra in (("plain", ()), ("secure", ("--secure-aggregation",))):
            (Path(tmp) / name).mkdir()
            rows = nearl_rounds(Path(tmp) / name, args.rounds, args.sites, "--warm", extra, args.train_per_site)
            client = MlflowClient(tracking_uri=f"sqlite:///{Path(tmp) / name / 'warm' / 'mlflow.db'}")
            rid = client.search_runs([client.get_experiment_by_name("nearl-federated").experiment_id])[0].info.run_id
            moved = {m.step: m.value for m in client.get_metric_history(rid, keys.MLFLOW_BYTES_SENT)}
            for m in client.get_metric_history(rid, keys.MLFLOW_BYTES_RECEIVED):
                moved[m.step] = moved.get(m.step, 0.0) + m.value
            for row in rows:
                row["bytes"] = moved.get(row["round"], float("nan"))
            runs[name] = rows
    for name, rows in runs.items():
        for row in rows:
            print(f"# {name} round {row['round']}: wall {row['wall']:.2f} s, strategy {row['strategy']:.2f} s, "
                  f"slowest site compute {row['slowest']:.2f} s, bytes {row['bytes']:.0f}")
    med = {n: {k: statistics.median(r[k] for r in rows[1:] or rows) for k in ("wall", "strategy", "bytes")}
           for n, rows in runs.items()}
    result("secagg_loopback_round_wall_seconds", med["secure"]["wall"], med["plain"]["wall"], None, unit="s")
    result("secagg_loopback_round_strategy_seconds", med["secure"]["strategy"], med["plain"]["strategy"], None,
           unit="s")
    result("secagg_loopback_round_bytes", med["secure"]["bytes"], med["plain"]["bytes"], None, unit="bytes")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--train-per-site", type=int, default=32)
    p.add_argument("--drop", default=None, metavar="SITE", help="this site vanishes at round 1's unmask stage")
    p.add_argument("--loopback", action="store_true", help="real nearl-server and nearl-client processes")
    args = p.parse_args(argv)
    if args.loopback:
        return loopback(args)
    header("secure aggregation vs plain rounds (in-process grid, demo model)")
    from nearl_core.workflows import demo_data

    with tempfile.TemporaryDirectory(prefix="nearl-bench-secagg-") as tmp:
        data = Path(tmp) / "data"
        demo_data(data, args.sites, train_per_site=args.train_per_site)
        federate(data, Path(tmp) / "warm-up", args.sites, 1, False, None)  # builds and caches the backbone
        plain = federate(data, Path(tmp) / "plain", args.sites, args.rounds, False, None)
        secure = federate(data, Path(tmp) / "secure", args.sites, args.rounds, True, args.drop)
    for name, run in (("plain", plain), ("secure", secure)):
        print(f"# {name}: round seconds {[round(s, 2) for s in run['seconds']]}, bytes {run['bytes']}, "
              f"final val accuracy {run['accuracy']:.4f}, not applied {[x for x in run['not_applied'] if x]}")
    diff = max(float(np.max(np.abs(np.asarray(secure["adapters"][k], np.float64)
                                   - np.asarray(plain["adapters"][k], np.float64)))) for k in plain["adapters"])
    size = sum(int(np.asarray(v).size) for v in plain["adapters"].values())
    print(f"# largest |secure - plain| over the final adapters: {diff:.3g} ({size} values)")
    d = plain["deltas"]
    print(f"# plain updates |site - global| per coordinate: median {np.median(d):.2e}, 99.9% {np.quantile(d, 0.999):.2e}, "
          f"max {d.max():.2e}; coordinates the secure run clipped per round: {secure['clipped']}")
    both = 2 in plain["globals"] and 2 in secure["globals"]
    first = float(np.max(np.abs(secure["globals"][2] - plain["globals"][2]))) if both else float("nan")
    print(f"# largest |secure - plain| over the global adapters after round 1 (same site updates): {first:.3g}")
    print(f"# time inside secure aggregation (server stages with the sites' answers, sites' masking): "
          f"{secure['secagg_seconds']:.2f} s over {args.rounds} rounds")
    result("secagg_overhead_seconds", secure["secagg_seconds"] / args.rounds, statistics.median(plain["seconds"]),
           None, unit="s")
    result("secagg_round_seconds", statistics.median(secure["seconds"]), statistics.median(plain["seconds"]), None,
           unit="s")
    result("secagg_round_bytes", statistics.median(secure["bytes"]), statistics.median(plain["bytes"]), None,
           unit="bytes")
    result("secagg_masked_reply_bytes", 4.0 * (size + 2), 4.0 * size, 1.01, unit="bytes")
    result("secagg_final_accuracy", secure["accuracy"], plain["accuracy"], None, lower_is_better=False, unit="-")
    return 0


if __name__ == "__main__":
    sys.exit(main())
