"""The coordinator's side of secure aggregation: one :class:`SecAggRound` per round, over the Grid.

:meth:`SecAggRound.begin` runs key setup and key sharing with the sampled sites and
returns the train instructions (collect stage) of the sites that completed both, each
carrying the encrypted share pairs addressed to it.  :meth:`SecAggRound.unmask` takes the
masked replies, asks the survivors for the shares it needs, removes every mask and
returns only the sum: the weighted mean of the sites' (clipped, quantized) updates, their
total weight and how many coordinates they clipped.  The protocol and its record layouts
are :mod:`nearl_protocol.secagg`; :mod:`server.secagg_round` ties a round to the strategy.

Dropouts: a site that does not answer a stage, or answers it wrongly, leaves the round at
that stage.  A site that leaves before key sharing is in no one's masks; one that leaves
after it is a *dead* participant whose pairwise masks the survivors' key shares remove
(its own update is never recovered: only its mask key, never its seed, is reconstructed).
Whenever fewer than the threshold t remain, the round aborts with :class:`SecAggAbort`:
its reason names the stage and the counts, and the global adapters stay unchanged.

Signed rounds: when every setup reply is signed (the sites pin a roster), the share-keys
instruction relays the signatures and, before unmasking, a ``consistency`` exchange
collects each survivor's signature over the survivor set, which the unmask request then
carries (:mod:`nearl_protocol.signing`).  With the roster itself (``nearl-server
--roster``) the coordinator checks them too and drops a site whose signature fails, so
one misconfigured site costs a dropout instead of every honest site refusing the round.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import combine_shares

from nearl_protocol import keys
from nearl_protocol import secagg as sa
from nearl_protocol import signing
from nearl_protocol.arrays import PayloadError, decode_array
from nearl_protocol.messages import read_reply
from server.settings import default

log = logging.getLogger("nearl.secagg")


class SecAggAbort(RuntimeError):
    """Fewer sites than the threshold remain at a stage; the round's update is not applied."""


@dataclass(frozen=True)
class SecAggSettings:
    """The federation's choices (server/settings.py): threshold fraction, clip range, weight cap, stage timeout."""

    threshold: float = default("secagg_threshold")
    clip: float = default("secagg_clip")
    max_weight: int = default("secagg_max_weight")
    equal_weights: bool = default("equal_weights")
    timeout: float = default("secagg_timeout")
    roster: Any = None  # nearl_protocol.roster.Roster (nearl-server --roster) or None


@dataclass
class SecAggRound:
    """What the coordinator knows of one secure round: participants, public keys, who is still in."""

    settings: SecAggSettings
    server_round: int
    params: sa.Params | None = None
    index: dict[int, int] = field(default_factory=dict)  # node -> participant number
    pk1: dict[int, bytes] = field(default_factory=dict)  # participant -> mask public key (setup survivors)
    sharing: list[int] = field(default_factory=list)  # participants that completed key sharing (U2)
    signed: bool = False  # every participant signed its keys: the consistency stage runs before unmask
    key_ids: dict[int, str] = field(default_factory=dict)  # participant -> roster fingerprint it signed with
    run_id: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    dropped: dict[str, list[int]] = field(default_factory=dict)  # stage -> participants lost there
    received: list[Message] = field(default_factory=list)  # every reply of every stage (for spies and tests)
    total: np.ndarray | None = None  # the unmasked sum mod 2^32 (the only vector the server learns)

    # -- the exchanges --------------------------------------------------------------------------------------
    def _exchange(self, grid: Any, records: dict[int, dict[str, Any]], stage: str) -> dict[int, RecordDict]:
        """Send one ``train.secagg`` message per node; the valid replies by participant number."""
        out = {node: Message(content=RecordDict({keys.SECAGG: ConfigRecord(
            {keys.SECAGG_STAGE: stage, keys.SERVER_ROUND: self.server_round, **rec})}),
            dst_node_id=node, message_type=keys.SECAGG_MESSAGE_TYPE) for node, rec in records.items()}
        self.bytes_sent += sum(sa.content_bytes(m.content) for m in out.values())
        replies = list(grid.send_and_receive(list(out.values()), timeout=self.settings.timeout))
        self.received.extend(replies)
        by_id = {m.metadata.message_id: node for node, m in out.items()}
        valid: dict[int, RecordDict] = {}
        for reply in replies:
            node = by_id.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            if node not in records:
                continue
            problem = self._problem(reply, stage)
            if problem is None:
                self.bytes_received += sa.content_bytes(reply.content)
                valid[self.index[node]] = reply.content
            else:
                log.warning("round %d: secure aggregation %s: participant %d dropped: %s", self.server_round,
                            stage, self.index[node], problem)
        self.dropped[stage] = sorted(self.index[n] for n in records if self.index[n] not in valid)
        return valid

    @staticmethod
    def _problem(reply: Message, stage: str) -> str | None:
        got = read_reply(reply)
        if got.error is not None:
            return got.error
        if set(reply.content.keys()) != {keys.SECAGG, keys.SITE}:
            return f"reply records {sorted(reply.content.keys())}, expected {sorted([keys.SECAGG, keys.SITE])}"
        try:
            sa.check_record(reply.content[keys.SECAGG], sa.REPLY[stage], f"{stage} reply")
        except sa.SecAggError as err:
            return str(err)
        return None

    def _need(self, count: int, stage: str) -> None:
        t = self.params.threshold if self.params else 2
        if count < t:
            raise SecAggAbort(f"secure aggregation aborted at stage {stage}: {count} of {len(self.index)} sites "
                              f"remain, the threshold is {t}; global adapters unchanged")

    # -- stages 1-2 ---------------------------------------------------------------------------------------------
    def begin(self, grid: Any, messages: list[Message]) -> list[Message]:
        """Key setup and key sharing; the train messages of the sites still in, each with its share pairs."""
        nodes = sorted(m.metadata.dst_node_id for m in messages)
        self.index = {node: i + 1 for i, node in enumerate(nodes)}
        s = self.settings
        if len(nodes) < 2:
            raise SecAggAbort(f"secure aggregation needs at least 2 sites in a round, {len(nodes)} sampled")
        self.params = sa.Params(len(nodes), sa.threshold_for(len(nodes), s.threshold), s.clip, s.max_weight,
                                s.equal_weights)
        self.params.check()
        self.run_id = int(messages[0].metadata.run_id)
        setup = self._exchange(grid, {n: {keys.SECAGG_INDEX: i, **self.params.to_config()}
                                      for n, i in self.index.items()}, sa.SETUP)
        adverts = self._verified({i: c[keys.SECAGG] for i, c in setup.items()})
        self._need(len(adverts), sa.SETUP)
        who = sorted(adverts)
        self.pk1 = {i: adverts[i].pk1 for i in who}
        self.signed = all(adverts[i].signature for i in who)
        self.key_ids = {i: adverts[i].key_id for i in who}
        record = {keys.SECAGG_PARTICIPANTS: who, keys.SECAGG_NAMES: [adverts[i].site for i in who],
                  keys.SECAGG_KEY_IDS: [adverts[i].key_id for i in who], keys.SECAGG_PK1: [adverts[i].pk1 for i in who],
                  keys.SECAGG_PK2: [adverts[i].pk2 for i in who],
                  keys.SECAGG_SIGNATURES: [adverts[i].signature for i in who]}
        node_of = {i: n for n, i in self.index.items()}
        shared = self._exchange(grid, {node_of[i]: record for i in who}, sa.SHARE_KEYS)
        shared = {i: c for i, c in shared.items()
                  if sorted(c[keys.SECAGG][keys.SECAGG_PARTICIPANTS]) == [j for j in who if j != i]}
        self._need(len(shared), sa.SHARE_KEYS)
        self.sharing = sorted(shared)
        inbox: dict[int, list[tuple[int, bytes]]] = {i: [] for i in self.sharing}
        for src in self.sharing:
            rec = shared[src][keys.SECAGG]
            for dst, text in zip(rec[keys.SECAGG_PARTICIPANTS], rec[keys.SECAGG_CIPHERTEXTS]):
                if dst in inbox:
                    inbox[dst].append((src, text))
        out = []
        for m in messages:
            i = self.index[m.metadata.dst_node_id]
            if i in inbox:  # Flower's messages share one content object: give this one its own
                m.content = RecordDict({**dict(m.content.items()), keys.SECAGG: ConfigRecord({
                    keys.SECAGG_STAGE: sa.COLLECT, keys.SERVER_ROUND: self.server_round,
                    keys.SECAGG_PARTICIPANTS: [src for src, _ in inbox[i]],
                    keys.SECAGG_CIPHERTEXTS: [text for _, text in inbox[i]]})})
                out.append(m)
        return out

    def _verified(self, replies: dict[int, Any]) -> dict[int, signing.Advert]:
        """The setup replies as advertisements; with the roster, those whose signature fails are dropped."""
        adverts = {i: signing.Advert(i, r[keys.SECAGG_NAME], r[keys.SECAGG_KEY_ID], r[keys.SECAGG_PK1],
                                     r[keys.SECAGG_PK2], r[keys.SECAGG_SIGNATURE]) for i, r in sorted(replies.items())}
        if self.settings.roster is None:
            return adverts
        seen: dict[str, int] = {}
        for i, advert in list(adverts.items()):
            problem = signing.advert_problem(self.settings.roster, advert, run_id=self.run_id,
                                             server_round=self.server_round, seen=seen)
            if problem:
                log.warning("round %d: secure aggregation setup: participant %d dropped: %s", self.server_round, i,
                            problem)
                self.dropped[sa.SETUP].append(i)
                del adverts[i]
        return adverts

    # -- stages 3-5 ---------------------------------------------------------------------------------------------
    def unmask(self, grid: Any, masked: dict[int, np.ndarray]) -> tuple[np.ndarray, int, int]:
        """``masked``: participant -> its masked vector (valid ones only).  Returns (weighted mean of the
        clipped updates, total weight, clipped coordinates); raises :class:`SecAggAbort`."""
        assert self.params is not None
        self.dropped[sa.COLLECT] = [i for i in self.sharing if i not in masked]
        self._need(len(masked), sa.COLLECT)
        active = sorted(masked)
        dead = [i for i in self.sharing if i not in masked]
        node_of = {i: n for n, i in self.index.items()}
        record = {keys.SECAGG_ACTIVE: active, keys.SECAGG_DEAD: dead}
        signatures = self._consistency(grid, record, node_of) if self.signed else {}
        asked = sorted(signatures) if self.signed else active
        record = {**record, keys.SECAGG_SIGNERS: sorted(signatures),
                  keys.SECAGG_SIGNATURES: [signatures[i] for i in sorted(signatures)]}
        answers = self._exchange(grid, {node_of[i]: record for i in asked}, sa.UNMASK)
        answers = {i: c[keys.SECAGG] for i, c in answers.items()
                   if list(c[keys.SECAGG][keys.SECAGG_PARTICIPANTS]) == active + dead}
        self._need(len(answers), sa.UNMASK)
        shares = {j: [] for j in active + dead}
        for rec in answers.values():
            for j, share in zip(rec[keys.SECAGG_PARTICIPANTS], rec[keys.SECAGG_SHARES]):
                shares[j].append(share)
        total = np.zeros(len(next(iter(masked.values()))), np.uint32)
        for i in active:
            total = sa.add(total, masked[i])
            total = sa.sub(total, sa.self_mask(self._combine(shares[i], i), total.size, self.server_round))
        for j in dead:  # the survivors masked with j; j's mask key undoes those pairwise masks
            sk1 = self._combine(shares[j], j)
            for i in active:
                mask = sa.pair_mask(sa.pair_secret(sk1, self.pk1[i]), i, j, total.size, self.server_round)
                total = sa.sub(total, mask)
        self.total = total
        return sa.decode(total, self.params)

    def _consistency(self, grid: Any, record: dict[str, Any], node_of: dict[int, int]) -> dict[int, bytes]:
        """Each survivor's signature over the survivor set (participant -> signature); at least t of them."""
        got = self._exchange(grid, {node_of[i]: record for i in record[keys.SECAGG_ACTIVE]}, sa.CONSISTENCY)
        signatures = {i: c[keys.SECAGG][keys.SECAGG_SIGNATURE] for i, c in got.items()}
        roster = self.settings.roster
        if roster is not None:
            names = {i: roster.by_key(key_id) for i, key_id in self.key_ids.items()}
            for i, sig in list(signatures.items()):
                data = signing.survivors_bytes(federation=roster.ca_sha256, run_id=self.run_id,
                                               server_round=self.server_round, signer=i,
                                               active=record[keys.SECAGG_ACTIVE], dead=record[keys.SECAGG_DEAD])
                if names.get(i) is None or not signing.verifies(roster.public_key(names[i].name), sig, data):
                    log.warning("round %d: secure aggregation consistency: participant %d dropped: its survivor-set "
                                "signature does not verify", self.server_round, i)
                    self.dropped[sa.CONSISTENCY].append(i)
                    del signatures[i]
        self._need(len(signatures), sa.CONSISTENCY)
        return signatures

    def _combine(self, shares: list[bytes], participant: int) -> bytes:
        try:
            return combine_shares(shares[: self.params.threshold])
        except (ValueError, IndexError) as err:
            raise SecAggAbort(f"secure aggregation aborted at stage unmask: the shares of participant "
                              f"{participant} do not combine ({err}); global adapters unchanged") from None


def read_masked(reply: Message, length: int) -> tuple[np.ndarray | None, str | None]:
    """A masked train reply's uint32 vector, or why it cannot be summed."""
    got = read_reply(reply)
    if got.error is not None:
        return None, got.error
    content = reply.content
    if set(content.keys()) != {keys.ARRAYS, keys.METRICS, keys.SITE}:
        return None, f"masked reply records {sorted(content.keys())}, expected arrays, metrics and site"
    arrays = content[keys.ARRAYS]
    if set(arrays.keys()) != {keys.MASKED}:
        return None, f"masked reply arrays {sorted(arrays.keys())}, expected ['{keys.MASKED}']"
    try:
        values = decode_array(arrays[keys.MASKED])
    except PayloadError as err:
        return None, f"'{keys.MASKED}': {err}"
    if values.dtype != np.uint32 or values.shape != (length,):
        return None, f"'{keys.MASKED}' is {values.dtype}{list(values.shape)}, expected uint32[{length}]"
    if keys.NUM_EXAMPLES in got.metrics:
        return None, f"a masked reply must not carry '{keys.NUM_EXAMPLES}' in clear"
    return values, None


def nodes_of(replies: Iterable[Message], outgoing: Iterable[Message]) -> list[tuple[int, Message]]:
    """(node, reply) pairs, the node taken from the instruction each reply answers."""
    dst = {m.metadata.message_id: m.metadata.dst_node_id for m in outgoing if m.metadata.message_id}
    return [(dst.get(r.metadata.reply_to_message_id, r.metadata.src_node_id), r) for r in replies]
