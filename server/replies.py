"""How the strategy reads replies: narrowing/widening for the transport dtype, attribution, screening.

:class:`ReplyScreening` is mixed into :class:`server.strategy.NearlStrategyMixin`.  Every
reply is attributed by the node that sent it (:class:`server.screening.SiteIdentities`)
and judged by :func:`server.screening.check_update` (each tensor decoded against its own
metadata, the schema, finite values, a positive example count) before anything else
reads it; a refused node is told why in its next instruction.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from nearl_core.transport import decode, encode
from nearl_protocol import keys
from nearl_protocol.arrays import PayloadError, decode_array, payload_sha256
from nearl_protocol.messages import read_reply, record_bytes
from server.rounds import SiteReply
from server.screening import UNIT_WEIGHT_KEY, check_metrics, check_update, declined, declined_reason, site_metrics

log = logging.getLogger("nearl.strategy")


class ReplyScreening:
    """Reply handling of the NEARL strategy (state set by ``NearlStrategyMixin._nearl_setup``)."""

    def _tell_refused_nodes(self, messages: list[Message]) -> None:
        """A node whose replies are refused (e.g. a duplicate site name) is told why in its instruction."""
        for m in messages:
            why = self.identities.refused.get(m.metadata.dst_node_id)
            if why:  # Flower's messages share one content object: give this one its own
                config = ConfigRecord({**m.content[keys.CONFIG], keys.NODE_REFUSED: why})
                m.content = RecordDict({**{k: v for k, v in m.content.items()}, keys.CONFIG: config})

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

