"""A site's own policy: what this hospital agrees to, whatever the coordinator asks.

``nearl-client --policy FILE`` reads a small YAML file (kebab-case keys, see
``deploy/site-policy.example.yaml``) once at start; an unknown key or a bad value stops
the client in one line.  The site worker then holds every message of every run to it
(:mod:`client.gate`), *before* any data is read: the coordinator's resolved NEARL config,
its local epochs and rounds, secure aggregation, the size of what would leave.  A
coordinator that changes its config in the middle of a run meets the same checks on its
next message.  The epsilon ceiling is not a policy key: it stays ``--max-epsilon``, which
the site's DP ledger already enforces.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from nearl_core.config_checks import METHODS
from nearl_core.errors import ConfigError
from nearl_protocol import keys
from nearl_protocol import secagg as sa

APPROVAL = ("auto", "manual")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
POLICY_PREFIX = keys.SITE_POLICY  # every policy refusal starts with it: the coordinator shows it as the site's say


class PolicyError(ConfigError):
    """The policy file is unreadable, names an unknown key or holds a bad value."""


@dataclass(frozen=True)
class SitePolicy:
    """What this site agrees to; None: no limit of that kind."""

    methods: tuple[str, ...] | None = None
    max_rounds: int | None = None
    max_local_epochs: int | None = None
    max_finetune_epochs: int | None = None
    require_dp: bool = False
    require_secure_aggregation: bool = False
    min_secure_sites: int | None = None
    max_reply_bytes: int | None = None
    coordinator_ca_sha256: str | None = None
    approval: str = "auto"

    def to_dict(self) -> dict[str, Any]:
        """Kebab-case, as in the file (JSON-safe): kept in the worker's spec and shown by the console."""
        return {k.replace("_", "-"): (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "site policy") -> "SitePolicy":
        return parse_policy(raw, source)


def _positive_int(value: Any, key: str, source: str, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PolicyError(f"{source}: {key} must be a whole number >= {minimum}, got {value!r}; fix the file")
    return value


def _flag(value: Any, key: str, source: str) -> bool:
    if not isinstance(value, bool):
        raise PolicyError(f"{source}: {key} must be true or false, got {value!r}; fix the file")
    return value


def _methods(value: Any, source: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(m, str) for m in items):
        raise PolicyError(f"{source}: methods must be a list of adapter methods, e.g. [nearl, coop]; fix the file")
    unknown = [m for m in items if m not in METHODS]
    if unknown:
        raise PolicyError(f"{source}: methods names {', '.join(map(repr, unknown))}, not an adapter method; "
                          f"use some of {', '.join(METHODS)}")
    return tuple(dict.fromkeys(items))


def _sha256(value: Any, source: str) -> str:
    text = str(value).strip().replace(":", "").lower() if isinstance(value, str) else ""
    if not SHA256.match(text):
        raise PolicyError(f"{source}: coordinator-ca-sha256 must be 64 hex digits (sha256sum ca.crt), "
                          f"got {value!r}; fix the file")
    return text


def parse_policy(raw: Mapping[str, Any], source: str = "site policy") -> SitePolicy:
    """A :class:`SitePolicy` from the file's mapping; :class:`PolicyError` names the key and the fix."""
    if not isinstance(raw, Mapping):
        raise PolicyError(f"{source}: expected a mapping of policy keys (see deploy/site-policy.example.yaml)")
    known = {k.replace("_", "-") for k in SitePolicy.__dataclass_fields__}
    unknown = [str(k) for k in raw if k not in known]
    if unknown:
        raise PolicyError(f"{source}: unknown key {', '.join(map(repr, unknown))}; known keys: "
                          f"{', '.join(sorted(known))}")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if value is None:
            continue  # an empty value: no limit of that kind
        name = key.replace("-", "_")
        if key == "methods":
            out[name] = _methods(value, source)
        elif key in ("require-dp", "require-secure-aggregation"):
            out[name] = _flag(value, key, source)
        elif key == "max-finetune-epochs":
            out[name] = _positive_int(value, key, source, minimum=0)
        elif key == "min-secure-sites":
            out[name] = _positive_int(value, key, source, minimum=2)
        elif key == "coordinator-ca-sha256":
            out[name] = _sha256(value, source)
        elif key == "approval":
            if value not in APPROVAL:
                raise PolicyError(f"{source}: approval must be auto or manual, got {value!r}; fix the file")
            out[name] = value
        else:
            out[name] = _positive_int(value, key, source)
    return SitePolicy(**out)


def load_policy(path: Path) -> SitePolicy:
    """Read ``--policy FILE``; every problem is one :class:`PolicyError` line."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise PolicyError(f"--policy {path}: cannot read it ({err.strerror or err}); give the site policy file") from None
    except yaml.YAMLError as err:
        raise PolicyError(f"--policy {path}: not valid YAML ({str(err).splitlines()[0]}); fix the file") from None
    return parse_policy(raw or {}, f"site policy {path}")


# -- checks against what the coordinator asks -------------------------------------------------------------
def config_problem(policy: SitePolicy, asked: Mapping[str, Any]) -> str | None:
    """Why the run's asked config (:func:`client.approvals.asked_config`) breaks the policy, or None."""
    nearl = asked.get("nearl-config") or {}
    method = (nearl.get("adapter") or {}).get("method")
    if policy.methods is not None and method not in policy.methods:
        return f"adapter.method {method!r} is not one this site allows ({', '.join(policy.methods)})"
    rounds, epochs = asked.get(keys.TOTAL_ROUNDS), asked.get(keys.LOCAL_EPOCHS)
    if policy.max_rounds is not None and int(rounds or 0) > policy.max_rounds:
        return f"{rounds} rounds asked, this site agrees to at most {policy.max_rounds} (max-rounds)"
    if policy.max_local_epochs is not None and int(epochs or 0) > policy.max_local_epochs:
        return f"{epochs} local epochs per round asked, this site agrees to at most {policy.max_local_epochs}"
    finetune = int((nearl.get("federation") or {}).get("finetune-epochs") or 0)
    if policy.max_finetune_epochs is not None and finetune > policy.max_finetune_epochs:
        return (f"federation.finetune-epochs {finetune} asked, this site agrees to at most "
                f"{policy.max_finetune_epochs}")
    if policy.require_dp and not (nearl.get("privacy") or {}).get("enabled"):
        return "the run trains without differential privacy (privacy.enabled false); this site requires DP-SGD"
    return None


def train_problem(policy: SitePolicy, secagg_record: Mapping[str, Any] | None, reply_bytes: int) -> str | None:
    """Why a train instruction breaks the policy beyond its config: no secure aggregation, too few sites in
    its secure sum, a reply larger than allowed (``reply_bytes``: what it would carry back)."""
    if policy.require_secure_aggregation and secagg_record is None:
        return "the round has no secure aggregation; this site sends its update only masked (require-secure-aggregation)"
    if secagg_record is not None:
        sources = secagg_record.get(keys.SECAGG_PARTICIPANTS) or []
        problem = secure_sites_problem(policy, len(sources) + 1, "its mask partners and itself")
        if problem:
            return problem
    return reply_problem(policy, reply_bytes)


def reply_problem(policy: SitePolicy, reply_bytes: int) -> str | None:
    if policy.max_reply_bytes is not None and reply_bytes > policy.max_reply_bytes:
        return (f"the reply would carry {reply_bytes:,} bytes, this site sends at most {policy.max_reply_bytes:,} "
                "(max-reply-bytes)")
    return None


def secure_sites_problem(policy: SitePolicy, count: int, who: str) -> str | None:
    if policy.min_secure_sites is not None and count < policy.min_secure_sites:
        return (f"the secure sum would hold {count} sites ({who}); this site's policy needs at least "
                f"{policy.min_secure_sites} (min-secure-sites)")
    return None


def stage_problem(policy: SitePolicy, record: Mapping[str, Any] | None) -> str | None:
    """A secure-aggregation stage: how many sites its sum would hold (setup: sampled; unmask: active)."""
    if record is None:
        return None
    stage = record.get(keys.SECAGG_STAGE)
    if stage == sa.SETUP:
        return secure_sites_problem(policy, int(record.get(keys.SECAGG_SITES) or 0), "sites sampled")
    if stage == sa.UNMASK:
        return secure_sites_problem(policy, len(record.get(keys.SECAGG_ACTIVE) or []), "sites still in the round")
    return None


# -- the coordinator's CA ---------------------------------------------------------------------------------
def ca_fingerprints(ca_file: Path) -> list[str]:
    """The sha256 of the CA file's bytes (``sha256sum ca.crt``), then of its certificate (``openssl x509
    -fingerprint -sha256``, colons dropped): either may be pinned."""
    data = ca_file.read_bytes()
    out = [hashlib.sha256(data).hexdigest()]
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes

        out.append(x509.load_pem_x509_certificate(data).fingerprint(hashes.SHA256()).hex())
    except ValueError:
        pass  # not PEM: the file hash alone
    return out


def check_ca(policy: SitePolicy, ca_file: Path | None) -> None:
    """At start: the coordinator's CA must be the one the site was given (``coordinator-ca-sha256``)."""
    if policy.coordinator_ca_sha256 is None:
        return
    if ca_file is None:
        raise PolicyError("the site policy pins coordinator-ca-sha256 but --insecure uses no CA; pass --certs DIR")
    try:
        found = ca_fingerprints(ca_file)
    except OSError as err:
        raise PolicyError(f"cannot read {ca_file} ({err.strerror or err}); pass --certs DIR with the CA") from None
    if policy.coordinator_ca_sha256 not in found:
        raise PolicyError(f"{ca_file} has sha256 {found[0]}, not the coordinator-ca-sha256 of the site "
                          "policy; ask the coordinator for the CA you were given, or fix the policy")
