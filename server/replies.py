"""How the strategy reads replies: the flat wire format, attribution, screening.

:class:`ReplyScreening` is mixed into :class:`server.strategy.NearlStrategyMixin`.  Adapters
cross the network as one flat array per message (:mod:`nearl_protocol.flat`) in the
transport dtype: :meth:`ReplyScreening._to_wire` packs the global adapters of every
instruction, :meth:`ReplyScreening.receive_replies` reads every reply once
(:func:`server.screening.read_update`: the record, the array's metadata against its bytes,
dtype and length against the agreed layout, widened to float32, finiteness checked once,
a positive example count) and keeps the update as one float32 vector for the guard and
the aggregation.  Every reply is attributed by the node that sent it
(:class:`server.screening.SiteIdentities`); a refused node is told why in its next
instruction.  The payload hash (what the site's audit trail records) is taken of the
bytes as received, on worker threads while the main thread screens (hashlib and numpy
both release the GIL).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict

from nearl_core.transport import encode
from nearl_protocol import keys
from nearl_protocol.arrays import decode_array, payload_sha256
from nearl_protocol.messages import adapter_record, read_reply, record_bytes
from server.robust import UpdateFacts
from server.rounds import SiteReply
from server.screening import UNIT_WEIGHT_KEY, check_metrics, declined, declined_reason, read_update, site_metrics

log = logging.getLogger("nearl.strategy")
HASH_THREADS = max(1, min(4, (os.cpu_count() or 1) - 1))


@dataclass
class Received:
    """One reply as it came in: its size on the wire, its update or why it has none, its payload hash."""

    reply: Message  # held, so that no other message can take its id() while this entry exists
    nbytes: int
    values: np.ndarray | None  # float32, the schema's order; None when the reply must not be aggregated
    problem: str | None  # why (screening's reason); None when ``values`` is set
    digest: Future | None = None  # sha256 of the adapter bytes as received
    facts: UpdateFacts | None = None  # the guard's per-update facts, when read on arrival


class ReplyScreening:
    """Reply handling of the NEARL strategy (state set by ``NearlStrategyMixin._nearl_setup``)."""

    def _tell_refused_nodes(self, messages: list[Message]) -> None:
        """A node whose replies are refused (e.g. a duplicate site name) is told why in its instruction."""
        for m in messages:
            why = self.identities.refused.get(m.metadata.dst_node_id)
            if why:  # Flower's messages share one content object: give this one its own
                config = ConfigRecord({**m.content[keys.CONFIG], keys.NODE_REFUSED: why})
                m.content = RecordDict({**{k: v for k, v in m.content.items()}, keys.CONFIG: config})

    def _to_wire(self, messages: list[Message]) -> list[Message]:
        """Send the global adapters as one flat array in the transport dtype (the strategy keeps float32 tensors).

        Packing checks the global adapters against the schema; Flower's messages share one
        record, so the array is built once per round.
        """
        rec = messages[0].content.array_records.get(keys.ARRAYS) if messages else None
        if rec is None:
            return messages
        flat = self.layout.pack({k: decode_array(a) for k, a in rec.items()})
        wire = adapter_record(encode({keys.ADAPTERS: flat}, self.transport)[keys.ADAPTERS])
        for m in messages:
            m.content[keys.ARRAYS] = wire
        return messages

    def receive_replies(self, replies: Iterable[Message]) -> None:
        """Read every reply's update once (idempotent): size on the wire, values or the reason, payload hash."""
        for msg in replies:
            if id(msg) in self._received or not msg.has_content():
                continue
            values, problem = read_update(msg.content, self.wire_layout, self.transport)
            got = Received(msg, record_bytes(msg.content), values, problem)
            if values is not None:
                got.digest = self._hasher().submit(payload_sha256, msg.content[keys.ARRAYS])
            self._received[id(msg)] = got

    def replies_arrived(self, replies: Iterable[Message]) -> None:
        """The Grid's arrival hook: read train replies as they come in, while the round waits for the others.

        Screening, hashing and the guard's per-update facts (value range, distance to the
        global adapters) then overlap the wait for slower sites; :meth:`aggregate_train` finds
        those replies already read (:meth:`receive_replies` is idempotent).  Secure
        aggregation stages carry masked vectors, read by their own round.
        """
        if self.secure is not None:
            return
        fresh = [m for m in replies if m.metadata.message_type == "train" and id(m) not in self._received]
        self.receive_replies(fresh)
        for msg in fresh:
            got = self._received.get(id(msg))
            if got is not None and got.values is not None:
                got.facts = self.guard.facts(got.values, self._reference)

    def update_values(self, msg: Message) -> np.ndarray | None:
        """The screened update of a received reply (float32, flat, read-only), or None."""
        got = self._received.get(id(msg))
        return got.values if got is not None else None

    def update_facts(self, msg: Message) -> UpdateFacts | None:
        """The guard's facts of a reply read on arrival (None: the guard computes them)."""
        got = self._received.get(id(msg))
        return got.facts if got is not None else None

    def replace_update(self, msg: Message, values: np.ndarray) -> None:
        """What the round aggregates for this reply from now on (server-side DP's clipped update)."""
        got = self._received[id(msg)]
        got.values, got.facts = values, None  # facts of the old values no longer hold

    def payload_hash(self, msg: Message) -> str | None:
        """sha256 of a received reply's adapter bytes (what its audit trail records); waits for the hash thread."""
        got = self._received.get(id(msg))
        return got.digest.result() if got is not None and got.digest is not None else None

    def forget_replies(self) -> None:
        self._received.clear()

    def _hasher(self) -> ThreadPoolExecutor:
        if self._hash_pool is None:
            self._hash_pool = ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="nearl-payload-sha256")
        return self._hash_pool

    def screen_replies(self, replies: Iterable[Message], *, train: bool) -> tuple[list[Message], list[SiteReply],
                                                                                  dict[str, str]]:
        """Split replies into (accepted messages, their per-site data, rejected site -> reason).

        Each reply is attributed by the node it came from (an error the SuperLink writes for an
        unreachable node is attributed to the node the instruction went to).  A train reply's
        payload hash is left to :meth:`payload_hash`, so that it is computed while the round
        is guarded and aggregated.
        """
        if train:
            self.receive_replies(replies)
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
                got = self._received.get(id(msg)) if train else None
                sites.append(SiteReply(node, site, metrics, got.nbytes if got else record_bytes(msg.content)))
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
        return self._received[id(msg)].problem if train else check_metrics(msg.content)

