"""The messages of a round, one builder and one reader each.

Server -> site: a train or evaluate *instruction*: the global adapters (``arrays``: one
flat array, :mod:`nearl_protocol.flat`) and a ``config`` record built by
:func:`instruction_config` (Flower's strategies add ``server-round`` and, for FedProx,
``proximal-mu``; NEARL's adds ``adapter-layout``), read at the site by
:func:`read_instruction` and :func:`instruction_adapters`.

Site -> server: a *reply* built by :func:`build_reply` (``metrics``, ``site`` and, for
a train reply, ``arrays``: the site's adapters as one flat array) or, when the site
refuses the instruction, an error reply from :func:`refusal`; the server reads either
with :func:`read_reply`.  Which site a reply belongs to is decided by the server from
the node that sent it; the ``site`` record is only a claim.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from nearl_protocol import keys
from nearl_protocol.arrays import PayloadError
from nearl_protocol.flat import FlatLayout

REFUSAL_CODE = 4001  # an error reply the site chose to send (its reason is one readable line)


class ProtocolError(ValueError):
    """A message does not follow the contract (e.g. a server of another version)."""


@dataclass(frozen=True)
class Instruction:
    nearl_config: dict[str, Any]
    server_round: int = 0
    local_epochs: int = 1
    total_rounds: int = 1
    transport: str = "float32"
    evaluate_first: bool = False
    proximal_mu: float = 0.0
    backbone: str = ""  # the coordinator's backbone fingerprint ("" = not checked)
    node_refused: str = ""  # why the coordinator refuses this node's replies ("" = it does not)
    adapter_layout: str = ""  # digest of the layout the coordinator packed the adapters with ("" = not stated)
    final_evaluation: bool = False  # evaluate: the federation's kept adapters (test split, personalization)


def instruction_config(*, nearl_config: Mapping[str, Any], transport: str, backbone: str,
                       local_epochs: int | None = None, total_rounds: int | None = None) -> ConfigRecord:
    """The ``config`` record the ServerApp hands to its strategy for every train/evaluate instruction."""
    values: dict[str, Any] = {keys.NEARL_CONFIG: json.dumps(dict(nearl_config)), keys.TRANSPORT: transport,
                              keys.BACKBONE: backbone}
    if local_epochs is not None:
        values[keys.LOCAL_EPOCHS] = int(local_epochs)
    if total_rounds is not None:
        values[keys.TOTAL_ROUNDS] = int(total_rounds)
    return ConfigRecord(values)


def read_instruction(msg: Message) -> Instruction:
    config = msg.content.config_records.get(keys.CONFIG)
    raw = config.get(keys.NEARL_CONFIG) if config is not None else None
    if not isinstance(raw, str):
        raise ProtocolError("the server sent no NEARL config; server and client versions do not match")
    try:
        nearl_config = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ProtocolError(f"the server's NEARL config is not JSON ({err})") from None
    server_round, total_rounds = int(config.get(keys.SERVER_ROUND, 0)), int(config.get(keys.TOTAL_ROUNDS, 1))
    return Instruction(
        nearl_config=nearl_config, server_round=server_round,
        local_epochs=int(config.get(keys.LOCAL_EPOCHS, 1)), total_rounds=total_rounds,
        transport=str(config.get(keys.TRANSPORT, "float32")), evaluate_first=bool(config.get(keys.EVALUATE_FIRST, False)),
        proximal_mu=float(config.get(keys.PROXIMAL_MU, 0.0)), backbone=str(config.get(keys.BACKBONE, "")),
        node_refused=str(config.get(keys.NODE_REFUSED, "")), adapter_layout=str(config.get(keys.ADAPTER_LAYOUT, "")),
        # a coordinator that does not say (an older one) meant its last round's evaluation
        final_evaluation=bool(config.get(keys.FINAL_EVALUATION, server_round >= total_rounds)))


def adapter_record(flat: np.ndarray) -> ArrayRecord:
    """The ``arrays`` record of a message: the adapters as one flat array (:meth:`FlatLayout.pack`)."""
    return ArrayRecord({keys.ADAPTERS: Array(np.ascontiguousarray(flat))})


def instruction_adapters(msg: Message, layout: FlatLayout) -> np.ndarray | None:
    """The global adapters of an instruction as one flat array in the wire dtype (read-only), or None.

    ``layout`` is the receiving site's own (wire) layout.  An instruction packed with another
    layout, one that differs only in the order of the tensors included, is refused: its values
    would land in the wrong tensors.
    """
    rec = msg.content.array_records.get(keys.ARRAYS)
    if rec is None:
        return None
    config = msg.content.config_records.get(keys.CONFIG)
    stated = str(config.get(keys.ADAPTER_LAYOUT, "")) if config is not None else ""
    if stated and stated != layout.digest:
        raise PayloadError(f"adapter layout mismatch: the coordinator packed layout {stated}, this site's adapters "
                           f"have layout {layout.digest}; install the same NEARL version on both sides")
    return layout.read(rec)


def build_reply(msg: Message, *, site: str, metrics: Mapping[str, float],
                adapters: np.ndarray | None = None) -> Message:
    """A reply to ``msg``: scalar metrics, the site's name and (train replies) the flat adapter array."""
    records: dict[str, Any] = {keys.METRICS: MetricRecord(dict(metrics)),
                               keys.SITE: ConfigRecord({keys.SITE_NAME: site})}
    if adapters is not None:
        records[keys.ARRAYS] = adapter_record(adapters)
    return Message(content=RecordDict(records), reply_to=msg)


def refusal(msg: Message, reason: str, *, site: str) -> Message:
    """An error reply: the site refuses the instruction and says why in one line; nothing else leaves.

    The reason travels as ``<site>: <reason>`` (an error reply has no records to carry the name).
    """
    return Message(error=Error(code=REFUSAL_CODE, reason=f"{site}: {reason.splitlines()[0][:500]}"), reply_to=msg)


@dataclass
class Reply:
    """What a reply says, as read by the server (the site name is the reply's claim, not its identity)."""

    claimed_site: str | None
    metrics: dict[str, float] = field(default_factory=dict)
    arrays: ArrayRecord | None = None
    error: str | None = None


def read_reply(msg: Message) -> Reply:
    if msg.has_error():
        reason = (msg.error.reason or "").strip()
        line = reason.splitlines()[-1][:600] if reason else f"error code {msg.error.code}"
        if msg.error.code == REFUSAL_CODE:
            site, _, why = line.partition(": ")
            return Reply(site or None, error=why)
        return Reply(None, error=f"site error: {line[:300]}")
    if not msg.has_content():
        return Reply(None, error="empty reply")
    content = msg.content
    site_rec = content.config_records.get(keys.SITE)
    name = site_rec.get(keys.SITE_NAME) if site_rec is not None else None
    return Reply(name if isinstance(name, str) and name else None, metrics_of(content),
                 content.array_records.get(keys.ARRAYS))


def metrics_of(content: RecordDict) -> dict[str, float]:
    """Every numeric metric of a reply, by wire key."""
    rec = next(iter(content.metric_records.values()), None)
    if rec is None:
        return {}
    return {k: float(v) for k, v in rec.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def record_bytes(content: RecordDict) -> int:
    """Serialized payload size of a message's records (array bytes dominate).

    A ConfigRecord is counted here as Flower counts it (key length + value bytes, 8 per
    number, 1 per bool), because Flower's own count fails on an empty string, bytes or
    list, which a secure-aggregation record can hold (an unsigned round's signature).
    """
    total = 0
    for rec in content.values():
        if not isinstance(rec, ConfigRecord):
            total += rec.count_bytes()
            continue
        for k, v in rec.items():
            items = v if isinstance(v, list) else [v]
            total += len(k) + sum(len(x) if isinstance(x, (bytes, str)) else 1 if isinstance(x, bool) else 8
                                  for x in items)
    return int(total)
