"""Optional client-level differential privacy at the server (central DP with fixed clipping).

This is a *different guarantee* from the sites' DP-SGD (docs/privacy.md):

* sites' DP-SGD (``privacy.*``): sample-level. Whatever leaves a site hides whether any one
  *image* was in its training set; each site holds its own ledger and budget, and it
  needs no trust in the coordinator.
* server-side DP (``server-dp-*``): client-level. The released global adapters hide
  whether any one *site* took part in a round. Every accepted update is clipped to an
  L2 norm ``C`` around the current global adapters, the clipped updates are averaged
  with equal weights, and Gaussian noise of std ``z * C / n`` is added to the mean of the
  ``n`` updates. The coordinator sees the raw updates, so this protects against the
  people who use the model, not against the coordinator.

It is built on Flower's ``DifferentialPrivacyServerSideFixedClipping`` (its clipping and
noise), with three changes so that it composes with NEARL's strategy: replies are
screened first (an error, a declined round or a malformed update is left out instead of
cancelling the round), ``n`` is the number of updates actually averaged (a site that
drops out cannot leave the mean under-noised), and the noisy arrays are what the round
report, the checkpoint and the final adapters hold.  Epsilon is accounted with Opacus'
RDP accountant without subsampling amplification (every round counts as a full release),
which over-states it when only a fraction of the sites is sampled.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping
from flwr.supercore.differential_privacy import compute_clip_model_update

from nearl_core.privacy import epsilon_of
from nearl_protocol.arrays import decode_array
from server.screening import UNIT_WEIGHT_KEY, declined
from server.strategy import NearlStrategyMixin

log = logging.getLogger("nearl.central_dp")
MEAN_STRATEGIES = ("fedavg", "fedprox")  # noise on a plain mean of clipped updates; the analysis needs that


class NearlServerSideDP(DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed-clipping wrapper around a NEARL strategy (see the module docstring)."""

    def __init__(self, strategy: NearlStrategyMixin, *, noise_multiplier: float, clipping_norm: float,
                 delta: float, releases_so_far: int = 0):
        super().__init__(strategy, noise_multiplier, clipping_norm, num_sampled_clients=max(1, strategy.min_nodes))
        strategy.weighted_by_key = UNIT_WEIGHT_KEY  # equal weights: one site moves the mean by at most C / n
        self.delta = float(delta)
        self.releases = int(releases_so_far)  # noisy aggregates released so far (a resume continues the count)

    @property
    def epsilon(self) -> float:
        """Client-level epsilon after every release so far, at ``delta`` (no amplification assumed)."""
        return epsilon_of([(self.noise_multiplier, 1.0, self.releases)], self.delta)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        inner: NearlStrategyMixin = self.strategy  # type: ignore[assignment]
        replies = list(replies)
        inner.receive_replies(replies)  # each update read once, as float32 whatever the transport dtype
        clipped = [r for r in replies if self._is_update(r, inner)]
        for reply in clipped:
            self._clip(reply, inner)
        # the NEARL strategy screens, logs and averages (equal weights) what it accepts
        arrays, metrics = inner.aggregate_train(server_round, replies)
        if arrays is None:
            return None, metrics
        n = inner.last_update_count  # the updates actually averaged (the guard may have rejected some)
        self.num_sampled_clients = n
        noisy = inner.as_schema_dtype(self._add_noise_to_aggregated_arrays(arrays))
        self.releases += 1
        extra = {"server_dp_epsilon": self.epsilon, "server_dp_noise_std":
                 self.noise_multiplier * self.clipping_norm / n, "server_dp_updates": float(n)}
        inner.replace_round_arrays(noisy, extra)
        log.info("round %d: %d updates clipped to %.4g, noise std %.4g added; client-level epsilon %.3f at delta %g",
                 inner.global_round(server_round), n, self.clipping_norm, extra["server_dp_noise_std"],
                 extra["server_dp_epsilon"], self.delta)
        return noisy, MetricRecord({**(metrics or {}), **extra})

    @staticmethod
    def _is_update(reply: Message, inner: NearlStrategyMixin) -> bool:
        if reply.has_error() or not reply.has_content():
            return False
        if declined(reply.content):
            return False
        return inner.update_values(reply) is not None

    def _clip(self, reply: Message, inner: NearlStrategyMixin) -> None:
        """Clip this reply's update (reply - current global) to the L2 norm C, tensor by tensor as Flower
        does; the strategy aggregates the clipped values; the reply is marked unit-weight.

        The reply's bytes stay as received, so its payload hash is still the one its site recorded.
        """
        names = list(inner.schema)
        tensors = inner.layout.split(inner.update_values(reply))
        values = [tensors[k] for k in names]
        current = [decode_array(self.current_arrays[k]) for k in names]
        update_norm = float(np.sqrt(sum(float(np.square(v.astype(np.float64) - c).sum()) for v, c in zip(values, current))))
        if update_norm > self.clipping_norm:  # (Flower's helper divides by the norm: a zero update would crash it)
            compute_clip_model_update(values, current, self.clipping_norm)  # replaces the list's entries
            inner.replace_update(reply, np.concatenate([np.asarray(v, np.float32).reshape(-1) for v in values]))
        next(iter(reply.content.metric_records.values()))[UNIT_WEIGHT_KEY] = 1.0


def check_central_dp(strategy: str, noise_multiplier: float, clipping_norm: float, delta: float) -> str | None:
    """Why these server-side DP settings cannot run, or None."""
    if noise_multiplier <= 0 and clipping_norm <= 0:
        return None
    if noise_multiplier <= 0 or clipping_norm <= 0:
        return "server-side DP needs both server-dp-noise (> 0) and server-dp-clip (> 0)"
    if strategy not in MEAN_STRATEGIES:
        return (f"server-side DP adds noise to a plain mean of clipped updates; strategy {strategy} is not one "
                f"(use {' or '.join(MEAN_STRATEGIES)})")
    if not 0 < delta < 1:
        return "server-dp-delta must be in (0, 1)"
    return None
