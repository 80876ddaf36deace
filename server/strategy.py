"""The federation's strategy: a Flower strategy with NEARL's checks, logging and checkpoint hooks.

:func:`make_strategy` picks a class from ``flwr.serverapp.strategy`` (FedAvg by default)
and subclasses it with :class:`NearlStrategyMixin`, which hooks ``configure_*`` and
``aggregate_*``; Flower's own ``Strategy.start()`` runs the rounds.  The mixin

* waits (bounded by ``wait_timeout``) until ``min_nodes`` sites are connected instead of
  Flower's unbounded wait, and fails the run with a clear message otherwise;
* screens every train reply before aggregation: error replies, missing or mis-shaped
  adapter tensors, wrong dtypes, NaN/Inf values and bad example counts are rejected
  (never aggregated) and logged with the site's name;
* aggregates metrics itself (weighted by the matching example count, NaN-aware,
  epsilon as the maximum over sites) and keeps per-site values;
* records sites that decline a round because of their privacy budget (a metrics-only
  reply with ``dp-declined``): no update, not an error, the round goes on without them;
* counts bytes and wall time per round, records which sites answered and which did not;
* hands a :class:`RoundReport` to a listener after every round (MLflow + checkpoint).

Round numbers: ``start()`` counts 1..num_rounds; ``round_offset`` maps them onto the
global round after a resume, so FedAdam's bias correction and every log see the
global round.  With ``evaluate_in_train`` the sites evaluate the incoming global
adapters at the start of each train message; those metrics describe the global model
after the *previous* round and are reported at that step (step 0 = zero-shot).  The
evaluate phase then only runs after the last round, for the final adapters.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from nearl_core.transport import check_transport, decode, encode, wire_schema
from server.arrays import decode_array, weighted_mean
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, FedYogi, Krum

log = logging.getLogger("nearl.strategy")

STRATEGIES: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
}
WEIGHT_KEY = "num-examples"
COUNT_KEYS = ("num-examples", "eval_examples", "test_examples")
UNIT_WEIGHT_KEY = "server-dp-weight"  # set to 1 on each update by server-side DP (equal weights); never logged
STATE_ATTRS = ("m_t", "v_t", "momentum_vector")  # strategy arrays that must survive a resume
Schema = Mapping[str, tuple[tuple[int, ...], str]]


class NotEnoughSites(RuntimeError):
    """Fewer than ``min_nodes`` sites connected before the wait timeout."""


@dataclass
class SiteReply:
    node_id: int
    site: str
    metrics: dict[str, float]
    nbytes: int
    declined: str | None = None  # the site declined to train (its privacy budget); no update


@dataclass
class RoundReport:
    """Everything the listener needs to log and checkpoint one global round."""

    round: int
    arrays: ArrayRecord
    train_metrics: dict[str, float] = field(default_factory=dict)
    per_site: dict[str, dict[str, float]] = field(default_factory=dict)
    answered: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)  # site -> reason
    declined: dict[str, str] = field(default_factory=dict)  # site -> reason (DP budget; not an error)
    sampled: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0
    aggregated: bool = False  # False when no update was accepted (global adapters unchanged)


class RoundListener(Protocol):
    def evaluated(self, step: int, metrics: dict[str, float], per_site: dict[str, dict[str, float]]) -> None: ...

    def round_finished(self, report: RoundReport, strategy: "NearlStrategyMixin") -> None: ...


# -- pure helpers (unit-tested without Flower processes) ------------------------------------------
def record_bytes(content: RecordDict) -> int:
    """Serialized payload size of a message's records (array bytes dominate)."""
    return int(sum(rec.count_bytes() for rec in content.values()))


def site_of(content: RecordDict | None, node_id: int, known: Mapping[int, str]) -> str:
    if content is not None:
        rec = content.config_records.get("site")
        if rec is not None and isinstance(rec.get("name"), str) and rec["name"]:
            return str(rec["name"])
    return known.get(node_id, f"node-{node_id}")


def check_update(content: RecordDict, schema: Schema, arrayrecord_key: str = "arrays") -> str | None:
    """Why this train reply must not be aggregated, or None when it is sound."""
    arrays = content.array_records
    if set(arrays) != {arrayrecord_key}:
        return f"expected one ArrayRecord '{arrayrecord_key}', got {sorted(arrays)}"
    rec = arrays[arrayrecord_key]
    missing, extra = sorted(set(schema) - set(rec)), sorted(set(rec) - set(schema))
    if missing or extra:
        return f"adapter tensors differ from the schema (missing {missing[:3]}, unexpected {extra[:3]})"
    for name, (shape, dtype) in schema.items():
        arr = rec[name]
        if tuple(arr.shape) != tuple(shape):
            return f"tensor '{name}' has shape {tuple(arr.shape)}, expected {tuple(shape)}"
        if str(arr.dtype) != dtype:
            return f"tensor '{name}' has dtype {arr.dtype}, expected {dtype}"
        try:
            values = decode_array(arr)
        except Exception as err:  # noqa: BLE001 - corrupt bytes
            return f"tensor '{name}' cannot be decoded ({err})"
        if not np.isfinite(values).all():
            return f"tensor '{name}' holds NaN or Inf values"
    problem = check_metrics(content)
    if problem:
        return problem
    return None


def check_metrics(content: RecordDict) -> str | None:
    metrics = content.metric_records
    if len(metrics) != 1:
        return f"expected one MetricRecord, got {len(metrics)}"
    rec = next(iter(metrics.values()))
    n = rec.get(WEIGHT_KEY)
    if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) or n <= 0:
        return f"'{WEIGHT_KEY}' must be a positive number, got {n!r}"
    return None


def metrics_of_raw(content: RecordDict) -> dict[str, float]:
    """Every numeric metric of a reply, internal weights included (for aggregation)."""
    rec = next(iter(content.metric_records.values()), None)
    if rec is None:
        return {}
    return {k: float(v) for k, v in rec.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def metrics_of(content: RecordDict) -> dict[str, float]:
    """A reply's metrics as the site reported them (the server's internal weight left out)."""
    return {k: v for k, v in metrics_of_raw(content).items() if k != UNIT_WEIGHT_KEY}


def declined_reason(metrics: Mapping[str, float]) -> str:
    """The one-line reason a site's ledger gives for declining (from its scalar metrics)."""
    return (f"declined: privacy budget (epsilon {metrics.get('epsilon', math.nan):.3f} spent, this round would "
            f"reach {metrics.get('dp-epsilon-next', math.nan):.3f} > the site's max {metrics.get('dp-max-epsilon', math.nan):g})")


def site_metric_key(key: str) -> str:
    """Per-site MLflow names: ``num-examples`` -> ``train_examples``, ``dp-steps`` -> ``dp_steps``."""
    return "train_examples" if key == WEIGHT_KEY else key.replace("-", "_")


def _weight_key(key: str, sample: Mapping[str, float]) -> str:
    for prefix, count in (("eval_", "eval_examples"), ("test_", "test_examples")):
        if key.startswith(prefix) and count in sample:
            return count
    return WEIGHT_KEY


def aggregate_metrics(rows: list[Mapping[str, float]]) -> dict[str, float]:
    """Example-weighted means per key (each key weighted by its own split's count), NaN-aware.

    Count keys are summed (``num-examples`` becomes ``train_examples``); ``epsilon`` becomes
    ``epsilon_max``, the worst privacy loss over sites; the other ``dp-*`` ledger values
    (steps, sample rate, noise multiplier) are per-site facts and are not averaged.
    """
    out: dict[str, float] = {}
    keys = sorted({k for r in rows for k in r})
    for key in keys:
        if key in COUNT_KEYS:
            out["train_examples" if key == WEIGHT_KEY else key] = float(sum(r.get(key, 0.0) for r in rows))
            continue
        if key == "epsilon":
            eps = [r[key] for r in rows if key in r and math.isfinite(r[key])]
            if eps:
                out["epsilon_max"] = max(eps)
            continue
        if key.startswith("dp-"):
            continue
        num = den = 0.0
        for r in rows:
            v = r.get(key)
            w = r.get(_weight_key(key, r), 0.0)
            if v is None or not math.isfinite(v) or w <= 0:
                continue
            num, den = num + w * v, den + w
        out[key] = num / den if den > 0 else math.nan
    return out


def _flower_aggr(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Flower's metric hook: the same NaN-aware aggregation (Flower's own propagates NaN)."""
    agg = aggregate_metrics([metrics_of(r) for r in records])
    return MetricRecord({k: v for k, v in agg.items()})


def split_metrics(metrics: Mapping[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """(train-side, eval-side) views of one reply's metrics."""
    evals = {k: v for k, v in metrics.items() if k.startswith(("eval_", "test_"))}
    train = {k: v for k, v in metrics.items() if k not in evals}
    return train, evals


# -- the mixin -------------------------------------------------------------------------------------
class NearlStrategyMixin:
    """Mixed in before a Flower strategy class; see the module docstring."""

    # set by _nearl_setup
    schema: Schema
    listener: RoundListener | None

    def _nearl_setup(self, *, schema: Schema, listener: RoundListener | None, round_offset: int,
                     total_rounds: int, evaluate_in_train: bool, wait_timeout: float, min_nodes: int,
                     transport: str = "float32") -> None:
        self.schema = dict(schema)
        self.plain_mean = getattr(type(self), "aggregate_train_base", None) is FedAvg.aggregate_train
        self.transport = check_transport(transport)
        self.wire_schema = wire_schema(self.schema, self.transport)
        self._wire_bytes: dict[int, int] = {}  # reply -> its size as received, before widening
        self.listener = listener
        self.round_offset = round_offset
        self.total_rounds = total_rounds
        self.evaluate_in_train = evaluate_in_train
        self.wait_timeout = wait_timeout
        self.min_nodes = min_nodes
        self.node_sites: dict[int, str] = {}
        self._round: RoundReport | None = None
        self._round_start = 0.0
        self._sampled: list[int] = []
        self._outgoing: list[Message] = []  # message ids are set when the Grid pushes them

    # -- helpers ---------------------------------------------------------------------------------
    def global_round(self, server_round: int) -> int:
        return self.round_offset + server_round

    def _wait_for_sites(self, grid: Grid) -> None:
        deadline = time.monotonic() + self.wait_timeout
        next_note = 0.0
        while (n := len(list(grid.get_node_ids()))) < self.min_nodes:
            now = time.monotonic()
            if now >= deadline:
                raise NotEnoughSites(
                    f"only {n} of the {self.min_nodes} required sites connected within {self.wait_timeout:.0f}s; "
                    "start more nearl-client sites or lower --min-sites"
                )
            if now >= next_note:
                log.info("waiting for sites: %d connected, %d required", n, self.min_nodes)
                next_note = now + 10
            time.sleep(1.0)

    def _site_names(self, node_ids: Iterable[int]) -> list[str]:
        return [self.node_sites.get(n, f"node-{n}") for n in node_ids]

    # -- train ---------------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        r = self.global_round(server_round)
        self._round_start = time.perf_counter()
        self._wait_for_sites(grid)
        config["evaluate-first"] = bool(self.evaluate_in_train)
        messages = self._narrowed(list(super().configure_train(r, arrays, config, grid)))  # type: ignore[misc]
        self._sampled = [m.metadata.dst_node_id for m in messages]
        self._outgoing = list(messages)
        self._round = RoundReport(round=r, arrays=arrays, sampled=len(messages),
                                  bytes_sent=sum(record_bytes(m.content) for m in messages))
        return messages

    def _narrowed(self, messages: list[Message]) -> list[Message]:
        """Send the global adapters in the transport dtype (the strategy itself keeps float32)."""
        if self.transport == "float32" or not messages:
            return messages
        rec = messages[0].content.array_records.get("arrays")
        if rec is not None:
            wire = ArrayRecord({k: Array(v) for k, v in encode({k: a.numpy() for k, a in rec.items()},
                                                                self.transport).items()})
            for m in messages:
                m.content["arrays"] = wire
        return messages

    def widen_replies(self, replies: Iterable[Message]) -> None:
        """Widen updates that arrived in the transport dtype back to the schema's float32, in place.

        Idempotent (a widened reply no longer matches the wire layout); a reply that does not
        match the wire layout is left for :meth:`screen_replies` to judge.
        """
        if self.transport == "float32":
            return
        for msg in replies:
            rec = msg.content.array_records.get("arrays") if msg.has_content() else None
            if rec is None or set(rec) != set(self.wire_schema):
                continue
            if all((tuple(rec[k].shape), str(rec[k].dtype)) == tuple(self.wire_schema[k]) for k in rec):
                self._wire_bytes[id(msg)] = record_bytes(msg.content)  # what crossed the network
                wide = decode({k: decode_array(a) for k, a in rec.items()}, self.schema, self.transport)
                msg.content["arrays"] = ArrayRecord({k: Array(v) for k, v in wide.items()})

    def screen_replies(self, replies: Iterable[Message], *, train: bool) -> tuple[list[Message], list[SiteReply],
                                                                                  dict[str, str]]:
        """Split replies into (accepted messages, their per-site data, rejected site -> reason)."""
        accepted, sites, rejected = [], [], {}
        destination = {m.metadata.message_id: m.metadata.dst_node_id for m in self._outgoing if m.metadata.message_id}
        for msg in replies:
            # an error the SuperLink writes for an unreachable node comes from the SuperLink itself:
            # attribute it to the node the instruction went to
            node = destination.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
            content = msg.content if msg.has_content() else None
            site = site_of(content, node, self.node_sites)
            self.node_sites[node] = site
            if msg.has_error():
                rejected[site] = f"site error: {msg.error.reason.strip().splitlines()[-1][:300] if msg.error.reason else msg.error.code}"
            elif content is None:
                rejected[site] = "empty reply"
            elif train and metrics_of(content).get("dp-declined") == 1.0:
                if content.array_records:
                    rejected[site] = "the reply declines the round but carries adapter tensors"
                else:
                    sites.append(SiteReply(node, site, metrics_of(content), record_bytes(content),
                                           declined=declined_reason(metrics_of(content))))
                    log.warning("round %s: site %s %s", self._round.round if self._round else "?", site,
                                sites[-1].declined)
                    continue
            else:
                problem = check_update(content, self.schema) if train else check_metrics(content)
                if problem:
                    rejected[site] = problem
                else:
                    accepted.append(msg)
                    sites.append(SiteReply(node, site, metrics_of(content),
                                           self._wire_bytes.get(id(msg), record_bytes(content))))
                    continue
            log.warning("round %s: rejected the %s reply of site %s: %s", self._round.round if self._round else "?",
                        "train" if train else "evaluate", site, rejected[site])
        return accepted, sites, rejected

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        r = self.global_round(server_round)
        replies = list(replies)
        self.widen_replies(replies)
        report = self._round or RoundReport(round=r, arrays=ArrayRecord())
        accepted, sites, rejected = self.screen_replies(replies, train=True)
        report.rejected.update(rejected)
        report.declined.update({s.site: s.declined for s in sites if s.declined})
        report.bytes_received = sum(s.nbytes for s in sites)
        self._wire_bytes.clear()
        report.answered = sorted(s.site for s in sites if not s.declined)
        arrays = None
        if accepted and self.plain_mean:  # FedAvg / FedProx: the same mean as Flower's, on flat buffers
            arrays = weighted_mean([m.content["arrays"] for m in accepted],
                                   [metrics_of_raw(m.content)[self.weighted_by_key] for m in accepted], self.schema)
        elif accepted:
            arrays, _ = super().aggregate_train(r, accepted)  # type: ignore[misc]
        if arrays is not None:
            arrays = self.as_schema_dtype(arrays)
            report.arrays, report.aggregated = arrays, True
        else:
            log.warning("round %d: no update accepted; the global adapters stay unchanged", r)
        rows_train, rows_eval, evals_per_site = [], [], {}
        for s in sites:
            train_m, eval_m = split_metrics(s.metrics)
            rows_train.append(train_m)
            report.per_site[s.site] = {site_metric_key(k): v for k, v in train_m.items()}
            if eval_m:
                rows_eval.append(eval_m)
                evals_per_site[s.site] = eval_m
        report.train_metrics = aggregate_metrics(rows_train)
        report.train_metrics.pop("train_examples", None)
        report.train_metrics["train_examples"] = float(sum(s.metrics.get(WEIGHT_KEY, 0) for s in sites
                                                           if not s.declined))
        if rows_eval and self.listener is not None:  # incoming global = after round r-1
            self.listener.evaluated(r - 1, aggregate_metrics(rows_eval), evals_per_site)
        known = set(self.node_sites.values()) | set(self._site_names(self._sampled))
        report.missing = sorted(known - set(report.answered) - set(report.declined))
        self._round = report
        return arrays, MetricRecord({k: v for k, v in report.train_metrics.items() if math.isfinite(v)})

    def replace_round_arrays(self, arrays: ArrayRecord, metrics: Mapping[str, float]) -> None:
        """A wrapper (server-side DP) changed this round's result: report and checkpoint what it returns."""
        if self._round is not None:
            self._round.arrays = arrays
            self._round.train_metrics.update(metrics)

    def as_schema_dtype(self, arrays: ArrayRecord) -> ArrayRecord:
        """Server optimisers compute in float64; the global adapters keep the agreed dtype."""
        out = {}
        for k, a in arrays.items():
            want = self.schema[k][1] if k in self.schema else None
            out[k] = a if want is None or str(a.dtype) == want else Array(a.numpy().astype(want))
        return ArrayRecord(out)

    # -- evaluate --------------------------------------------------------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        r = self.global_round(server_round)
        if self.evaluate_in_train and r < self.total_rounds:
            return []
        self._wait_for_sites(grid)
        messages = self._narrowed(list(super().configure_evaluate(r, arrays, config, grid)))  # type: ignore[misc]
        if self._round is not None:
            self._round.bytes_sent += sum(record_bytes(m.content) for m in messages)
        self._outgoing = list(messages)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        r = self.global_round(server_round)
        replies = list(replies)
        result = None
        if replies:
            accepted, sites, rejected = self.screen_replies(replies, train=False)
            if self._round is not None:
                self._round.bytes_received += sum(s.nbytes for s in sites)
            per_site = {s.site: {("eval_examples" if k == WEIGHT_KEY else k): v for k, v in s.metrics.items()}
                        for s in sites}
            rows = list(per_site.values())
            agg = aggregate_metrics(rows)
            if self.listener is not None and rows:
                self.listener.evaluated(r, agg, per_site)
            result = MetricRecord({k: v for k, v in agg.items() if math.isfinite(v)}) if rows else None
        self._finish_round()
        return result

    def _finish_round(self) -> None:
        report = self._round
        if report is None:
            return
        report.seconds = time.perf_counter() - self._round_start
        if self.listener is not None:
            self.listener.round_finished(report, self)
        self._round = None

    # -- state for checkpoints -------------------------------------------------------------------
    def strategy_state(self) -> dict[str, dict[str, np.ndarray]]:
        state = {}
        for attr in STATE_ATTRS:
            value = getattr(self, attr, None)
            if isinstance(value, dict) and value:
                state[attr] = {k: np.asarray(v) for k, v in value.items()}
        return state

    def load_strategy_state(self, state: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        for attr, values in state.items():
            if attr in STATE_ATTRS and hasattr(self, attr):
                setattr(self, attr, {k: np.array(v) for k, v in values.items()})


def strategy_class(name: str) -> type:
    try:
        base = STRATEGIES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown strategy '{name}'; choose one of {', '.join(STRATEGIES)}") from None
    return type(f"Nearl{base.__name__}", (NearlStrategyMixin, base), {"aggregate_train_base": base.aggregate_train})


def make_strategy(name: str, *, schema: Schema, min_nodes: int, fraction_train: float = 1.0,
                  listener: RoundListener | None = None, round_offset: int = 0, total_rounds: int = 1,
                  evaluate_in_train: bool = True, wait_timeout: float = 600.0,
                  options: Mapping[str, Any] | None = None, transport: str = "float32") -> NearlStrategyMixin:
    """Build the configured strategy with explicit sampling settings and NEARL's hooks."""
    options = dict(options or {})
    cls = strategy_class(name)
    kwargs: dict[str, Any] = dict(fraction_train=fraction_train, fraction_evaluate=1.0,
                                  min_train_nodes=min_nodes, min_evaluate_nodes=min_nodes,
                                  min_available_nodes=min_nodes, weighted_by_key=WEIGHT_KEY,
                                  train_metrics_aggr_fn=_flower_aggr, evaluate_metrics_aggr_fn=_flower_aggr)
    base = name.lower()
    if base == "fedprox":
        kwargs["proximal_mu"] = float(options.get("proximal-mu", 0.01))
    elif base in ("fedadam", "fedyogi"):
        kwargs["eta"] = float(options.get("server-lr", 0.01))
        kwargs["eta_l"] = float(options.get("client-lr", 0.003))
    elif base == "fedtrimmedavg":
        kwargs["beta"] = float(options.get("trim-beta", 0.2))
    elif base == "krum":
        kwargs["num_malicious_nodes"] = int(options.get("krum-malicious", 0))
    strategy = cls(**kwargs)
    strategy._nearl_setup(schema=schema, listener=listener, round_offset=round_offset, total_rounds=total_rounds,
                          evaluate_in_train=evaluate_in_train, wait_timeout=wait_timeout, min_nodes=min_nodes,
                          transport=transport)
    return strategy
