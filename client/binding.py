"""Which hospital this node is: the SuperNode's node config, as ``nearl-client`` wrote it.

``nearl-client --site siteA --data /data/siteA`` starts the SuperNode with
``--node-config 'site="siteA" data-path="/data/siteA" state-dir=... coordinator=...'``;
every message reads it back here.  The simulation binds its virtual sites itself
(``simulation/site_app.py``) and hands the same :class:`SiteBinding` to the handlers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from client.egress import valid_site_name
from nearl_core.errors import ConfigError


@dataclass(frozen=True)
class SiteBinding:
    site: str
    data: Path
    device: str | None = None
    pretrained: str | None = None
    state_dir: Path | None = None  # site-local state: the DP ledger and the audit trail
    max_epsilon: float | None = None  # the site's own DP ceiling (nearl-client --max-epsilon)
    coordinator: str = ""  # the address the node connects to, recorded in the audit trail
    max_reply_bytes: int | None = None  # the site policy's ceiling on one reply (nearl-client --policy)
    local_baseline: bool = True  # train the site verdict's local-only model (nearl-client --no-local-baseline)
    roster: Path | None = None  # the consortium roster this site pins (nearl-client --roster); None: no signing
    auth_key: Path | None = None  # the SuperNode private key that signs its secure-aggregation keys (with a roster)
    min_secure_sites: int | None = None  # the smallest secure round it joins (nearl-client --min-secure-sites)

    def privacy_dir(self) -> Path:
        return self.state_dir or Path.home() / ".nearl" / "sites" / self.site / "state"

    def audit_file(self) -> Path:
        return self.privacy_dir() / "audit.jsonl"


def site_binding(node_config: Mapping[str, Any]) -> SiteBinding:
    """The node config of a ``nearl-client`` SuperNode, or a one-line ConfigError naming the fix."""
    site = str(node_config.get("site", "")).strip()
    data = str(node_config.get("data-path", "")).strip()
    if not valid_site_name(site):
        raise ConfigError(f"node config site={site!r}: start the node with nearl-client --site NAME")
    if not data:
        raise ConfigError(f"site {site}: node config has no data-path; start the node with nearl-client --data DIR")
    text = {k: str(node_config.get(k, "")).strip() or None
            for k in ("device", "pretrained", "state-dir", "roster", "auth-key")}
    max_eps, min_sites = node_config.get("max-epsilon"), node_config.get("min-secure-sites")
    max_reply = node_config.get("max-reply-bytes")
    return SiteBinding(site, Path(data), text["device"], text["pretrained"],
                       Path(text["state-dir"]) if text["state-dir"] else None,
                       float(max_eps) if max_eps not in (None, "") else None,
                       str(node_config.get("coordinator", "")),
                       int(max_reply) if max_reply not in (None, "") else None,
                       str(node_config.get("local-baseline", True)).strip().lower() not in ("false", "0", "no"),
                       Path(text["roster"]) if text["roster"] else None,
                       Path(text["auth-key"]) if text["auth-key"] else None,
                       int(min_sites) if min_sites not in (None, "") else None)
