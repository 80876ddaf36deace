"""Secure aggregation (SecAgg+, Bell et al. 2020) on the Message API: what both sides must agree on.

A round with secure aggregation has four exchanges (:data:`STAGES`), five when it is
signed, driven by :mod:`server.secagg` and answered by :mod:`client.secagg`:

1. ``setup``: each sampled site gets its participant number (1..n) and the round's
   parameters (:class:`Params`) and answers with two fresh ECDH public keys, signed with
   its SuperNode key when it pins a roster (:mod:`nearl_protocol.signing`);
2. ``share-keys``: each site gets every participant's public keys (and signatures, which a
   site with a roster checks before it uses any of them), Shamir-shares its own mask seed
   and its mask private key (threshold t) and answers with one encrypted share pair per
   other participant (only the addressee can decrypt it);
3. ``collect``: the ordinary train instruction, carrying the share pairs addressed to the
   site; the site trains and answers with its *masked* weighted update (:func:`encode`
   then :func:`add_masks`), uint32, never the update itself;
4. ``consistency`` (signed rounds only): each survivor signs the survivor set the
   coordinator tells it (who is summed, who dropped);
5. ``unmask``: the survivors answer with the shares the server needs: the seed shares of
   the sites whose masked update it holds and the key shares of the sites that dropped;
   in a signed round only against at least t valid signatures over the set each signed.

The neighbourhood of every site is the whole round (a complete graph: hospitals are few).
Masks come from AES-256-CTR keyed (through HKDF-SHA256) with the full 32-byte agreed
secret (:func:`mask`), not from Flower's ``pseudo_rand_gen`` (a 32-bit seed for
Mersenne Twister).  ECDH, HKDF, Fernet and Shamir sharing are Flower's own primitives
(``flwr.common.secure_aggregation``) over the ``cryptography`` package.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from nearl_protocol import keys

SETUP, SHARE_KEYS, COLLECT, CONSISTENCY, UNMASK = "setup", "share-keys", "collect", "consistency", "unmask"
STAGES = (SETUP, SHARE_KEYS, COLLECT, CONSISTENCY, UNMASK)
MODULUS_BITS = 32  # masked values live in Z_(2^32): uint32 on the wire, as many bytes as float32
INT_LIMIT = 2**31 - 1  # the signed sum of every site's quantized update must stay within +-INT_LIMIT
EXTRA_SLOTS = 2  # after the update: the site's weight and how many of its coordinates it clipped


class SecAggError(ValueError):
    """A secure-aggregation message or parameter breaks the protocol; the one-line reason says which."""


def threshold_for(sites: int, fraction: float) -> int:
    """Shares needed out of ``sites``: ``ceil(fraction x sites)``, never at or below half of them.

    Above half is what keeps an honest-but-curious coordinator from asking two disjoint
    halves for the seed and the key of the same site.
    """
    t = max(sites // 2 + 1, int(np.ceil(fraction * sites - 1e-9)))
    return min(t, sites)


@dataclass(frozen=True)
class Params:
    """The round's parameters, sent at setup; both sides derive the quantization from them."""

    sites: int  # n, participants sampled
    threshold: int  # t
    clip: float  # each coordinate of an update is clipped to [-clip, clip]
    max_weight: int  # a site weighs in with min(examples, max_weight)
    equal_weights: bool = False  # every site weighs 1

    def check(self) -> None:
        if not 2 <= self.sites:
            raise SecAggError(f"secure aggregation needs at least 2 sites in a round, got {self.sites}")
        if not self.sites / 2 < self.threshold <= self.sites:
            raise SecAggError(f"secure aggregation threshold {self.threshold} must be above half of the "
                              f"{self.sites} sites and at most {self.sites}")
        if not (self.clip > 0 and np.isfinite(self.clip)):
            raise SecAggError(f"secure aggregation clip range must be a positive number, got {self.clip}")
        if not 1 <= self.max_weight or self.sites * self.max_weight > INT_LIMIT - self.sites:
            raise SecAggError(f"secagg max weight {self.max_weight} x {self.sites} sites must stay below 2^31; "
                              "lower secagg-max-weight")

    @property
    def scale(self) -> float:
        """Integer units per unit of weighted update: the largest for which n sites' sum cannot overflow."""
        return (INT_LIMIT - self.sites) / (self.sites * self.max_weight * self.clip)

    def weight(self, examples: int) -> int:
        return 1 if self.equal_weights else max(0, min(int(examples), self.max_weight))

    def error_bound(self, total_weight: int, sites: int | None = None) -> float:
        """Largest per-coordinate error of the decoded weighted mean (of the clipped updates): each of
        the summed sites rounds by at most 1/2 unit, and the sum is divided by scale x total weight."""
        return (sites or self.sites) / (2 * self.scale * max(total_weight, 1))

    def to_config(self) -> dict[str, Any]:
        return {keys.SECAGG_SITES: self.sites, keys.SECAGG_THRESHOLD: self.threshold, keys.SECAGG_CLIP: self.clip,
                keys.SECAGG_MAX_WEIGHT: self.max_weight, keys.SECAGG_EQUAL_WEIGHTS: self.equal_weights}

    @classmethod
    def from_config(cls, record: Mapping[str, Any]) -> "Params":
        p = cls(int(record[keys.SECAGG_SITES]), int(record[keys.SECAGG_THRESHOLD]), float(record[keys.SECAGG_CLIP]),
                int(record[keys.SECAGG_MAX_WEIGHT]), bool(record[keys.SECAGG_EQUAL_WEIGHTS]))
        p.check()
        return p


# -- what a site sends: its weighted update as integers mod 2^32 ---------------------------------------------
def encode(update: np.ndarray, examples: int, params: Params) -> np.ndarray:
    """``[rint(w x clip(update) x scale) ..., w, clipped]`` mod 2^32 as uint32 (w: the site's weight).

    The weight and the number of clipped coordinates travel in the same masked vector, so
    the server learns only their sums.
    """
    values = np.asarray(update, dtype=np.float64)
    if not np.isfinite(values).all():
        raise SecAggError("the update holds NaN or Inf values; nothing is sent")
    w = params.weight(examples)
    clipped = int(np.count_nonzero(np.abs(values) > params.clip))
    q = np.rint(np.clip(values, -params.clip, params.clip) * (w * params.scale)).astype(np.int64)
    return np.concatenate([q, np.array([w, clipped], dtype=np.int64)]).astype(np.uint32)  # two's complement mod 2^32


def decode(total: np.ndarray, params: Params) -> tuple[np.ndarray, int, int]:
    """The unmasked sum -> (weighted mean of the clipped updates, float64; total weight; clipped coordinates)."""
    signed = np.asarray(total, dtype=np.uint32).view(np.int32).astype(np.int64)
    weight, clipped = int(total[-2]), int(total[-1])
    if weight <= 0:
        return np.zeros(len(total) - EXTRA_SLOTS), 0, clipped
    return signed[:-EXTRA_SLOTS] / (params.scale * weight), weight, clipped


# -- masks ----------------------------------------------------------------------------------------------------
def mask(secret: bytes, length: int, label: str) -> np.ndarray:
    """``length`` uint32 values from AES-256-CTR keyed by HKDF-SHA256(secret, info=label).

    The whole secret (32 bytes) keys the generator; ``label`` separates the self mask from
    the pairwise masks and one round from another.
    """
    if len(secret) < 16:
        raise SecAggError(f"a mask secret of {len(secret)} bytes is too short")
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=f"nearl-secagg/{label}".encode()).derive(secret)
    enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    stream = enc.update(bytes(4 * length)) + enc.finalize()
    return np.frombuffer(stream, dtype="<u4").astype(np.uint32)


def pair_secret(private_pem: bytes, public_pem: bytes) -> bytes:
    """The 32-byte secret two participants agree on (ECDH + HKDF, Flower's ``generate_shared_key``)."""
    return base64.urlsafe_b64decode(generate_shared_key(bytes_to_private_key(private_pem),
                                                        bytes_to_public_key(public_pem)))


def share_key(private_pem: bytes, public_pem: bytes) -> bytes:
    """The Fernet key that encrypts share pairs between two participants (their second key pair)."""
    return generate_shared_key(bytes_to_private_key(private_pem), bytes_to_public_key(public_pem))


def pair_mask(secret: bytes, me: int, other: int, length: int, server_round: int) -> np.ndarray:
    """The pairwise mask ``me`` adds: +PRG for the higher participant number, -PRG for the lower, so they cancel."""
    m = mask(secret, length, f"pair/{server_round}")
    return m if me > other else sub(np.zeros_like(m), m)


def self_mask(seed: bytes, length: int, server_round: int) -> np.ndarray:
    return mask(seed, length, f"self/{server_round}")


def add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a + b mod 2^32 (uint32 arithmetic wraps)."""
    return np.add(a, b, dtype=np.uint32)


def sub(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.subtract(a, b, dtype=np.uint32)


# -- record layouts ---------------------------------------------------------------------------------------
LIST_INT, LIST_BYTES, LIST_STR = "list[int]", "list[bytes]", "list[str]"
INSTRUCTION: dict[str, dict[str, Any]] = {  # stage -> key -> type, of the SECAGG record the server sends
    SETUP: {keys.SECAGG_STAGE: str, keys.SERVER_ROUND: int, keys.SECAGG_INDEX: int, keys.SECAGG_SITES: int,
            keys.SECAGG_THRESHOLD: int, keys.SECAGG_CLIP: float, keys.SECAGG_MAX_WEIGHT: int,
            keys.SECAGG_EQUAL_WEIGHTS: bool},
    SHARE_KEYS: {keys.SECAGG_STAGE: str, keys.SERVER_ROUND: int, keys.SECAGG_PARTICIPANTS: LIST_INT,
                 keys.SECAGG_NAMES: LIST_STR, keys.SECAGG_KEY_IDS: LIST_STR, keys.SECAGG_PK1: LIST_BYTES,
                 keys.SECAGG_PK2: LIST_BYTES, keys.SECAGG_SIGNATURES: LIST_BYTES},
    COLLECT: {keys.SECAGG_STAGE: str, keys.SERVER_ROUND: int, keys.SECAGG_PARTICIPANTS: LIST_INT,
              keys.SECAGG_CIPHERTEXTS: LIST_BYTES},
    CONSISTENCY: {keys.SECAGG_STAGE: str, keys.SERVER_ROUND: int, keys.SECAGG_ACTIVE: LIST_INT,
                  keys.SECAGG_DEAD: LIST_INT},
    UNMASK: {keys.SECAGG_STAGE: str, keys.SERVER_ROUND: int, keys.SECAGG_ACTIVE: LIST_INT,
             keys.SECAGG_DEAD: LIST_INT, keys.SECAGG_SIGNERS: LIST_INT, keys.SECAGG_SIGNATURES: LIST_BYTES},
}
REPLY: dict[str, dict[str, Any]] = {  # stage -> key -> type, of the SECAGG record a site answers with
    SETUP: {keys.SECAGG_PK1: bytes, keys.SECAGG_PK2: bytes, keys.SECAGG_NAME: str, keys.SECAGG_KEY_ID: str,
            keys.SECAGG_SIGNATURE: bytes},
    SHARE_KEYS: {keys.SECAGG_PARTICIPANTS: LIST_INT, keys.SECAGG_CIPHERTEXTS: LIST_BYTES},
    CONSISTENCY: {keys.SECAGG_SIGNATURE: bytes},
    UNMASK: {keys.SECAGG_PARTICIPANTS: LIST_INT, keys.SECAGG_SHARES: LIST_BYTES},
}


def _is(value: Any, kind: Any) -> bool:
    if kind == LIST_INT:
        return isinstance(value, list) and all(type(v) is int for v in value)
    if kind == LIST_BYTES:
        return isinstance(value, list) and all(isinstance(v, bytes) for v in value)
    if kind == LIST_STR:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind is float:
        return type(value) in (float, int)
    return type(value) is kind


def check_record(record: Mapping[str, Any], layout: Mapping[str, Any], what: str) -> None:
    """:class:`SecAggError` unless ``record`` holds exactly ``layout``'s keys with values of its types."""
    names = set(record.keys())
    if names != set(layout):
        raise SecAggError(f"{what}: keys {sorted(names)} differ from the agreed {sorted(layout)}")
    for key, kind in layout.items():
        if not _is(record[key], kind):
            raise SecAggError(f"{what}: '{key}' is a {type(record[key]).__name__}, expected {getattr(kind, '__name__', kind)}")


def content_bytes(content: Any) -> int:
    """Payload bytes of a message's records (:func:`nearl_protocol.messages.record_bytes`, which also counts the
    empty lists, strings and bytes that secure-aggregation records can hold)."""
    from nearl_protocol.messages import record_bytes

    return record_bytes(content)


def stage_of(record: Mapping[str, Any]) -> str:
    stage = record.get(keys.SECAGG_STAGE)
    if stage not in STAGES:
        raise SecAggError(f"unknown secure-aggregation stage {stage!r}; server and site versions differ")
    return str(stage)
