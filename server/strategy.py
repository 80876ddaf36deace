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
from typing import Any, Mapping, Protocol

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, FedYogi, Krum

from nearl_core.transport import check_transport, decode, encode, wire_schema
from nearl_protocol import keys
from nearl_protocol.arrays import PayloadError, decode_array, payload_sha256
from nearl_protocol.messages import metrics_of, read_reply, record_bytes
from nearl_protocol.schema import Schema
from server.arrays import weighted_mean
from server.screening import (SiteIdentities, aggregate_metrics, check_metrics, check_update, declined,
                              declined_reason, site_metrics, split_metrics)

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
UNIT_WEIGHT_KEY = "server-dp-weight"  # set to 1 on each update by server-side DP (equal weights); never logged
STATE_ATTRS = ("m_t", "v_t", "momentum_vector")  # strategy arrays that must survive a resume


class NotEnoughSites(RuntimeError):
    """Fewer than ``min_nodes`` sites connected before the wait timeout."""


@dataclass
class SiteReply:
    node_id: int
    site: str
    metrics: dict[str, float]
    nbytes: int
    declined: str | None = None  # the site declined to train (its privacy budget); no update
    payload: str | None = None  # sha256 of the adapter bytes received


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
    payload_sha256: dict[str, str] = field(default_factory=dict)  # site -> hash of the update it sent


class RoundListener(Protocol):
    def evaluated(self, step: int, metrics: dict[str, float], per_site: dict[str, dict[str, float]]) -> None: ...

    def round_finished(self, report: RoundReport, strategy: "NearlStrategyMixin") -> None: ...


def _flower_aggr(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:  # noqa: ARG001
    """Flower's metric hook: the same NaN-aware aggregation (Flower's own propagates NaN)."""
    return MetricRecord(aggregate_metrics([site_metrics(r) for r in records]))


# -- the mixin -------------------------------------------------------------------------------------
class NearlStrategyMixin:
    """Mixed in before a Flower strategy class; see the module docstring."""

    # set by _nearl_setup
    schema: Schema
    listener: RoundListener | None

    def _nearl_setup(self, *, schema: Schema, listener: RoundListener | None, round_offset: int,
                     total_rounds: int, evaluate_in_train: bool, wait_timeout: float, min_nodes: int,
                     transport: str = "float32", registry: Mapping[int, str] | None = None) -> None:
        self.schema = dict(schema)
        self.plain_mean = getattr(type(self), "aggregate_train_base", None) is FedAvg.aggregate_train
        self.transport = check_transport(transport)
        self.wire_schema = wire_schema(self.schema, self.transport)
        self._wire_bytes: dict[int, int] = {}  # reply -> its size as received, before widening
        self._wire_hash: dict[int, str] = {}  # reply -> sha256 of its adapter bytes as received
        self.listener = listener
        self.round_offset = round_offset
        self.total_rounds = total_rounds
        self.evaluate_in_train = evaluate_in_train
        self.wait_timeout = wait_timeout
        self.min_nodes = min_nodes
        self.identities = SiteIdentities(registry)
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
        return [self.identities.label(n) for n in node_ids]

    def _tell_refused_nodes(self, messages: list[Message]) -> None:
        """A node whose replies are refused (e.g. a duplicate site name) is told why in its instruction."""
        for m in messages:
            why = self.identities.refused.get(m.metadata.dst_node_id)
            if why:  # Flower's messages share one content object: give this one its own
                config = ConfigRecord({**m.content[keys.CONFIG], keys.NODE_REFUSED: why})
                m.content = RecordDict({**{k: v for k, v in m.content.items()}, keys.CONFIG: config})

    # -- train ---------------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        r = self.global_round(server_round)
        self._round_start = time.perf_counter()
        self._wait_for_sites(grid)
        config[keys.EVALUATE_FIRST] = bool(self.evaluate_in_train)
        messages = self._narrowed(list(super().configure_train(r, arrays, config, grid)))  # type: ignore[misc]
        self._tell_refused_nodes(messages)
        self._sampled = [m.metadata.dst_node_id for m in messages]
        self._outgoing = list(messages)
        self._round = RoundReport(round=r, arrays=arrays, sampled=len(messages),
                                  bytes_sent=sum(record_bytes(m.content) for m in messages))
        return messages

    def _narrowed(self, messages: list[Message]) -> list[Message]:
        """Send the global adapters in the transport dtype (the strategy itself keeps float32)."""
        if self.transport == "float32" or not messages:
            return messages
        rec = messages[0].content.array_records.get(keys.ARRAYS)
        if rec is not None:
            wire = ArrayRecord({k: Array(v) for k, v in encode({k: a.numpy() for k, a in rec.items()},
                                                                self.transport).items()})
            for m in messages:
                m.content[keys.ARRAYS] = wire
        return messages

    def widen_replies(self, replies: Iterable[Message]) -> None:
        """Widen updates that arrived in the transport dtype back to the schema's float32, in place.

        Idempotent (a widened reply no longer matches the wire layout); a reply that does not
        match the wire layout is left for :meth:`screen_replies` to judge.
        """
        if self.transport == "float32":
            return
        for msg in replies:
            rec = msg.content.array_records.get(keys.ARRAYS) if msg.has_content() else None
            if rec is None or set(rec) != set(self.wire_schema):
                continue
            if all((tuple(rec[k].shape), str(rec[k].dtype)) == tuple(self.wire_schema[k]) for k in rec):
                try:
                    narrow = {k: decode_array(a) for k, a in rec.items()}
                except PayloadError:
                    continue  # screening rejects it with the reason
                self._wire_bytes[id(msg)] = record_bytes(msg.content)  # what crossed the network
                self._wire_hash[id(msg)] = payload_sha256(rec)
                wide = decode(narrow, self.schema, self.transport)
                msg.content[keys.ARRAYS] = ArrayRecord({k: Array(v) for k, v in wide.items()})

    def screen_replies(self, replies: Iterable[Message], *, train: bool) -> tuple[list[Message], list[SiteReply],
                                                                                  dict[str, str]]:
        """Split replies into (accepted messages, their per-site data, rejected site -> reason).

        Each reply is attributed by the node it came from (an error the SuperLink writes for an
        unreachable node is attributed to the node the instruction went to).
        """
        accepted, sites, rejected = [], [], {}
        destination = {m.metadata.message_id: m.metadata.dst_node_id for m in self._outgoing if m.metadata.message_id}
        for msg in replies:
            node = destination.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
            reply = read_reply(msg)
            site, problem = self.identities.attribute(node, reply.claimed_site)
            if problem is None:
                problem = self._judge(msg, reply.error, train)
            if problem is None:
                accepted.append(msg)
                metrics = site_metrics(msg.content)
                metrics.pop(keys.mlflow_name(UNIT_WEIGHT_KEY), None)  # the server's own mark (server-side DP)
                sites.append(SiteReply(node, site, metrics,
                                       self._wire_bytes.get(id(msg), record_bytes(msg.content)),
                                       payload=self._payload_hash(msg) if train else None))
            elif problem == "declined":
                sites.append(SiteReply(node, site, site_metrics(msg.content), record_bytes(msg.content),
                                       declined=declined_reason(site_metrics(msg.content))))
                log.warning("round %s: site %s %s", self._round.round if self._round else "?", site, sites[-1].declined)
            else:
                rejected[site] = problem
                log.warning("round %s: rejected the %s reply of site %s: %s", self._round.round if self._round else "?",
                            "train" if train else "evaluate", site, problem)
        return accepted, sites, rejected

    def _judge(self, msg: Message, error: str | None, train: bool) -> str | None:
        """None to accept, ``"declined"`` for a budget decline, else the reason to reject."""
        if error is not None:
            return error
        if train and declined(msg.content):
            return "the reply declines the round but carries adapter tensors" if msg.content.array_records else "declined"
        return check_update(msg.content, self.schema) if train else check_metrics(msg.content)

    def _payload_hash(self, msg: Message) -> str:
        """sha256 of the adapter bytes as received (before widening): what the site's audit trail records."""
        return self._wire_hash.get(id(msg)) or payload_sha256(msg.content[keys.ARRAYS])

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
        self._wire_hash.clear()
        report.payload_sha256 = {s.site: s.payload for s in sites if s.payload}
        report.answered = sorted(s.site for s in sites if not s.declined)
        arrays = None
        if accepted and self.plain_mean:  # FedAvg / FedProx: the same mean as Flower's, on flat buffers
            arrays = weighted_mean([m.content[keys.ARRAYS] for m in accepted],
                                   [metrics_of(m.content)[self.weighted_by_key] for m in accepted], self.schema)
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
            report.per_site[s.site] = dict(train_m)
            if eval_m:
                rows_eval.append(eval_m)
                evals_per_site[s.site] = eval_m
        report.train_metrics = aggregate_metrics(rows_train)
        report.train_metrics.pop("train_examples", None)
        report.train_metrics["train_examples"] = float(sum(s.metrics.get("train_examples", 0) for s in sites
                                                           if not s.declined))
        if rows_eval and self.listener is not None:  # incoming global = after round r-1
            self.listener.evaluated(r - 1, aggregate_metrics(rows_eval), evals_per_site)
        known = set(self.identities.bound.values()) | set(self._site_names(self._sampled))
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
        self._tell_refused_nodes(messages)
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
            per_site = {s.site: {("eval_examples" if k == "train_examples" else k): v for k, v in s.metrics.items()}
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
                  options: Mapping[str, Any] | None = None, transport: str = "float32",
                  registry: Mapping[int, str] | None = None) -> NearlStrategyMixin:
    """Build the configured strategy with explicit sampling settings and NEARL's hooks."""
    options = dict(options or {})
    cls = strategy_class(name)
    kwargs: dict[str, Any] = dict(fraction_train=fraction_train, fraction_evaluate=1.0,
                                  min_train_nodes=min_nodes, min_evaluate_nodes=min_nodes,
                                  min_available_nodes=min_nodes, weighted_by_key=keys.NUM_EXAMPLES,
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
                          transport=transport, registry=registry)
    return strategy
