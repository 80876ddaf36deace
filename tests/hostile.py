"""Hostile replies, in one process, through the real screening and strategy code.

Adapters travel as one flat array per message (``nearl_protocol.flat``); the cases forge
that array (length, dtype, shape, bytes, values) or the record around it (an extra array,
no array, the per-tensor format).  Each case is one site's round-2 reply, sent next to five honest sites' replies (round 1:
every site honest, so the strategies have a history and the hostile site an example cap).
:func:`run_case` runs the round with the hostile reply and, on a second strategy of the
same kind, the reference round: the honest replies only (a rejected case), or the honest
replies plus the hostile update claiming exactly its cap (a clipped claim).  Used by
``tests/test_hostile_replies.py`` and ``bench/hostile_table.py`` (the table in docs/security.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from server.strategy import STRATEGIES, make_strategy
from tests.fed_helpers import FakeGrid, RoundRecorder, reply_from, train_reply_content

SCHEMA = {"a.weight": ((3, 4), "float32"), "b.bias": ((5,), "float32")}
HONEST = {1: ("site1", 10), 2: ("site2", 20), 3: ("site3", 30), 4: ("site4", 40), 5: ("site5", 50)}
HOSTILE_NODE, HOSTILE, HOSTILE_EXAMPLES = 6, "intruder", 20  # its round-1 count: round-2 cap 20 x 2 = 40
CAP = HOSTILE_EXAMPLES * 2.0
NAMES = list(STRATEGIES)

Values = dict[str, np.ndarray]


def delta(node: int, round_: int) -> Values:
    """A small, site-specific step; the norms of the honest steps differ by at most 1.5x."""
    rng = np.random.default_rng(100 * round_ + node)
    return {k: (0.01 * (1 + 0.1 * node) * rng.standard_normal(shape)).astype(dtype)
            for k, (shape, dtype) in SCHEMA.items()}


def plus(base: Values, step: Values, scale: float = 1.0) -> Values:
    return {k: (base[k].astype(np.float64) + scale * step[k]).astype(SCHEMA[k][1]) for k in SCHEMA}


def forged(value: np.ndarray, like: np.ndarray) -> Array:
    """Metadata copied from ``like`` (the right layout), bytes of ``value`` (another layout)."""
    arr = Array(value)
    return Array(dtype=str(like.dtype), shape=tuple(like.shape), stype=arr.stype, data=arr.data)


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Values], RecordDict]  # the hostile reply's content from its honest update
    expect: str  # a phrase of the reject reason, or "clipped"
    node: int = HOSTILE_NODE
    claims: str = HOSTILE  # the name the reply claims

    @property
    def clipped(self) -> bool:
        return self.expect == "clipped"


def _content(values: Values, n: float = 20, site: str = HOSTILE) -> RecordDict:
    return train_reply_content(site, values, n=n)


def _with(values: Values, key: str, value: np.ndarray) -> Values:
    return {**values, key: value}


def _poisoned(values: Values, bad: float) -> Values:
    a = values["a.weight"].copy()
    a[1, 2] = bad
    return _with(values, "a.weight", a)


def _flat(values: Values) -> np.ndarray:
    return np.concatenate([values[k].reshape(-1) for k in SCHEMA])


def _record(values: Values, record: ArrayRecord) -> RecordDict:
    """The reply of ``values`` with its ``arrays`` record replaced."""
    content = _content(values)
    content["arrays"] = record
    return content


def _one_array(values: Values, arr: Array, **extra: Array) -> RecordDict:
    return _record(values, ArrayRecord({"adapters": arr, **extra}))


CASES = [
    Case("extra array", lambda v: _one_array(v, Array(_flat(v)), **{"clip.visual.proj": Array(np.zeros(3, np.float32))}),
         "unexpected"),
    Case("missing array", lambda v: _record(v, ArrayRecord()), "missing"),
    Case("per-tensor arrays", lambda v: _record(v, ArrayRecord({k: Array(x) for k, x in v.items()})), "missing"),
    Case("a tensor too many", lambda v: _content({**v, "clip.visual.proj": np.zeros(3, np.float32)}),
         "holds 20 values"),
    Case("a tensor too few", lambda v: _content({"a.weight": v["a.weight"]}), "holds 12 values"),
    Case("NaN value", lambda v: _content(_poisoned(v, math.nan)), "NaN or Inf"),
    Case("Inf value", lambda v: _content(_poisoned(v, math.inf)), "NaN or Inf"),
    Case("wrong shape", lambda v: _one_array(v, Array(_flat(v).reshape(1, -1))), "shape"),
    Case("wrong dtype", lambda v: _one_array(v, Array(_flat(v).astype(np.float64))), "dtype"),
    Case("metadata vs bytes", lambda v: _one_array(v, forged(_flat(v).astype(np.float64), _flat(v))), "metadata says"),
    Case("10x tensors", lambda v: _content(v), "outlier-factor"),  # scaled in run_case
    Case("num-examples -5", lambda v: _content(v, n=-5), "num-examples"),
    Case("num-examples 0", lambda v: _content(v, n=0), "num-examples"),
    Case("num-examples NaN", lambda v: _content(v, n=math.nan), "num-examples"),
    Case("num-examples inf", lambda v: _content(v, n=math.inf), "num-examples"),
    Case("num-examples 1e9", lambda v: _content(v, n=1e9), "clipped"),
    Case("num-examples 1e308", lambda v: _content(v, n=1e308), "clipped"),
    Case("3e38 values", lambda v: _content({k: np.full_like(x, 3e38) for k, x in v.items()}), "max-abs-value"),
    Case("name of another site", lambda v: _content(v, site="site1"), "duplicate site name", node=7,
         claims="site1"),
]
BY_NAME = {c.name: c for c in CASES}


def initial() -> Values:
    return {k: np.zeros(shape, dtype) for k, (shape, dtype) in SCHEMA.items()}


def play(strategy, server_round: int, global_: Values, replies: list, nodes: list[int]) -> Values:
    """One round through configure_train, aggregate_train and evaluate; the new global adapters."""
    arrays = ArrayRecord({k: Array(v) for k, v in global_.items()})
    list(strategy.configure_train(server_round, arrays, ConfigRecord(), FakeGrid(nodes)))
    agg, _ = strategy.aggregate_train(server_round, replies)
    list(strategy.configure_evaluate(server_round, agg or arrays, ConfigRecord(), FakeGrid(nodes)))
    strategy.aggregate_evaluate(server_round, [])
    return {k: agg[k].numpy() for k in SCHEMA} if agg is not None else global_


def honest_replies(global_: Values, round_: int) -> list:
    return [reply_from(node, _content(plus(global_, delta(node, round_)), n=n, site=site))
            for node, (site, n) in HONEST.items()]


def federation(name: str, **options):
    """A strategy after round 1 (all six sites honest), with its recorder and global adapters."""
    rec = RoundRecorder()
    strategy = make_strategy(name, schema=SCHEMA, min_nodes=1, listener=rec, total_rounds=3, options=options)
    g0 = initial()
    replies = honest_replies(g0, 1)
    replies.append(reply_from(HOSTILE_NODE, _content(plus(g0, delta(HOSTILE_NODE, 1)), n=HOSTILE_EXAMPLES)))
    g1 = play(strategy, 1, g0, replies, [*HONEST, HOSTILE_NODE])
    return strategy, rec, g1


def hostile_update(case: Case, g1: Values) -> Values:
    if case.name == "10x tensors":  # ten times the largest honest step
        return plus(g1, delta(5, 2), scale=10.0)
    return plus(g1, delta(HOSTILE_NODE, 2))


@dataclass
class Result:
    case: Case
    strategy: str
    got: Values
    reference: Values
    report: object  # RoundReport of round 2

    @property
    def label(self) -> str:
        return HOSTILE if self.case.node == HOSTILE_NODE else f"{self.case.claims}@node-{self.case.node}"

    def outcome(self) -> tuple[str, str]:
        """(what happened, the reason as reported)."""
        if self.label in self.report.rejected:
            return "rejected", short_reason(self.report.rejected[self.label])
        cap = self.report.per_site.get(self.label, {}).get("examples_cap")
        if cap is not None:
            return f"clipped to {cap:g}", f"claim clipped to the site's cap {cap:g} (first count x examples-growth)"
        return "accepted", ""


def short_reason(reason: str) -> str:
    return reason.split(";")[0].replace("|", "/")[:130]


def run_case(case: Case, name: str) -> Result:
    strategy, rec, g1 = federation(name)
    ref_strategy, _, ref_g1 = federation(name)
    assert all(np.array_equal(g1[k], ref_g1[k]) for k in SCHEMA)
    nodes = [*HONEST, case.node]
    update = hostile_update(case, g1)
    got = play(strategy, 2, g1, [*honest_replies(g1, 2), reply_from(case.node, case.build(update))], nodes)
    reference_replies = honest_replies(g1, 2)
    if case.clipped:
        reference_replies.append(reply_from(HOSTILE_NODE, _content(update, n=CAP)))
    reference = play(ref_strategy, 2, g1, reference_replies, nodes)
    return Result(case, name, got, reference, rec.rounds[-1])


def table(results: list[Result]) -> str:
    """Markdown: one row per case; the outcome under each strategy (= the aggregate matched the reference)."""
    by = {(r.case.name, r.strategy): r.outcome() for r in results}
    rows = ["| hostile reply | reason reported | " + " | ".join(NAMES) + " |", "|---|---|" + "---|" * len(NAMES)]
    for case in CASES:
        reasons = {by[(case.name, n)][1] for n in NAMES}
        reason = reasons.pop() if len(reasons) == 1 else "differs by strategy"
        rows.append(f"| {case.name} | {reason} | " + " | ".join(by[(case.name, n)][0] for n in NAMES) + " |")
    return "\n".join(rows)
