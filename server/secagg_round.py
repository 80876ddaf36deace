"""Secure aggregation inside the strategy: the two hooks :class:`server.strategy.NearlStrategyMixin` calls.

:meth:`SecureRounds.configure` runs after the strategy built the round's train
instructions: key setup and key sharing (:class:`server.secagg.SecAggRound`), then only
the sites still in get their (collect) instruction.  :meth:`SecureRounds.aggregate`
replaces the per-site screening and aggregation: it reads the masked replies, unmasks
their sum and hands the strategy ONE update, the weighted mean of the sites' updates
added to the global adapters.  FedAvg and FedProx take it as the new global adapters;
FedAdam and FedYogi take their optimiser step towards it (the step of a mean is the
mean of the steps, so nothing but the sum is needed).  Median, trimmed mean, Krum and
server-side clipping need every site's update and are refused (:func:`secure_problem`).

Per-site screening that needs the update itself (value range, norm outliers, example
caps) cannot run on masked updates; the per-coordinate clip range bounds what one site
can move instead, and the aggregate still passes the range fence (``max-abs-value``).
Clear per-site metrics (loss, accuracy, evaluation, the DP ledger) are averaged without
weights: the example counts travel masked, only their sum is known.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterable

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord

from nearl_protocol import keys
from nearl_protocol import secagg as sa
from nearl_protocol.arrays import payload_sha256
from nearl_protocol.messages import read_reply
from server.arrays import unflatten
from server.robust import Update, out_of_range
from server.rounds import RoundReport, SiteReply, record_site_metrics
from server.screening import declined, declined_reason, site_metrics
from server.secagg import SecAggAbort, SecAggRound, SecAggSettings, nodes_of, read_masked

log = logging.getLogger("nearl.secagg")
LINEAR = ("fedavg", "fedprox", "fedadam", "fedyogi")  # strategies that only need the sum of the updates


def secure_problem(strategy: str, central_dp: bool) -> str | None:
    """Why ``--secure-aggregation`` cannot run with these settings, or None."""
    if strategy not in LINEAR:
        return (f"secure aggregation gives the server only the sum of the updates; strategy {strategy} needs each "
                f"site's update: use one of {', '.join(LINEAR)}")
    if central_dp:
        return ("server-side DP clips each site's update, which secure aggregation hides; use site-side DP-SGD "
                "(--dp-epsilon) with secure aggregation")
    return None


class SecureRounds:
    """The secure-aggregation state of a federation: the round in progress and the Grid it runs on."""

    def __init__(self, settings: SecAggSettings):
        self.settings = settings
        self.current: SecAggRound | None = None
        self.abort = ""
        self.grid: Any = None

    def configure(self, strategy: Any, grid: Any, server_round: int, messages: list[Message]) -> list[Message]:
        """Key setup and sharing; the collect instructions of the sites still in ([] when the round aborts)."""
        self.grid, self.abort = grid, ""
        self.current = SecAggRound(self.settings, server_round)
        try:
            out = self.current.begin(grid, messages)
        except (SecAggAbort, sa.SecAggError) as err:
            self.abort, out = str(err), []
            log.warning("round %d: %s", server_round, err)
        for reply in self.current.received:  # name the sites from their stage replies (a site that dies
            if reply.has_content():          # before its train reply is then reported by name)
                strategy.identities.attribute(reply.metadata.src_node_id, read_reply(reply).claimed_site)
        if strategy._round is not None:
            strategy._round.bytes_sent = self.current.bytes_sent + sum(sa.content_bytes(m.content) for m in out)
        return out

    def aggregate(self, strategy: Any, r: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord]:
        """Unmask the round's sum, let the strategy apply it, fill the round's report."""
        report = strategy._round or RoundReport(round=r, arrays=ArrayRecord())
        rnd = self.current or SecAggRound(self.settings, r)
        sites, masked, rejected = self._read(strategy, rnd, r, replies)
        arrays, stats = None, {}
        sent_before = rnd.bytes_sent
        if self.abort:
            report.not_applied = self.abort
        else:
            try:
                mean, weight, clipped = rnd.unmask(self.grid, masked)
                arrays = self._apply(strategy, r, mean, weight, report, replies)
                stats = {keys.MLFLOW_SECAGG_CLIPPED: float(clipped), keys.MLFLOW_SECAGG_ERROR_BOUND:
                         rnd.params.error_bound(weight, len(masked)) if weight else math.nan}
                if weight and not self.settings.equal_weights:
                    stats[keys.MLFLOW_TRAIN_EXAMPLES] = float(weight)
            except SecAggAbort as err:
                report.not_applied = str(err)
                log.warning("round %d: %s", r, err)
        report.bytes_received = rnd.bytes_received + sum(s.nbytes for s in sites)
        report.bytes_sent += rnd.bytes_sent - sent_before  # the unmask stage
        stats[keys.MLFLOW_SECAGG_DROPPED] = float(sum(len(v) for v in rnd.dropped.values()))
        self._report(strategy, report, r, sites, rejected, stats)
        return arrays, MetricRecord({k: v for k, v in report.train_metrics.items() if math.isfinite(v)})

    def _read(self, strategy: Any, rnd: SecAggRound, r: int, replies: Iterable[Message]
              ) -> tuple[list[SiteReply], dict[int, np.ndarray], dict[str, str]]:
        """The masked replies: their per-site records, their vectors by participant, the rejected sites."""
        sites, masked, rejected = [], {}, {}
        for node, reply in sorted(nodes_of(replies, strategy._outgoing), key=lambda p: p[0]):
            site, problem = strategy.identities.attribute(node, read_reply(reply).claimed_site)
            values = None
            if problem is None and node in rnd.index:
                values, problem = read_masked(reply, strategy.layout.size + sa.EXTRA_SLOTS)
            if values is None:
                rejected[site] = problem or "a reply from a node outside the round"
                log.warning("round %d: rejected the masked reply of site %s: %s", r, site, rejected[site])
                continue
            masked[rnd.index[node]] = values
            metrics = site_metrics(reply.content)
            sites.append(SiteReply(node, site, metrics, sa.content_bytes(reply.content),
                                   declined=declined_reason(metrics) if declined(reply.content) else None,
                                   payload=payload_sha256(reply.content[keys.ARRAYS])))
        return sites, masked, rejected

    def _apply(self, strategy: Any, r: int, mean: np.ndarray, weight: int, report: RoundReport,
               replies: Iterable[Message]) -> ArrayRecord | None:
        """The strategy's step from the unmasked mean; None (adapters unchanged) when it must not apply."""
        if weight == 0:
            log.warning("round %d: every site declined; the global adapters stay unchanged", r)
            return None
        if strategy._reference is None:
            report.not_applied = "secure aggregation needs the round's global adapters; global adapters unchanged"
            return None
        target = strategy._reference + mean
        strategy._current_round = r  # FedAdam/FedYogi's bias correction reads the round
        state = strategy._snapshot()
        if strategy.plain_mean:
            out = strategy.layout.split(target)
        else:
            source = next(iter(replies)).metadata
            out = strategy._aggregate_updates([Update("secure-aggregate", target, float(weight), source=source)], [1.0])
        problem = next((p for p in (out_of_range(v, strategy.guard.limits.max_abs_value) for v in out.values()) if p),
                       None)
        if problem:
            strategy._restore(state)
            report.not_applied = f"the round's aggregate {problem}; global adapters unchanged"
            return None
        arrays = unflatten(out, strategy.schema)
        report.arrays, report.aggregated = arrays, True
        return arrays

    @staticmethod
    def _report(strategy: Any, report: RoundReport, r: int, sites: list[SiteReply], rejected: dict[str, str],
                stats: dict[str, float]) -> None:
        """Who answered, who not, and the clear metrics (each site's counted once: its weight is masked)."""
        summed = [s for s in sites if not s.declined]
        report.rejected.update(rejected)
        report.declined.update({s.site: s.declined for s in sites if s.declined})
        report.answered = sorted(s.site for s in summed)
        report.payload_sha256 = {s.site: s.payload for s in summed if s.payload and report.aggregated}
        record_site_metrics(report, sites, strategy.listener, r, unweighted=True)
        report.train_metrics.update(stats)
        if report.not_applied:
            log.warning("round %d: update not applied: %s", r, report.not_applied)
        known = set(strategy.identities.bound.values()) | set(strategy._site_names(strategy._sampled))
        report.missing = sorted(known - set(report.answered) - set(report.declined))
        strategy.last_update_count = len(summed)
        strategy._round = report
