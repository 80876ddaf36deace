"""The federation's strategy: a Flower strategy with NEARL's checks, logging and checkpoint hooks.

:func:`make_strategy` picks a class from ``flwr.serverapp.strategy`` (FedAvg by default)
and subclasses it with :class:`NearlStrategyMixin`, which hooks ``configure_*`` and
``aggregate_*``; :func:`server.loop.run_rounds` (Flower's ``Strategy.start()`` loop with
early stopping) runs the rounds.  The mixin

* waits (bounded by ``wait_timeout``) until ``min_nodes`` sites are connected instead of
  Flower's unbounded wait, and fails the run with a clear message otherwise;
* sends the global adapters as one flat array in the transport dtype and states its
  layout (``adapter-layout``) in every instruction (:mod:`nearl_protocol.flat`);
* screens every train reply before aggregation (:class:`server.replies.ReplyScreening`),
  reading its one flat array once: a missing or extra array, bytes that disagree with
  their metadata, a wrong dtype or length, NaN/Inf values and bad example counts are
  rejected (never aggregated) and logged with the site's name;
* bounds what an accepted update can do (:class:`server.robust.RoundGuard`): values
  beyond ``max-abs-value``, norm outliers, inflated example claims (capped), updates
  that make the aggregation raise (rejected, the round goes on), and an aggregate that
  is not finite or out of range (not applied); every strategy aggregates the decoded
  values in float64 (FedAvg/FedProx widen each float32 update as they sum it);
* aggregates metrics itself (weighted by the matching example count, NaN-aware,
  epsilon as the maximum over sites) and keeps per-site values;
* records sites that decline a round because of their privacy budget (a metrics-only
  reply with ``dp-declined``): no update, not an error, the round goes on without them;
* counts bytes and wall time per round, records which sites answered and which did not;
* hands a :class:`RoundReport` to a listener after every round (MLflow + checkpoint).

Round numbers: the loop counts 1..num_rounds; ``round_offset`` maps them onto the
global round after a resume, so FedAdam's bias correction and every log see the
global round.  With ``evaluate_in_train`` the sites evaluate the incoming global
adapters at the start of each train message; those metrics describe the global model
after the *previous* round and are reported at that step (step 0 = zero-shot), and a
round has no evaluate phase.  Otherwise each round's evaluate message validates the
round's adapters.  The rounds themselves and the evaluations after the last one (the
last round's validation, the final evaluation of the kept adapters) are driven by
:mod:`server.loop`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from typing import Any, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedMedian, FedProx, FedTrimmedAvg, FedYogi, Krum

from nearl_core.transport import check_transport, wire_schema
from nearl_protocol import keys
from nearl_protocol.flat import FlatLayout
from nearl_protocol.messages import metrics_of, read_reply, record_bytes
from nearl_protocol.schema import Schema
from server.arrays import flatten, unflatten, weighted_mean_flat
from server.replies import UNIT_WEIGHT_KEY, ReplyScreening
from server.robust import CAPS_STATE, Limits, Outcome, RoundGuard, Update
from server.rounds import NotEnoughSites, RoundListener, RoundReport, SiteReply, record_site_metrics
from server.secagg_round import SecureRounds, secure_problem
from server.screening import SiteIdentities, aggregate_metrics, check_update, site_metrics

__all__ = ["STRATEGIES", "UNIT_WEIGHT_KEY", "NearlStrategyMixin", "NotEnoughSites", "RoundListener", "RoundReport",
           "SiteReply", "aggregate_metrics", "check_update", "make_strategy", "strategy_class"]

log = logging.getLogger("nearl.strategy")

STRATEGIES: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedavgm": FedAvgM,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
}
STATE_ATTRS = ("m_t", "v_t", "momentum_vector")  # strategy arrays that must survive a resume


def _flower_aggr(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:  # noqa: ARG001
    """Flower's metric hook: the same NaN-aware aggregation (Flower's own propagates NaN)."""
    return MetricRecord(aggregate_metrics([site_metrics(r) for r in records]))


# -- the mixin -------------------------------------------------------------------------------------
def in_site_order(replies: Iterable[Message]) -> list[Message]:
    """Replies sorted by the site they claim to be: sums (and so the global adapters and every
    aggregated metric) do not depend on the order in which replies happened to arrive."""
    return sorted(replies, key=lambda m: (read_reply(m).claimed_site or "", m.metadata.src_node_id))


class NearlStrategyMixin(ReplyScreening):
    """Mixed in before a Flower strategy class; see the module docstring."""

    # set by _nearl_setup
    schema: Schema
    listener: RoundListener | None

    def _nearl_setup(self, *, schema: Schema, listener: RoundListener | None, round_offset: int,
                     total_rounds: int, evaluate_in_train: bool, wait_timeout: float, min_nodes: int,
                     transport: str = "float32", registry: Mapping[int, str] | None = None,
                     limits: Limits | None = None, secure: Any = None) -> None:
        self.schema = dict(schema)
        self.secure = SecureRounds(secure) if secure is not None else None  # server.secagg.SecAggSettings
        self.guard = RoundGuard(limits or Limits())
        self._reference: np.ndarray | None = None  # the current global adapters, flat float64
        self.last_update_count = 0  # updates in the last applied aggregate (server-side DP's n)
        self.plain_mean = getattr(type(self), "aggregate_train_base", None) is FedAvg.aggregate_train
        self.transport = check_transport(transport)
        self.wire_schema = wire_schema(self.schema, self.transport)
        self.layout = FlatLayout.of(self.schema)  # the float32 tensors the strategy keeps
        self.wire_layout = FlatLayout.of(self.wire_schema)  # what crosses the network
        self._received: dict[int, Any] = {}  # id(reply) -> server.replies.Received, for one aggregate_train
        self._hash_pool = None  # worker threads for payload hashes, started on first use
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
        self._current_round = 0

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

    # -- train ---------------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        r = self.global_round(server_round)
        self._round_start = time.perf_counter()
        self._wait_for_sites(grid)
        config[keys.EVALUATE_FIRST] = bool(self.evaluate_in_train)
        config[keys.ADAPTER_LAYOUT] = self.wire_layout.digest
        messages = self._to_wire(list(super().configure_train(r, arrays, config, grid)))  # type: ignore[misc]
        self._reference = flatten(arrays, self.schema) if set(arrays) == set(self.schema) else None
        self._tell_refused_nodes(messages)
        self._sampled = [m.metadata.dst_node_id for m in messages]
        self._outgoing = list(messages)
        self._round = RoundReport(round=r, arrays=arrays, sampled=len(messages),
                                  bytes_sent=sum(record_bytes(m.content) for m in messages))
        if self.secure is not None:  # key setup and sharing first; only the sites still in train
            messages = self.secure.configure(self, grid, r, messages)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        r = self.global_round(server_round)
        if self.secure is not None:  # masked replies: unmask their sum, the strategy sees one update
            return self.secure.aggregate(self, r, replies)
        replies = in_site_order(replies)
        report = self._round or RoundReport(round=r, arrays=ArrayRecord())
        accepted, sites, rejected = self.screen_replies(replies, train=True)
        report.bytes_received = sum(s.nbytes for s in sites)
        self._current_round = r
        updating = [s for s in sites if not s.declined]
        outcome = self._guarded(r, accepted, updating)
        for msg, s in zip(accepted, updating, strict=True):
            s.payload = self.payload_hash(msg)  # hashed on worker threads meanwhile
        self.forget_replies()
        for site, why in outcome.rejected.items():
            log.warning("round %d: rejected the train reply of site %s: %s", r, site, why)
        rejected.update(outcome.rejected)
        sites = [s for s in sites if s.site not in outcome.rejected]
        report.rejected.update(rejected)
        report.declined.update({s.site: s.declined for s in sites if s.declined})
        report.payload_sha256 = {s.site: s.payload for s in sites if s.payload}
        report.answered = sorted(s.site for s in sites if not s.declined)
        arrays = None
        if outcome.arrays is not None:
            arrays = unflatten(outcome.arrays, self.schema)
            report.arrays, report.aggregated = arrays, True
        elif outcome.not_applied:
            report.not_applied = outcome.not_applied
            log.warning("round %d: update not applied: %s", r, outcome.not_applied)
        else:
            log.warning("round %d: no update accepted; the global adapters stay unchanged", r)
        record_site_metrics(report, sites, self.listener, r)
        report.train_metrics[keys.MLFLOW_TRAIN_EXAMPLES] = float(
            sum(s.metrics.get(keys.MLFLOW_TRAIN_EXAMPLES, 0) for s in sites if not s.declined))
        known = set(self.identities.bound.values()) | set(self._site_names(self._sampled))
        report.missing = sorted(known - set(report.answered) - set(report.declined))
        self._round = report
        return arrays, MetricRecord({k: v for k, v in report.train_metrics.items() if math.isfinite(v)})

    def _guarded(self, r: int, accepted: list[Message], sites: list[SiteReply]) -> Outcome:
        """The round's screened updates through :class:`server.robust.RoundGuard` (range, outliers, caps, fence)."""
        updates = [Update(s.site, self.update_values(m), metrics_of(m.content)[keys.NUM_EXAMPLES], source=m.metadata,
                          facts=self.update_facts(m)) for m, s in zip(accepted, sites, strict=True)]
        outcome = self.guard.run(r, updates, self._reference, self._aggregate_updates, self._snapshot, self._restore,
                                 equal_weights=self.weighted_by_key == UNIT_WEIGHT_KEY)
        for u, s in zip(updates, sites):
            if u.used:
                s.metrics[keys.MLFLOW_TRAIN_EXAMPLES] = u.used  # what the round counted, not what the site claimed
            if u.cap is not None:
                s.metrics.update(examples_clipped=1.0, examples_cap=u.cap)
        self.last_update_count = outcome.count
        return outcome

    def _aggregate_updates(self, updates: list[Update], weights: list[float]) -> dict[str, np.ndarray]:
        """This strategy's aggregate (float64) of updates already decoded against their metadata.

        FedAvg/FedProx: the weighted mean, summed in float64 on flat buffers.  Every other
        strategy gets messages rebuilt from the decoded values (widened to float64, so its sums
        and distances do not overflow) with the weight as their only metric: Flower's code
        never reads a reply's own bytes or metrics.
        """
        if self.plain_mean:
            return self.layout.split(weighted_mean_flat([u.values for u in updates], weights))
        messages = [Message(content=RecordDict({
            keys.ARRAYS: ArrayRecord({k: Array(v) for k, v in
                                      self.layout.split(u.values.astype(np.float64)).items()}),
            keys.METRICS: MetricRecord({self.weighted_by_key: float(w)})}), metadata=u.source)
            for u, w in zip(updates, weights, strict=True)]
        arrays, _ = super().aggregate_train(self._current_round, messages)  # type: ignore[misc]
        if arrays is None:
            raise ValueError("the strategy returned no arrays")
        out = {k: np.asarray(arrays[k].numpy(), dtype=np.float64) for k in self.schema}
        for k, (shape, _) in self.schema.items():
            if out[k].shape != tuple(shape):
                raise ValueError(f"the strategy returned '{k}' with shape {out[k].shape}, expected {tuple(shape)}")
        return out

    def _snapshot(self) -> dict[str, Any]:
        return {attr: getattr(self, attr) for attr in STATE_ATTRS if hasattr(self, attr)}

    def _restore(self, state: Mapping[str, Any]) -> None:
        for attr, value in state.items():  # Flower's optimisers replace their dicts, never update them in place
            setattr(self, attr, value)

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
        """Flower's evaluate phase of a round: the round's federated validation, unless the next round's
        train message carries it (``evaluate_in_train``).  The evaluations after the last round are
        :func:`server.loop.evaluate_at_sites`'."""
        if self.evaluate_in_train:
            return []
        config[keys.FINAL_EVALUATION] = False
        return self.evaluation_messages(self.global_round(server_round), arrays, config, grid)

    def evaluation_messages(self, r: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> list[Message]:
        """Evaluate instructions of ``arrays`` (global round ``r``) to every sampled site; ``config`` says
        whether this is the final evaluation (:data:`keys.FINAL_EVALUATION`)."""
        self._wait_for_sites(grid)
        config[keys.ADAPTER_LAYOUT] = self.wire_layout.digest
        messages = self._to_wire(list(super().configure_evaluate(r, arrays, config, grid)))  # type: ignore[misc]
        self._tell_refused_nodes(messages)
        if self._round is not None:
            self._round.bytes_sent += sum(record_bytes(m.content) for m in messages)
        self._outgoing = list(messages)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        r = self.global_round(server_round)
        agg, per_site = self.evaluation_results(replies)
        if self.listener is not None and per_site:
            self.listener.evaluated(r, agg, per_site)
        self._finish_round()
        return MetricRecord({k: v for k, v in agg.items() if math.isfinite(v)}) if per_site else None

    def evaluation_results(self, replies: Iterable[Message]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        """Screened evaluate replies: the example-weighted means over sites, and each site's metrics."""
        replies = in_site_order(replies)
        if not replies:
            return {}, {}
        _, sites, _ = self.screen_replies(replies, train=False)
        if self._round is not None:
            self._round.bytes_received += sum(s.nbytes for s in sites)
        per_site = {s.site: {(keys.MLFLOW_EVAL_EXAMPLES if k == keys.MLFLOW_TRAIN_EXAMPLES else k): v
                             for k, v in s.metrics.items()} for s in sites}
        return aggregate_metrics(list(per_site.values())), per_site

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
        if self.guard.caps.first:
            state[CAPS_STATE] = self.guard.caps.state()
        return state

    def load_strategy_state(self, state: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        for attr, values in state.items():
            if attr == CAPS_STATE:
                self.guard.caps.load(values)
            elif attr in STATE_ATTRS and hasattr(self, attr):
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
                  registry: Mapping[int, str] | None = None, secure: Any = None,
                  client_lr: float | None = None) -> NearlStrategyMixin:
    """Build the configured strategy with explicit sampling settings and NEARL's hooks.

    ``options`` holds the strategies' settings and the guard's limits under their run-config
    keys (``proximal-mu``, ``max-abs-value``, ...); a missing key takes the federation default
    (server/settings.py).  ``client_lr`` is the sites' learning rate, which FedAdam/FedYogi
    record as their ``eta_l`` (the NEARL config's ``train.lr``).
    """
    from server.settings import default

    options = dict(options or {})

    def option(name: str) -> Any:
        return options.get(name.replace("_", "-"), default(name))

    cls = strategy_class(name)
    kwargs: dict[str, Any] = dict(fraction_train=fraction_train, fraction_evaluate=1.0,
                                  min_train_nodes=min_nodes, min_evaluate_nodes=min_nodes,
                                  min_available_nodes=min_nodes, weighted_by_key=keys.NUM_EXAMPLES,
                                  train_metrics_aggr_fn=_flower_aggr, evaluate_metrics_aggr_fn=_flower_aggr)
    base = name.lower()
    if secure is not None and secure_problem(base, central_dp=False):
        raise ValueError(secure_problem(base, central_dp=False))
    if base == "fedprox":
        kwargs["proximal_mu"] = float(option("proximal_mu"))
    elif base == "fedavgm":
        kwargs["server_momentum"] = float(option("server_momentum"))
    elif base in ("fedadam", "fedyogi"):
        kwargs["eta"] = float(option("server_lr"))
        if client_lr is not None:
            kwargs["eta_l"] = float(client_lr)
    elif base == "fedtrimmedavg":
        kwargs["beta"] = float(option("trim_beta"))
    elif base == "krum":
        kwargs["num_malicious_nodes"] = int(option("krum_malicious"))
    strategy = cls(**kwargs)
    strategy._nearl_setup(schema=schema, listener=listener, round_offset=round_offset, total_rounds=total_rounds,
                          evaluate_in_train=evaluate_in_train, wait_timeout=wait_timeout, min_nodes=min_nodes,
                          transport=transport, registry=registry, limits=Limits.from_options(options),
                          secure=secure)
    return strategy
