"""What one site can do to a round, bounded: value range, update norm, example claims, crashes.

Screening (:mod:`server.screening`) decides whether a reply is well formed.  A well-formed
update can still be hostile or broken; :class:`RoundGuard` runs after screening, on the
decoded values of every accepted update (one flat vector each), and decides what each update may do:

* **range**: an update with any value beyond ``max-abs-value`` is rejected.  Adapter
  weights start near 0 or 1 (zero-initialised projections, LayerNorm gains, 1/sqrt(width)
  tokens) and move by about the learning rate (<= 3e-3) per step, so real values stay far
  below 100; the default 1e4 leaves two orders of magnitude of headroom, keeps squared
  norms and sums of many sites far from float32 overflow, and keeps the global adapters
  representable in fp16 transport (largest finite value 65504).
* **norm outliers**: with ``outlier-factor`` f > 0 and at least 3 updates, an update whose
  L2 distance to the current global adapters exceeds f x the median distance is rejected.
* **example claims**: ``num-examples`` weights the mean.  A claim is capped at the site's
  count at its first accepted round x ``examples-growth`` and at ``max-examples``; every
  clipped claim is logged and reported per site (``examples_clipped``, ``examples_cap``).
  The first counts are the guard's state and travel in checkpoints (:meth:`ExampleCaps.state`).
  With ``equal-weights`` every update weighs 1 and the claims only feed the metrics.
* **fencing**: an exception while aggregating does not end the run.  Each update is then
  aggregated alone; those that fail alone are rejected with the exception as the reason,
  and the round is aggregated again without them.
* **the aggregate**: a result that is not finite or exceeds ``max-abs-value`` is not
  applied: the global adapters stay unchanged and the reason is reported for the round.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from server.settings import default

log = logging.getLogger("nearl.robust")

CAPS_STATE = "example_caps"  # strategy_state() key of the first accepted example counts
CHUNK = 1 << 15  # values per block of a distance: the block's float64 difference stays in the CPU cache


@dataclass(frozen=True)
class Limits:
    """The guard's limits; the defaults are the federation's (server/settings.py)."""

    max_abs_value: float = default("max_abs_value")
    examples_growth: float = default("examples_growth")
    max_examples: float = default("max_examples")
    equal_weights: bool = default("equal_weights")
    outlier_factor: float = default("outlier_factor")

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> "Limits":
        """From strategy options (run-config keys); a missing key takes its federation default."""
        def get(name: str) -> Any:
            return options.get(name.replace("_", "-"), default(name))
        return cls(max_abs_value=float(get("max_abs_value")), examples_growth=float(get("examples_growth")),
                   max_examples=float(get("max_examples")), equal_weights=bool(get("equal_weights")),
                   outlier_factor=float(get("outlier_factor")))


class ExampleCaps:
    """site -> its example count at its first accepted round; the cap of every later claim."""

    def __init__(self, growth: float, maximum: float):
        self.growth, self.maximum = float(growth), float(maximum)
        self.first: dict[str, float] = {}

    def cap(self, site: str) -> float:
        first = self.first.get(site)
        return self.maximum if first is None else min(self.maximum, first * self.growth)

    def clip(self, site: str, claimed: float) -> tuple[float, float | None]:
        """(the count used, the cap when the claim was clipped else None)."""
        cap = self.cap(site)
        return (cap, cap) if claimed > cap else (claimed, None)

    def accepted(self, site: str, used: float) -> None:
        self.first.setdefault(site, float(used))

    def state(self) -> dict[str, np.ndarray]:
        return {site: np.array([n], dtype=np.float64) for site, n in sorted(self.first.items())}

    def load(self, state: Mapping[str, np.ndarray]) -> None:
        self.first = {site: float(np.asarray(v).reshape(-1)[0]) for site, v in state.items()}


@dataclass(frozen=True)
class UpdateFacts:
    """What the guard needs of one update alone: known as soon as the update arrives.

    The strategy computes them while the round still waits for slower sites
    (:meth:`RoundGuard.facts`), so that the guard has less left to do once the last one is in.
    """

    range_problem: str | None  # why the values are out of range, else None
    distance: float | None  # to the round's global adapters; None when not needed or not in range


@dataclass
class Update:
    """One screened update: the site, its values (flat, the schema's order; float32 as received, widened to
    float64 by every computation that sums or compares them) and its example claim."""

    site: str
    values: np.ndarray
    claimed: float
    used: float = 0.0
    cap: float | None = None  # set when the claim was clipped
    source: Any = None  # the reply's metadata
    facts: UpdateFacts | None = None  # computed on arrival; None: the guard computes them


@dataclass
class Outcome:
    arrays: dict[str, np.ndarray] | None  # float64, by tensor name; None = nothing to apply
    rejected: dict[str, str] = field(default_factory=dict)  # site -> reason
    not_applied: str = ""  # why the round's aggregate was not applied
    count: int = 0  # updates in the applied aggregate


def out_of_range(values: np.ndarray, bound: float) -> str | None:
    """Why ``values`` exceed ``bound`` (or are not finite), or None.  max |x| as max(max x, -min x):
    two reductions without a temporary array; NaN propagates through both."""
    high, low = (float(values.max()), float(values.min())) if values.size else (0.0, 0.0)
    if not (math.isfinite(high) and math.isfinite(low)):
        return "holds NaN or Inf values"
    peak = max(high, -low)
    if peak > bound:
        return f"holds values up to {peak:.3g}, beyond max-abs-value {bound:g}"
    return None


def norm_outliers(updates: Sequence[Update], reference: np.ndarray | None, factor: float) -> dict[str, str]:
    """site -> reason for each update whose distance to ``reference`` exceeds factor x the median.

    A distance already in an update's facts is used as it is (it is the same number: each
    distance sums its own blocks in block order); the others are computed together.
    """
    if factor <= 0 or len(updates) < 3 or reference is None:
        return {}
    known = {i: u.facts.distance for i, u in enumerate(updates) if u.facts is not None and u.facts.distance is not None}
    todo = [i for i in range(len(updates)) if i not in known]
    known.update(zip(todo, distances([updates[i].values for i in todo], reference)))
    norms = np.array([known[i] for i in range(len(updates))])
    median = float(np.median(norms))
    out = {}
    for u, n in zip(updates, norms):
        if n > factor * median:
            ratio = f"{n / median:.1f}x" if median > 0 else "infinitely far from"
            out[u.site] = (f"update is {n:.3g} from the global adapters, {ratio} the median distance {median:.3g} "
                           f"of this round's updates (outlier-factor {factor:g}); check the site's data and "
                           f"learning rate, or raise outlier-factor (0 disables the check)")
    return out


def distances(values: Sequence[np.ndarray], reference: np.ndarray) -> list[float]:
    """||v - reference|| in float64 for every v (widened exactly), block by block.

    One block of the reference stays in the CPU cache while every update's block is
    compared with it, so the reference is read from memory once, not once per update.
    Each distance adds its blocks' sums in block order.  The sums of squares are numpy's
    own (``einsum``), not BLAS: a multi-threaded BLAS dot product splits the sum by thread
    count (the distance depended on the machine in its last bits) and, on a loaded
    coordinator, took up to 10 ms per update waiting for its threads.
    """
    size = reference.shape[0]
    totals = [0.0] * len(values)
    scratch = np.empty(min(size, CHUNK), np.float64)
    for lo in range(0, size, CHUNK):
        hi = min(size, lo + CHUNK)
        block, ref = scratch[:hi - lo], reference[lo:hi]
        for i, v in enumerate(values):
            np.copyto(block, v[lo:hi])
            np.subtract(block, ref, out=block)
            totals[i] += float(np.einsum("i,i->", block, block))
    return [math.sqrt(t) for t in totals]


class RoundGuard:
    """Applies :class:`Limits` to one round's screened updates; see the module docstring."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.caps = ExampleCaps(limits.examples_growth, limits.max_examples)
        self.equal = limits.equal_weights

    def run(self, r: int, updates: list[Update], reference: np.ndarray | None,
            aggregate: Callable[[list[Update], list[float]], dict[str, np.ndarray]],
            snapshot: Callable[[], Any], restore: Callable[[Any], None], *, equal_weights: bool = False) -> Outcome:
        """``aggregate(updates, weights)`` -> float64 tensors; ``snapshot``/``restore`` the strategy's state.

        ``equal_weights`` (server-side DP) weighs every update 1 whatever ``equal-weights`` says.
        """
        lim = self.limits
        self.equal = equal_weights or lim.equal_weights
        rejected: dict[str, str] = {}
        for u in updates:
            problem = u.facts.range_problem if u.facts is not None else out_of_range(u.values, lim.max_abs_value)
            if problem:
                rejected[u.site] = f"update {problem}; the site's training diverged or the update is forged"
        kept = [u for u in updates if u.site not in rejected]
        rejected.update(norm_outliers(kept, reference, lim.outlier_factor))
        kept = [u for u in kept if u.site not in rejected]
        for u in kept:
            u.used, u.cap = self.caps.clip(u.site, u.claimed)
            if u.cap is not None:
                log.warning("round %d: site %s claims %g training examples, clipped to %g (its first accepted "
                            "count x examples-growth %g, at most max-examples %g)", r, u.site, u.claimed, u.cap,
                            lim.examples_growth, lim.max_examples)
        if not kept:
            return Outcome(None, rejected)
        state = snapshot()
        arrays, failed, error = self._fenced(kept, aggregate, state, restore)
        rejected.update(failed)
        kept = [u for u in kept if u.site not in failed]
        if arrays is None:
            restore(state)
            why = f"aggregation failed ({error}); global adapters unchanged" if kept else ""
            return Outcome(None, rejected, why)
        peaks = [out_of_range(v, lim.max_abs_value) for v in arrays.values()]
        problem = next((p for p in peaks if p), None)
        if problem:
            restore(state)
            return Outcome(None, rejected, f"the round's aggregate {problem}; global adapters unchanged "
                                              f"(check the strategy's server-lr, or the sites' updates)")
        for u in kept:
            self.caps.accepted(u.site, u.used)
        return Outcome(arrays, rejected, count=len(kept))

    def facts(self, values: np.ndarray, reference: np.ndarray | None) -> UpdateFacts:
        """One update's range verdict and distance to ``reference``, as :meth:`run` would find them."""
        problem = out_of_range(values, self.limits.max_abs_value)
        needed = problem is None and reference is not None and self.limits.outlier_factor > 0
        return UpdateFacts(problem, distances([values], reference)[0] if needed else None)

    def weights(self, updates: Sequence[Update]) -> list[float]:
        return [1.0 if self.equal else u.used for u in updates]

    def _fenced(self, kept: list[Update], aggregate, state, restore
                ) -> tuple[dict[str, np.ndarray] | None, dict[str, str], str]:
        """Aggregate; on an exception find the updates that fail alone, drop them and aggregate the rest.

        Returns (tensors or None, site -> reason for the updates that failed alone, the error
        that no single update explains or "").
        """
        try:
            return aggregate(kept, self.weights(kept)), {}, ""
        except Exception as err:  # noqa: BLE001 - any failure of one update must not end the run
            del err  # which update causes it is found below, one at a time
        failed: dict[str, str] = {}
        for u in kept:
            restore(state)
            try:
                aggregate([u], self.weights([u]))
            except Exception as err:  # noqa: BLE001
                failed[u.site] = f"aggregation failed on this update ({_one_line(err)}); the round went on without it"
        rest = [u for u in kept if u.site not in failed]
        restore(state)
        if not rest:
            return None, failed, ""
        try:
            return aggregate(rest, self.weights(rest)), failed, ""
        except Exception as err:  # noqa: BLE001
            return None, failed, _one_line(err)


def _one_line(err: BaseException) -> str:
    text = str(err).splitlines()[0][:300] if str(err) else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
