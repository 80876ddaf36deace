"""``nearl-client``: join a hospital site to a NEARL federation.

    nearl-client --site siteA --data /path/to/site [--server host:port] [--certs DIR | --insecure]
                 [--auth-key KEY] [--config X] [--port P] [--device auto|cpu|cuda]
                 [--connect-timeout S]

First the site folder is checked exactly like ``nearl check-data`` (layout, class
folders, every image decodes); a folder that fails never joins.  Then the coordinator
must answer on its port within ``--connect-timeout`` seconds, and this process becomes
a Flower SuperNode (``exec``) with the site passed as node config; the SuperNode gives
up after the same time when the coordinator becomes unreachable later (Flower's
``--max-wait-time``), instead of retrying for ever.  Images stay on this machine: the
ClientApp sends only adapter tensors and scalar metrics, and its egress check refuses
anything else.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

from nearl_core.errors import NearlError

PROG = "nearl-client"
DEFAULT_CONNECT_TIMEOUT = 180.0  # seconds: long enough for a coordinator restart, short enough to notice


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Join a NEARL federation as a hospital site (Flower SuperNode).")
    p.add_argument("--site", required=True, help="short site name (letters, digits, _ . -), shown in MLflow")
    p.add_argument("--data", required=True, type=Path, help="the site's image folder (train/val[/test] or manifest.csv)")
    p.add_argument("--server", default="127.0.0.1:9092", help="coordinator address host:port (default 127.0.0.1:9092)")
    tls = p.add_mutually_exclusive_group()
    tls.add_argument("--certs", type=Path, help="folder holding the federation's ca.crt (from the coordinator)")
    tls.add_argument("--insecure", action="store_true", help="no TLS (loopback tests only)")
    p.add_argument("--auth-key", type=Path, default=None,
                   help="this site's private key (deploy/make-site-key.sh); its .pub must be registered at the server")
    p.add_argument("--config", default="demo",
                   help="the federation's NEARL config (for the class list checked here; default demo)")
    p.add_argument("--port", type=int, default=None,
                   help="local port of this node's app runtime (default: a free port)")
    p.add_argument("--device", default=None, help="auto (default: GPU when available), cpu, cuda, cuda:N, mps")
    p.add_argument("--pretrained", default=None, help="local path of the backbone weights, if the config uses a file")
    p.add_argument("--max-epsilon", type=float, default=None,
                   help="this site's own DP budget ceiling; the server's config can lower it, never raise it")
    p.add_argument("--state-dir", type=Path, default=None,
                   help="this site's state: DP ledger and audit trail (default ~/.nearl/sites/SITE/state)")
    p.add_argument("--connect-timeout", type=float, default=DEFAULT_CONNECT_TIMEOUT, metavar="S",
                   help="seconds to wait for the coordinator, at start and after a later outage, before "
                        f"giving up with an error (default {DEFAULT_CONNECT_TIMEOUT:g})")
    p.add_argument("--check-only", action="store_true", help="validate the site folder and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["audit"]:
        return audit_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        cmd, env = prepare(args)
        if args.check_only:
            return 0
        wait_for_coordinator(args.server, args.connect_timeout)
    except NearlError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    print(f"{PROG}: site {args.site} joining {args.server} ({'INSECURE, no TLS' if args.insecure else 'TLS'}"
          f"{', authenticated' if args.auth_key else ''})", flush=True)
    sys.stdout.flush()
    os.execvpe(cmd[0], cmd, env)  # this process becomes the SuperNode
    return 0  # pragma: no cover


def prepare(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """Validate everything, return the SuperNode command and environment."""
    from client.egress import valid_site_name
    from nearl_core.config import load_config
    from nearl_core.workflows import check_data
    from nearl_protocol import processes as flower

    if not valid_site_name(args.site):
        raise NearlError(f"--site {args.site!r}: use 1-64 letters, digits, '_', '.' or '-' (e.g. siteA)")
    split_server(args.server)
    if not args.connect_timeout > 0:  # also refuses nan
        raise NearlError(f"--connect-timeout {args.connect_timeout}: give a positive number of seconds, e.g. 180")
    data = args.data.expanduser().resolve()
    overrides = {"model.pretrained": args.pretrained} if args.pretrained else {}
    cfg = load_config(args.config, overrides)
    if not cfg.task.classes:
        raise NearlError(f"config {args.config}: names no task.classes; use the federation's config file")
    check_data(data, cfg)  # same checks as `nearl check-data`; raises DataError for a bad folder
    certs = None
    if not args.insecure:
        certs = flower.Certs((args.certs or Path("deploy/secrets/certs")).expanduser().resolve())
        try:
            certs.check(server=False)
        except flower.FlowerError as err:
            raise NearlError(str(err)) from None
    auth_key = None
    if args.auth_key is not None:
        auth_key = args.auth_key.expanduser().resolve()
        if not auth_key.is_file():
            raise NearlError(f"--auth-key {auth_key} not found; make one with deploy/make-site-key.sh {args.site}")
        if certs is None:
            raise NearlError("--auth-key needs TLS: drop --insecure and pass --certs DIR")
    home = Path(os.environ.get("NEARL_CLIENT_HOME", Path.home() / ".nearl" / "sites" / args.site)).expanduser()
    print(f"{PROG}: backbone fingerprint {backbone_fingerprint_of(cfg)}", flush=True)
    state_dir = (args.state_dir.expanduser() if args.state_dir else home / "state").resolve()
    node_config = {"site": args.site, "data-path": str(data), "state-dir": str(state_dir),
                   "coordinator": args.server}
    if args.device:
        node_config["device"] = args.device
    if args.pretrained:
        node_config["pretrained"] = str(Path(args.pretrained).expanduser().resolve())
    if args.max_epsilon is not None:
        if args.max_epsilon <= 0:
            raise NearlError(f"--max-epsilon {args.max_epsilon}: give a positive budget, e.g. --max-epsilon 3")
        node_config["max-epsilon"] = float(args.max_epsilon)
    cmd = flower.supernode_command(superlink=args.server, port=args.port or flower.free_port(),
                                   node_config=node_config, certs=certs, auth_key=auth_key)
    cmd += ["--max-wait-time", f"{args.connect_timeout:g}"]  # later outages: Flower's own bounded retry
    env = flower.flower_env(os.environ.get("FLWR_HOME") or home / "flwr")
    Path(env["FLWR_HOME"]).mkdir(parents=True, exist_ok=True)
    return cmd, env


def backbone_fingerprint_of(cfg) -> str:
    """Build the site's frozen backbone once, as a message would, and return its fingerprint.

    The coordinator sends its own with every instruction; a site whose backbone differs
    refuses to train (``backbone mismatch``).  Printing it at start-up lets both sides compare.
    """
    from nearl_core.backbone import build_backbone
    from nearl_core.fingerprint import backbone_fingerprint

    backbone = build_backbone(cfg.model)
    return backbone_fingerprint(backbone.clip, backbone.name, backbone.source)


def audit_main(argv: list[str]) -> int:
    """``nearl-client audit --state-dir DIR [--json]``: what this site sent, per run."""
    import json

    from client import audit

    p = argparse.ArgumentParser(prog=f"{PROG} audit", description="Summarise a site's audit trail per run.")
    p.add_argument("--state-dir", type=Path, required=True, help="the site's state dir (holds audit.jsonl)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    args = p.parse_args(argv)
    try:
        runs = audit.summarise(audit.read_lines(args.state_dir.expanduser() / "audit.jsonl"))
    except (OSError, ValueError) as err:
        print(f"{PROG} audit: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(runs, indent=2) if args.json else audit.format_summary(runs))
    return 0


def split_server(server: str) -> tuple[str, int]:
    """``host:port`` (IPv6 as ``[::1]:9092``) as a (host, port) pair; NearlError otherwise."""
    host, sep, port = server.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise NearlError(f"--server {server!r}: expected host:port, e.g. fl.hospital.org:9092")
    return host.removeprefix("[").removesuffix("]"), int(port)


def wait_for_coordinator(server: str, timeout: float, *, interval: float = 1.0) -> None:
    """Return once a TCP connection to ``server`` opens; NearlError after ``timeout`` seconds.

    Flower's SuperNode, by default, retries an unreachable SuperLink for ever and logs
    every try; a wrong address or a closed firewall port is then a process that never
    ends.  A plain connect before the ``exec`` turns that into one line naming the
    address.  It waits rather than trying once, so sites may start before the server.
    """
    host, port = split_server(server)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(10.0, max(0.1, deadline - time.monotonic()))):
                return
        except OSError as err:
            reason = err.strerror or str(err) or type(err).__name__
        left = deadline - time.monotonic()
        if left <= 0:
            raise NearlError(
                f"the coordinator at {server} could not be reached within {timeout:g}s ({reason}); check --server, "
                f"that nearl-server is running there, and that a firewall lets this machine reach port {port}"
            )
        time.sleep(min(interval, left))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
