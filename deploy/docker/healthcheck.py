"""Health check of a NEARL container: ``python healthcheck.py coordinator|site|mlflow [--wait SECONDS]``.

Reads the same NEARL_* variables as deploy/run/*.sh, so the image HEALTHCHECK, compose,
Kubernetes probes and deploy/local-stack.sh all check the same endpoint:

- coordinator: ``/health`` on the coordinator's port (``NEARL_PORT``) over TLS, verified with
  the federation CA (``NEARL_CERTS/ca.crt``; the server certificate always covers 127.0.0.1):
  nearl-server's Fleet proxy forwards it to the SuperLink on loopback, so both are checked;
- site: the local SuperNode runtime API's ``/health`` (``NEARL_NODE_PORT``, default 9094) and
  the site's supervisor: its ``status.json`` under ``$NEARL_CLIENT_HOME/state/runtime`` is
  fresh, names live supervisor, SuperNode and (warm site) worker processes, and the site has
  not been without its coordinator for longer than its ``--connect-timeout`` (180 s when it
  has none): the same check as ``nearl-client health --state-dir DIR`` (client/health.py);
- mlflow: the tracking server's ``/health`` (``NEARL_MLFLOW_PORT``, default 5000).

Exit 0 when healthy, 1 otherwise (one line saying why), 2 for a bad argument.
"""

from __future__ import annotations

import os
import ssl
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def target(role: str) -> tuple[str, ssl.SSLContext | None]:
    if role == "coordinator":
        ca = Path(os.environ.get("NEARL_CERTS", "/run/nearl/certs")) / "ca.crt"
        if not ca.is_file():
            raise SystemExit(f"healthcheck: {ca} not found (NEARL_CERTS)")
        return f"https://127.0.0.1:{os.environ.get('NEARL_PORT', '9092')}/health", ssl.create_default_context(
            cafile=str(ca))
    if role == "site":
        return f"http://127.0.0.1:{os.environ.get('NEARL_NODE_PORT', '9094')}/health", None
    if role == "mlflow":
        return f"http://127.0.0.1:{os.environ.get('NEARL_MLFLOW_PORT', '5000')}/health", None
    print(f"healthcheck: unknown role {role!r}; use coordinator, site or mlflow", file=sys.stderr)
    raise SystemExit(2)


def probe(url: str, context: ssl.SSLContext | None) -> str | None:
    """None when healthy, else the reason."""
    try:
        with urllib.request.urlopen(url, timeout=5, context=context) as resp:
            return None if resp.status == 200 else f"HTTP {resp.status}"
    except (urllib.error.URLError, OSError) as err:
        return str(getattr(err, "reason", err))


def site_problem() -> str | None:
    """None when client/health.py finds nothing wrong, or there is no status file yet (a site of an older NEARL)."""
    home = Path(os.environ.get("NEARL_CLIENT_HOME", "/var/lib/nearl/site"))
    path = home / "state" / "runtime" / "status.json"
    if not path.is_file():
        return None
    try:
        from client import health
    except ImportError as err:
        return f"cannot import client.health ({err}); run this check with the site's Python"
    status, why = health.read_status(path)
    if status is None:
        return why
    found = health.problems(status, time.time())
    return ", ".join(found) if found else None


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    wait = 0.0
    if len(argv) == 3 and argv[1] == "--wait":
        wait = float(argv[2])
    elif len(argv) != 1:
        print("healthcheck: usage: healthcheck.py coordinator|site|mlflow [--wait SECONDS]", file=sys.stderr)
        return 2
    url, context = target(argv[0])
    deadline = time.monotonic() + wait
    while True:
        reason = probe(url, context)
        if reason is None and argv[0] == "site":
            reason = site_problem()
        if reason is None:
            print(f"healthcheck: {argv[0]} healthy ({url})")
            return 0
        if time.monotonic() >= deadline:
            print(f"healthcheck: {argv[0]} not healthy at {url}: {reason}", file=sys.stderr)
            return 1
        time.sleep(1.0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
