"""What a malicious coordinator can rebuild from what it got: the yardstick of the attack tests.

The coordinator's loot (:func:`loot`) is everything that reached it: every share in an
unmask reply, every share pair of a share-keys reply it can decrypt (it swapped in its own
encryption keys), and everything its own Sybil sites hold.  For each real site, :func:`rebuilt`
tries every t-subset of the shares it holds of that site, and says which of the site's
real secrets (mask seed, mask private key, from the site's own state history) came out.
:func:`rebuild_update` then removes the masks from the site's masked vector, as the
attacker would.  A test of a refused attack asserts that nothing came out; the positive
controls (no roster) assert that the same attack does rebuild updates, so the yardstick works.
:func:`rewritten` and :func:`signatures` are the coordinator's own tools: rewrite a message,
read the survivor-set signatures it collected.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from flwr.app import ConfigRecord, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt
from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_separate

from nearl_protocol import keys
from nearl_protocol import secagg as sa
from nearl_protocol.arrays import decode_array
from tests.secagg_fakes import InProcessGrid, stage_of

KeyOf = Callable[[int, int], bytes | None]  # (sender, addressee) participant -> a Fernet key the coordinator holds


@dataclass
class Loot:
    index: dict[int, int]  # node -> participant number
    shares: dict[int, set[bytes]] = field(default_factory=dict)  # participant -> shares of its secrets
    masked: dict[int, np.ndarray] = field(default_factory=dict)  # participant -> its masked vector

    def add(self, participant: int, share: bytes) -> None:
        self.shares.setdefault(participant, set()).add(share)


def participants(grid: InProcessGrid) -> dict[int, int]:
    """node -> participant number, from the setup instructions the sites got."""
    return {m.metadata.dst_node_id: int(m.content[keys.SECAGG][keys.SECAGG_INDEX]) for m in grid.sent
            if m.metadata.message_type == keys.SECAGG_MESSAGE_TYPE and stage_of(m) == sa.SETUP}


def loot(grid: InProcessGrid, *, key_of: KeyOf | None = None, owned: set[int] = frozenset()) -> Loot:
    """Every share and masked vector that reached the coordinator (``owned``: its Sybil nodes)."""
    out = Loot(participants(grid))
    sender = {m.metadata.message_id: m.metadata.dst_node_id for m in grid.sent}
    for reply in grid.received:
        if reply.has_error():
            continue
        node = sender.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        rec = reply.content.config_records.get(keys.SECAGG)
        if rec is not None and keys.SECAGG_SHARES in rec:
            for j, share in zip(rec[keys.SECAGG_PARTICIPANTS], rec[keys.SECAGG_SHARES]):
                out.add(j, share)
        if rec is not None and keys.SECAGG_CIPHERTEXTS in rec and key_of is not None:
            _decrypted(out, out.index[node], rec, key_of)
        if keys.ARRAYS in reply.content.array_records:
            out.masked[out.index[node]] = decode_array(reply.content[keys.ARRAYS][keys.MASKED])
    for node in owned:
        for state in grid.history.get(node, []):
            for j, s1, s2 in zip(state.get("held", []), state.get("held_seed", []), state.get("held_key", [])):
                out.add(j, s1)
                out.add(j, s2)
    return out


def _decrypted(out: Loot, src: int, rec, key_of: KeyOf) -> None:
    for dst, text in zip(rec[keys.SECAGG_PARTICIPANTS], rec[keys.SECAGG_CIPHERTEXTS]):
        key = key_of(src, dst)
        if key is None:
            continue
        got_src, _, seed_share, key_share = share_keys_plaintext_separate(decrypt(key, text))
        out.add(got_src, seed_share)
        out.add(got_src, key_share)


def rebuilt(grid: InProcessGrid, got: Loot, node: int, threshold: int) -> dict[str, bytes]:
    """Which of ``node``'s real secrets ("seed", "sk1") some t of the coordinator's shares reconstruct."""
    real = {}
    for state in grid.history.get(node, []):
        real.update({k: state[k] for k in ("seed", "sk1") if k in state})
    found: dict[str, bytes] = {}
    pile = sorted(got.shares.get(got.index.get(node, -1), set()))
    for subset in itertools.combinations(pile, threshold):
        try:
            secret = combine_shares(list(subset))
        except (ValueError, IndexError):
            continue
        found.update({k: v for k, v in real.items() if v == secret})
    return found


def rebuild_update(grid: InProcessGrid, got: Loot, node: int, seed: bytes, sk1: bytes) -> np.ndarray | None:
    """The site's quantized update (:func:`nearl_protocol.secagg.encode`), unmasked with its own secrets and the
    peer keys it was shown; None without its masked vector."""
    me = got.index[node]
    masked = got.masked.get(me)
    if masked is None:
        return None
    seen = next(m for m in grid.sent if m.metadata.dst_node_id == node and stage_of(m) == sa.SHARE_KEYS)
    collect = next(m for m in grid.sent if m.metadata.dst_node_id == node and stage_of(m) == sa.COLLECT)
    rec, r = seen.content[keys.SECAGG], int(seen.content[keys.SECAGG][keys.SERVER_ROUND])
    pk1 = dict(zip(rec[keys.SECAGG_PARTICIPANTS], rec[keys.SECAGG_PK1]))
    total = sa.sub(masked, sa.self_mask(seed, masked.size, r))
    for j in collect.content[keys.SECAGG][keys.SECAGG_PARTICIPANTS]:
        total = sa.sub(total, sa.pair_mask(sa.pair_secret(sk1, pk1[j]), me, j, masked.size, r))
    return total


def rewritten(m, **changes):
    """``m`` with its secure-aggregation record changed (its own content object)."""
    rec = ConfigRecord({**m.content[keys.SECAGG], **changes})
    m.content = RecordDict({**dict(m.content.items()), keys.SECAGG: rec})
    return m


def signatures(grid: InProcessGrid) -> dict[int, bytes]:
    """participant -> its survivor-set signature, from the consistency replies the coordinator got."""
    index, asked = participants(grid), {m.metadata.message_id: m.metadata.dst_node_id for m in grid.sent}
    out = {}
    for r in grid.received:
        rec = None if r.has_error() else r.content.config_records.get(keys.SECAGG)
        if rec is not None and set(rec.keys()) == {keys.SECAGG_SIGNATURE}:
            out[index[asked[r.metadata.reply_to_message_id]]] = rec[keys.SECAGG_SIGNATURE]
    return out
