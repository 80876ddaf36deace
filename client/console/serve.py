"""``nearl-client console --state-dir DIR [--host 127.0.0.1] [--port 8765]``: serve the site's console.

Loopback by default, where only this machine's own users reach it.  Bound to any other
address it makes a token (printed once, with the URL to open, and kept in
``<state-dir>/console-token``, mode 0600) and refuses every request without it.  The
console reads the state dir only and writes nothing there but the operator's decisions.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import secrets
import sys
from pathlib import Path

TOKEN_FILE = "console-token"
DEFAULT_PORT = 8765


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def write_token(state_dir: Path) -> str:
    """A fresh token in ``<state-dir>/console-token`` (0600): a restarted console invalidates old links."""
    token = secrets.token_urlsafe(24)
    path = state_dir / TOKEN_FILE
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    return token


def console_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="nearl-client console",
                                description="Serve the site's console: status, approvals, what left the site, "
                                            "the privacy ledger, the site's data and the verdict.")
    p.add_argument("--state-dir", type=Path, required=True, help="the site's state dir (as given to nearl-client)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; any other address requires the printed token)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    args = p.parse_args(argv)
    state_dir = args.state_dir.expanduser().resolve()
    if not state_dir.is_dir():
        print(f"nearl-client console: error: --state-dir {state_dir} is not a folder; give the site's state dir "
              "(nearl-client --state-dir, default ~/.nearl/sites/SITE/state)", file=sys.stderr)
        return 2
    import uvicorn

    from client.console.app import ConsoleSettings, create_app

    token = None if is_loopback(args.host) else write_token(state_dir)
    shown = f"[{args.host}]" if ":" in args.host and not args.host.startswith("[") else args.host
    url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else shown}:{args.port}/"
    if token:
        print(f"nearl-client console: open {url}?token={token} (the token is also in {state_dir / TOKEN_FILE}; "
              "every request without it is refused)", flush=True)
    else:
        print(f"nearl-client console: open {url} (loopback only; --host ADDRESS serves others, with a token)",
              flush=True)
    uvicorn.run(create_app(ConsoleSettings(state_dir, token)), host=args.host.strip("[]"), port=args.port,
                log_level="warning", access_log=False, server_header=False)
    return 0
