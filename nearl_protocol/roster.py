"""The consortium roster: which SuperNode keys are the federation's sites, pinned at every site.

    python -m nearl_protocol.roster --out roster.json --ca ca.crt siteA.pub siteB.pub ...
    (deploy/make-roster.sh is the same command)

``roster.json`` names each site (the key file's stem), its SuperNode public key (the
OpenSSH line ``deploy/make-site-key.sh`` wrote) and the key's fingerprint, and the
fingerprint of the federation's CA certificate.  The consortium makes it once, every
site and the coordinator get the same file, and each checks its digest out of band
(:attr:`Roster.digest`, printed here and by ``nearl-client --roster`` at start).

Why a roster: in a secure round a site must know that the peers the coordinator lists are
real hospitals, each once, not keys the coordinator made up.  Each site signs its
secure-aggregation keys with its SuperNode key (:mod:`nearl_protocol.signing`), and its
peers check that signature against this file, never against anything the coordinator sends.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

FORMAT = "nearl-roster/1"
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # the same rule as nearl-client --site


class RosterError(ValueError):
    """A roster, key or certificate that cannot be used; the one-line reason names the fix."""


@dataclass(frozen=True)
class Member:
    name: str
    public_key: str  # the OpenSSH line of the site's SuperNode public key
    sha256: str  # fingerprint(public_key)


@dataclass(frozen=True)
class Roster:
    ca_sha256: str  # sha256 of the federation CA certificate (DER): binds signatures to this federation
    members: Mapping[str, Member]  # site name -> member
    digest: str  # sha256 of the canonical file content: what the sites compare out of band

    def by_key(self, sha256: str) -> Member | None:
        return next((m for m in self.members.values() if m.sha256 == sha256), None)

    def public_key(self, name: str) -> ec.EllipticCurvePublicKey:
        return parse_public_key(self.members[name].public_key, f"roster entry {name}")


# -- keys and fingerprints ------------------------------------------------------------------------------------
def parse_public_key(text: str, what: str) -> ec.EllipticCurvePublicKey:
    """An EC public key from an OpenSSH line (``*.pub``) or a PEM block; one-line RosterError otherwise."""
    data = text.strip().encode()
    try:
        key = (serialization.load_pem_public_key(data) if data.startswith(b"-----")
               else serialization.load_ssh_public_key(data))
    except (ValueError, TypeError) as err:
        raise RosterError(f"{what} is not a public key ({err}); use the .pub that deploy/make-site-key.sh "
                          "wrote") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise RosterError(f"{what} is a {type(key).__name__}, not an EC key; make it with deploy/make-site-key.sh")
    return key


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The site's SuperNode private key (OpenSSH or PEM, unencrypted), as Flower's SuperNode reads it."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise RosterError(f"--auth-key {path}: {err.strerror or err}; make one with deploy/make-site-key.sh "
                          "SITE") from None
    try:
        key = (serialization.load_ssh_private_key(data, None) if b"OPENSSH" in data
               else serialization.load_pem_private_key(data, None))
    except (ValueError, TypeError) as err:
        raise RosterError(f"--auth-key {path} is not an unencrypted private key ({err}); "
                          "make one with deploy/make-site-key.sh SITE") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise RosterError(f"--auth-key {path} is not an EC key; make one with deploy/make-site-key.sh SITE")
    return key


def fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """sha256 (hex) of the key's DER SubjectPublicKeyInfo: the same for its OpenSSH and PEM forms."""
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def ca_fingerprint(path: Path) -> str:
    """sha256 (hex) of a PEM certificate's DER bytes (``openssl x509 -fingerprint -sha256`` without colons)."""
    try:
        cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError) as err:
        raise RosterError(f"{path} is not a readable PEM certificate ({err}); give the federation's ca.crt "
                          "(deploy/make-certs.sh)") from None
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


# -- the file -------------------------------------------------------------------------------------------------
def make_roster(ca: Path, keys: list[Path]) -> dict[str, Any]:
    """The roster's content: every key file's stem as its site name; refuses repeats of a name or a key."""
    if not keys:
        raise RosterError("give the sites' public keys, e.g. make-roster.sh --out roster.json --ca ca.crt siteA.pub")
    sites: dict[str, dict[str, str]] = {}
    seen: dict[str, str] = {}
    for path in keys:
        name = Path(path).name.removesuffix(".pub")
        if not SITE_NAME.match(name):
            raise RosterError(f"{path}: site name {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
        try:
            text = Path(path).read_text().strip()
        except OSError as err:
            raise RosterError(f"{path}: {err.strerror or err}") from None
        sha = fingerprint(parse_public_key(text, str(path)))
        if name in sites:
            raise RosterError(f"{path}: site {name} is given twice; give each site's key once")
        if sha in seen:
            raise RosterError(f"{path}: the same key as {seen[sha]}.pub; every site needs its own key "
                              "(deploy/make-site-key.sh)")
        sites[name], seen[sha] = {"public_key": text, "sha256": sha}, name
    return {"format": FORMAT, "ca_sha256": ca_fingerprint(ca), "sites": dict(sorted(sites.items()))}


def content_digest(content: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def load_roster(path: Path) -> Roster:
    """Parse and check a roster file; every problem is one RosterError line naming the file and the fix."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except OSError as err:
        raise RosterError(f"roster {path}: {err.strerror or err}; get the consortium's roster.json "
                          "(deploy/make-roster.sh)") from None
    except ValueError as err:
        raise RosterError(f"roster {path} is not JSON ({err}); get the consortium's roster.json again") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise RosterError(f"roster {path}: format {raw.get('format') if isinstance(raw, dict) else None!r}, "
                          f"expected {FORMAT!r}; remake it with deploy/make-roster.sh")
    sites, ca = raw.get("sites"), raw.get("ca_sha256")
    if not isinstance(sites, dict) or not sites or not isinstance(ca, str) or not re.fullmatch(r"[0-9a-f]{64}", ca):
        raise RosterError(f"roster {path}: needs 'sites' (name -> key) and 'ca_sha256'; remake it with "
                          "deploy/make-roster.sh")
    members = {name: _member(path, name, entry) for name, entry in sites.items()}
    keys = [m.sha256 for m in members.values()]
    if len(set(keys)) != len(keys):
        raise RosterError(f"roster {path}: two sites share one key; every site needs its own key")
    return Roster(ca, members, content_digest(raw))


def _member(path: Path, name: str, entry: Any) -> Member:
    if not SITE_NAME.match(str(name)) or not isinstance(entry, dict):
        raise RosterError(f"roster {path}: entry {name!r} is not a site name with its key; remake the roster")
    text = str(entry.get("public_key", ""))
    sha = fingerprint(parse_public_key(text, f"roster {path}: {name}'s public_key"))
    if entry.get("sha256") != sha:
        raise RosterError(f"roster {path}: {name}'s sha256 does not match its public key; the file was edited, "
                          "remake it with deploy/make-roster.sh")
    return Member(name, text, sha)


def check_site_key(roster: Roster, name: str, key_text: str, where: str) -> None:
    """The coordinator's registry agrees with the roster: this site key is on it, under this name."""
    sha = fingerprint(parse_public_key(key_text, where))
    member = roster.by_key(sha)
    if member is None:
        raise RosterError(f"{where}: site key of {name} is not on the roster; add it to the roster "
                          "(deploy/make-roster.sh) or remove it from --auth-keys")
    if member.name != name:
        raise RosterError(f"{where}: this key is site {member.name}'s on the roster, not {name}'s; rename the key "
                          f"file to {member.name}.pub")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make-roster.sh", description="Write the consortium roster (roster.json).")
    p.add_argument("--out", type=Path, required=True, help="the roster file to write (e.g. roster.json)")
    p.add_argument("--ca", type=Path, required=True, help="the federation's ca.crt (deploy/make-certs.sh)")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.add_argument("keys", nargs="+", type=Path, metavar="SITE.pub", help="each site's SuperNode public key")
    args = p.parse_args(argv)
    try:
        if args.out.exists() and not args.force:
            raise RosterError(f"{args.out} already exists; pass --force to replace it")
        content = make_roster(args.ca, args.keys)
    except RosterError as err:
        print(f"make-roster.sh: error: {err}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    print(f"wrote {args.out}: {len(content['sites'])} sites ({', '.join(content['sites'])}), CA sha256 "
          f"{content['ca_sha256']}; roster sha256 {content_digest(content)} (give every site and the coordinator "
          "this file and compare this digest with them out of band)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
