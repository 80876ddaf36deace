"""A site's defence against a malicious coordinator in secure rounds: its roster, its key, its checks.

A site started with ``nearl-client --roster FILE --auth-key KEY`` signs its key
advertisement and its view of the survivor set with its SuperNode key, and checks every
peer against the roster before it uses a peer key or reveals a share
(:mod:`nearl_protocol.signing` says what is signed and why).  Every check raises
:class:`nearl_protocol.secagg.SecAggError` with a one-line reason: :func:`client.secagg.stage_reply`
turns it into the error reply and the audit trail's ``refused`` line, and the site
abandons the round.

A site without a roster runs the protocol of an honest-but-curious coordinator (it trusts
the coordinator's list of peers): :func:`site_auth` returns None and nothing here runs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from client.binding import SiteBinding
from nearl_protocol import keys
from nearl_protocol import secagg as sa
from nearl_protocol import signing
from nearl_protocol.roster import Roster, RosterError, ca_fingerprint, fingerprint, load_private_key, load_roster

DEFAULT_MIN_SITES = 3  # nearl-client --min-secure-sites: with 2, the sum and one colluding site give the other


@dataclass(frozen=True)
class SiteAuth:
    """This site's signing key, the roster it pins and its smallest acceptable secure round."""

    site: str
    key: ec.EllipticCurvePrivateKey
    key_id: str
    roster: Roster
    min_sites: int


def check_membership(roster: Roster, site: str, key: ec.EllipticCurvePrivateKey, roster_path: Path,
                     key_path: Path) -> None:
    """The roster names ``site`` and pins exactly this private key's public half (checked at start and per round)."""
    member = roster.members.get(site)
    if member is None:
        raise RosterError(f"--roster {roster_path} does not name site {site} (it names {', '.join(roster.members)}); "
                          f"ask the consortium to add {site}.pub (deploy/make-roster.sh) or fix --site")
    own = fingerprint(key.public_key())
    if own != member.sha256:
        raise RosterError(f"--auth-key {key_path} is not site {site}'s key on the roster {roster_path} (sha256 "
                          f"{own[:16]}... vs {member.sha256[:16]}...); use the key whose .pub went into the roster")


def pin_roster(path: Path, site: str, key_path: Path, ca: Path | None) -> Roster:
    """What ``nearl-client --roster`` checks at start: the file parses, names this site, pins this site's own
    key and (with TLS) the federation CA this site trusts.  Every failure is one RosterError line."""
    roster = load_roster(path)
    check_membership(roster, site, load_private_key(key_path), path, key_path)
    if ca is not None and ca_fingerprint(ca) != roster.ca_sha256:
        raise RosterError(f"--roster {path} is for the CA sha256 {roster.ca_sha256[:16]}..., but {ca} is another; "
                          "get the roster and ca.crt of the same federation")
    return roster


def site_auth(binding: SiteBinding) -> SiteAuth | None:
    """The site's roster and key (None: no roster, honest-but-curious mode); re-read when either file changes."""
    if binding.roster is None:
        return None
    if binding.auth_key is None:
        raise sa.SecAggError("this site pins a roster but has no auth-key to sign with; start it with "
                             "nearl-client --roster FILE --auth-key KEY")
    stamp = tuple(_mtime(p) for p in (binding.roster, binding.auth_key))
    return _load(Path(binding.roster), Path(binding.auth_key), binding.site, binding.min_secure_sites, stamp)


def _mtime(path: Path) -> float:
    try:
        return Path(path).stat().st_mtime
    except OSError:
        return -1.0


@functools.lru_cache(maxsize=8)
def _load(roster_path: Path, key_path: Path, site: str, min_sites: int | None, _stamp: tuple) -> SiteAuth:
    roster, key = load_roster(roster_path), load_private_key(key_path)
    check_membership(roster, site, key, roster_path, key_path)
    return SiteAuth(site, key, fingerprint(key.public_key()), roster, min_sites or DEFAULT_MIN_SITES)


# -- setup: the round's size and this site's signed advertisement -------------------------------------------
def check_round_size(auth: SiteAuth, sites: int) -> None:
    if sites < auth.min_sites:
        raise sa.SecAggError(f"a secure round of {sites} sites is below this site's minimum of {auth.min_sites} "
                             "roster members (nearl-client --min-secure-sites); refusing")


def advertise(auth: SiteAuth | None, site: str, *, run_id: int, server_round: int, index: int, pk1: bytes,
              pk2: bytes) -> dict[str, Any]:
    """The setup reply's identity fields: signed with a roster, empty without one."""
    if auth is None:
        return {keys.SECAGG_NAME: site, keys.SECAGG_KEY_ID: "", keys.SECAGG_SIGNATURE: b""}
    data = signing.advert_bytes(federation=auth.roster.ca_sha256, run_id=run_id, server_round=server_round,
                                index=index, site=site, pk1=pk1, pk2=pk2)
    return {keys.SECAGG_NAME: site, keys.SECAGG_KEY_ID: auth.key_id,
            keys.SECAGG_SIGNATURE: signing.sign(auth.key, data)}


# -- share-keys: every peer on the roster, once, with a valid signature --------------------------------------
def check_peers(auth: SiteAuth, record: Any, *, run_id: int, server_round: int, me: int) -> list[str]:
    """The participants' site names, in the record's order, once each advertisement checked out."""
    lists = [record[k] for k in (keys.SECAGG_PARTICIPANTS, keys.SECAGG_NAMES, keys.SECAGG_KEY_IDS, keys.SECAGG_PK1,
                                 keys.SECAGG_PK2, keys.SECAGG_SIGNATURES)]
    if len({len(x) for x in lists}) != 1:
        raise sa.SecAggError("share-keys: the participant, name, key and signature lists differ in length")
    seen: dict[str, int] = {}
    for index, name, key_id, pk1, pk2, sig in zip(*lists):
        advert = signing.Advert(index, name, key_id, pk1, pk2, sig)
        problem = signing.advert_problem(auth.roster, advert, run_id=run_id, server_round=server_round, seen=seen)
        if problem:
            raise sa.SecAggError(f"share-keys: {problem}; refusing")
        if index == me and name != auth.site:
            raise sa.SecAggError(f"share-keys: this site's own participant number {me} is listed as {name}; refusing")
    if len(seen) < auth.min_sites:
        raise sa.SecAggError(f"share-keys: {len(seen)} roster members in this secure round, below this site's minimum "
                             f"of {auth.min_sites} (nearl-client --min-secure-sites); refusing")
    return list(record[keys.SECAGG_NAMES])


# -- consistency and unmask: one survivor set, signed by at least t roster members -------------------------
def sign_survivors(auth: SiteAuth, state: dict[str, Any], active: list[int], dead: list[int]) -> bytes:
    """This site's signature over the survivor set; it signs one set per round (the stage is answered once)."""
    if len(active) < auth.min_sites:
        raise sa.SecAggError(f"consistency: the sum would cover {len(active)} sites' updates, below this site's "
                             f"minimum of {auth.min_sites} (nearl-client --min-secure-sites); refusing")
    return signing.sign(auth.key, _survivors(auth, state, state["index"], active, dead))


def check_survivor_signatures(auth: SiteAuth, state: dict[str, Any], record: Any) -> None:
    """Reveal nothing unless the request names the set this site signed and t roster members signed that set."""
    active, dead = list(record[keys.SECAGG_ACTIVE]), list(record[keys.SECAGG_DEAD])
    if (sorted(active), sorted(dead)) != (sorted(state["signed_active"]), sorted(state["signed_dead"])):
        raise sa.SecAggError(f"unmask: the survivor set asked about (active {sorted(active)}, dropped {sorted(dead)}) "
                             f"differs from the one this site signed (active {sorted(state['signed_active'])}, "
                             f"dropped {sorted(state['signed_dead'])}); refusing")
    signers, sigs = record[keys.SECAGG_SIGNERS], record[keys.SECAGG_SIGNATURES]
    if len(signers) != len(sigs) or len(set(signers)) != len(signers) or not set(signers) <= set(active):
        raise sa.SecAggError("unmask: the survivor-set signatures are malformed (lengths, repeats or signers "
                             "outside the survivor set); refusing")
    names = dict(zip(state["peers"], state["names"]))
    for signer, sig in zip(signers, sigs):
        data = _survivors(auth, state, signer, active, dead)
        if not signing.verifies(auth.roster.public_key(names[signer]), sig, data):
            raise sa.SecAggError(f"unmask: participant {signer}'s ({names[signer]}) signature over the survivor set "
                                 "does not verify: the coordinator showed sites different survivor sets or altered "
                                 "a signature; refusing")
    threshold = sa.Params.from_config(state).threshold
    if len(signers) < threshold:
        raise sa.SecAggError(f"unmask: {len(signers)} roster members signed this survivor set, the threshold is "
                             f"{threshold}; refusing")


def _survivors(auth: SiteAuth, state: dict[str, Any], signer: int, active: list[int], dead: list[int]) -> bytes:
    return signing.survivors_bytes(federation=auth.roster.ca_sha256, run_id=state["run"],
                                   server_round=state["round"], signer=signer, active=active, dead=dead)
