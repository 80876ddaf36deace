"""Which Flower app bundles (FABs) a site's worker accepts.

A warm site never runs code from the bundle: it answers with its own installed handlers.
It still refuses a run unless

* the bundle is a NEARL app: ``[tool.flwr.app] publisher = "nearl"``, ``[project] name =
  "nearl-federated"`` and the components ``client.app:app`` / ``server.app:app``, and
* its sha256 is one the site accepts: by default the hash of the FAB built from the
  site's own installed code (the FAB ``nearl-server`` submits when both run the same
  version), plus any given with ``nearl-client --accept-fab SHA256``.

A mismatch is refused with a one-line reason (sent to the coordinator, logged, audited).
"""

from __future__ import annotations

import hashlib
import io
import re
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

PUBLISHER = "nearl"
PROJECT = "nearl-federated"
COMPONENTS = {"clientapp": "client.app:app", "serverapp": "server.app:app"}
SHA256 = re.compile(r"^[0-9a-f]{64}$")


def valid_hash(text: str) -> bool:
    return bool(SHA256.match(text))


def fab_identity(content: bytes) -> tuple[str, str, dict[str, str]]:
    """(publisher, project name, components) from the bundle's pyproject.toml; ValueError if unreadable."""
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as zf:
            config = tomllib.loads(zf.read("pyproject.toml").decode("utf-8"))
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ValueError(f"unreadable app bundle ({type(err).__name__})") from None
    app = config.get("tool", {}).get("flwr", {}).get("app", {})
    components = app.get("components", {})
    return (str(app.get("publisher", "")), str(config.get("project", {}).get("name", "")),
            {k: str(v) for k, v in components.items()} if isinstance(components, dict) else {})


@dataclass(frozen=True)
class FabPolicy:
    accepted: frozenset[str]  # sha256 hex digests

    def problem(self, content: bytes, stated_hash: str) -> str | None:
        """Why the site refuses this bundle, or None when it accepts it."""
        actual = hashlib.sha256(content).hexdigest()
        if stated_hash and stated_hash != actual:
            return f"app bundle hash mismatch: stated {stated_hash[:16]}..., content {actual[:16]}..."
        try:
            publisher, name, components = fab_identity(content)
        except ValueError as err:
            return str(err)
        if (publisher, name, components) != (PUBLISHER, PROJECT, COMPONENTS):
            return (f"not a NEARL app: publisher={publisher or '-'} name={name or '-'} components="
                    f"{','.join(f'{k}={v}' for k, v in sorted(components.items())) or '-'}; "
                    "this site runs only its own installed NEARL code")
        if actual not in self.accepted:
            return (f"app bundle sha256 {actual} is not one this site accepts (another NEARL version?); "
                    "accept it with nearl-client --accept-fab SHA256")
        return None


# what a FAB built from the installation holds: a change to any of these is an upgrade of the site's code
INSTALLED = ("pyproject.toml", "README.md", "client", "server", "nearl_core", "nearl_protocol", "configs", "deploy")


def installation_stamp(app_dir: Path) -> str:
    """A cheap digest (names, sizes, mtimes) of the installed NEARL code: it changes when the site upgrades.

    The site worker compares it between messages; hashing the files themselves (a FAB build)
    would cost a second per check.
    """
    digest = hashlib.sha256()
    for top in INSTALLED:
        root = app_dir / top
        paths = sorted(root.rglob("*")) if root.is_dir() else [root]
        for path in paths:
            if "__pycache__" in path.parts or not path.is_file():
                continue
            st = path.stat()
            digest.update(f"{path.relative_to(app_dir)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def own_fab_hash(app_dir: Path) -> str | None:
    """The sha256 of the FAB built from this installation (None when it is not a source tree)."""
    from client import flower_internals

    if not (app_dir / "pyproject.toml").is_file():
        return None
    return flower_internals.fab_sha256(flower_internals.build_fab(app_dir))
