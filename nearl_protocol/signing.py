"""Signed secure-aggregation messages: what a site signs, and the checks against the roster.

Bonawitz et al. (CCS 2017), "active adversary": a coordinator that may lie is kept honest
by two signatures per site and round, made with the site's SuperNode private key and
checked by its peers against the consortium roster (:mod:`nearl_protocol.roster`):

* the **key advertisement** (:func:`advert_bytes`): the site's two fresh public keys, its
  participant number, its site name, the run, the round and the federation (the roster's
  CA fingerprint).  A peer key that is not signed so is never used: the coordinator can
  neither swap keys nor invent sites (Sybils).
* the **survivor set** (:func:`survivors_bytes`): after the masked collection, who the
  coordinator says is summed (active) and who dropped (dead).  A site reveals shares only
  against at least t valid signatures over the very set it signed itself, so a
  coordinator that tells different sites different sets gets nothing.

Both sides use :func:`advert_problem` (the site refuses on the first problem, an honest
coordinator with the roster drops the participant); signatures are ECDSA with SHA-384.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from nearl_protocol.roster import Roster

ADVERT, SURVIVORS = "nearl-secagg-advert/1", "nearl-secagg-survivors/1"


def _canonical(kind: str, fields: dict) -> bytes:
    return (kind + "\n" + json.dumps(fields, sort_keys=True, separators=(",", ":"))).encode()


def advert_bytes(*, federation: str, run_id: int, server_round: int, index: int, site: str, pk1: bytes,
                 pk2: bytes) -> bytes:
    """What a site signs at setup: every field a coordinator could swap is in it."""
    return _canonical(ADVERT, {"federation": federation, "run": int(run_id), "round": int(server_round),
                               "index": int(index), "site": site, "pk1": pk1.hex(), "pk2": pk2.hex()})


def survivors_bytes(*, federation: str, run_id: int, server_round: int, signer: int, active: Iterable[int],
                    dead: Iterable[int]) -> bytes:
    """What a site signs before unmasking: the survivor set as the coordinator told it, and who signs."""
    return _canonical(SURVIVORS, {"federation": federation, "run": int(run_id), "round": int(server_round),
                                  "signer": int(signer), "active": sorted(active), "dead": sorted(dead)})


def sign(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    return key.sign(data, ec.ECDSA(hashes.SHA384()))


def verifies(key: ec.EllipticCurvePublicKey, signature: bytes, data: bytes) -> bool:
    try:
        key.verify(signature, data, ec.ECDSA(hashes.SHA384()))
        return True
    except (InvalidSignature, ValueError):
        return False


@dataclass(frozen=True)
class Advert:
    """One participant's key advertisement as the coordinator relays it."""

    index: int
    site: str
    key_id: str  # fingerprint of the SuperNode key it claims to be signed with
    pk1: bytes
    pk2: bytes
    signature: bytes

    def label(self) -> str:
        return f"participant {self.index} ({self.site or 'no name'})"


def advert_problem(roster: Roster, advert: Advert, *, run_id: int, server_round: int,
                   seen: dict[str, int]) -> str | None:
    """Why this advertisement must not be used, or None; ``seen``: key id -> participant, filled as it goes.

    The order gives the most specific reason: an unknown key, a key under another site's
    name, a key claimed twice, then the signature itself.
    """
    if not advert.signature or not advert.key_id:
        return (f"{advert.label()} sent an unsigned key advertisement; this site's roster requires every peer "
                "to sign (nearl-client --roster at every site)")
    member = roster.by_key(advert.key_id)
    if member is None:
        return f"{advert.label()} signs with key sha256:{advert.key_id[:16]}..., which is not on the roster"
    if member.name != advert.site:
        return f"{advert.label()} signs with the roster key of site {member.name}"
    if advert.key_id in seen:
        return (f"the roster key of site {member.name} is claimed by participants {seen[advert.key_id]} and "
                f"{advert.index}")
    seen[advert.key_id] = advert.index
    data = advert_bytes(federation=roster.ca_sha256, run_id=run_id, server_round=server_round, index=advert.index,
                        site=advert.site, pk1=advert.pk1, pk2=advert.pk2)
    if not verifies(roster.public_key(member.name), advert.signature, data):
        return f"{advert.label()}: its key advertisement's signature does not verify with {member.name}'s roster key"
    return None
