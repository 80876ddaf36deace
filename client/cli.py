"""``nearl-client``: join a hospital site to a NEARL federation.

    nearl-client --site siteA --data /path/to/site [--server host:port] [--certs DIR | --insecure]
                 [--auth-key KEY [--roster FILE [--min-secure-sites N]]] [--config X] [--port P]
                 [--device auto|cpu|cuda] [--connect-timeout S] [--cold | --accept-fab SHA256 ...]
                 [--policy FILE]

By default the site is *warm*: the SuperNode runs with process isolation and one
long-lived site worker (:mod:`client.worker`) answers every message with this
installation's own NEARL code, refusing app bundles other than its own (``--accept-fab
SHA256`` adds one); the backbone stays built between messages.  ``--cold`` keeps Flower's
stock execution: a new process per message, running the code in the coordinator's app
bundle.  Either way this process becomes the site's supervisor (:mod:`client.supervisor`),
which starts and watches the SuperNode (and the worker).  ``--policy FILE`` says what this
site agrees to (:mod:`client.policy`); the warm worker holds every message to it.  The
operator's commands (``audit``, ``health``, ``approvals``, ``approve``, ``refuse``,
``console``) live in :mod:`client.site_cli`; ``health`` is the site's health check
(:mod:`client.health`).

First the site folder is checked exactly like ``nearl check-data`` (layout, class
folders, every image decodes); a folder that fails never joins (exit 2).  Then the
coordinator must answer on its port, and the supervisor keeps the site's one rule about
its connection (:mod:`client.connection`): it reconnects while it runs, but spends no
more than ``--connect-timeout`` seconds in a row without its coordinator (at start or
after a later outage); past that it exits with status 69 and one line, so that its
service manager starts it again.  ``--connect-timeout 0`` reconnects for as long as the
site runs.  Images stay on this machine: the ClientApp sends only adapter tensors and
scalar metrics, and its egress check refuses anything else.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from client.connection import (EXIT_DISCONNECTED, CoordinatorUnreachable, describe_limit, limit_of, split_server,
                               wait_for_coordinator)
from nearl_core import flags
from nearl_core.errors import NearlError

PROG = "nearl-client"
SUBCOMMANDS = ("audit", "health", "approvals", "approve", "refuse", "console")  # client/site_cli.py
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
    p.add_argument("--roster", type=Path, default=None, metavar="FILE",
                   help="the consortium roster (deploy/make-roster.sh): in secure rounds this site signs its keys "
                        "with --auth-key and uses only peers on the roster whose signatures verify; without it the "
                        "site trusts the coordinator's list of peers (honest-but-curious coordinator only)")
    p.add_argument("--min-secure-sites", type=int, default=None, metavar="N",
                   help="refuse a secure round with fewer than N roster members, or whose sum would cover fewer "
                        "than N sites' updates (default 3; needs --roster)")
    p.add_argument("--config", default=None,
                   help="the federation's NEARL config, for the class list checked here (default: the folders' "
                        "classes; the coordinator's config decides them when a run starts)")
    p.add_argument("--port", type=int, default=None,
                   help="local port of this node's app runtime (default: a free port)")
    flags.add_device_flag(p)
    p.add_argument("--pretrained", default=None, help="local path of the backbone weights, if the config uses a file")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for training (default: torch's, one per core); when several sites share "
                        "one machine give each cores/sites, else their threads contend and rounds slow down")
    p.add_argument("--max-epsilon", type=float, default=None,
                   help="this site's own DP budget ceiling; the server's config can lower it, never raise it")
    p.add_argument("--state-dir", type=Path, default=None,
                   help="this site's state: DP ledger and audit trail (default ~/.nearl/sites/SITE/state)")
    p.add_argument("--connect-timeout", type=float, default=DEFAULT_CONNECT_TIMEOUT, metavar="S",
                   help="seconds in a row without the coordinator, at start or after a later outage, after which "
                        f"the site exits with status {EXIT_DISCONNECTED} so that its service manager restarts it "
                        f"(default {DEFAULT_CONNECT_TIMEOUT:g}; 0: keep reconnecting for as long as it runs)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--warm", dest="cold", action="store_false",
                      help="(default) one long-lived site worker answers every message with this site's installed "
                           "NEARL code; the backbone stays built between messages")
    mode.add_argument("--cold", action="store_true",
                      help="Flower's stock execution: a new process per message, running the code the coordinator "
                           "sends in its app bundle")
    p.set_defaults(cold=False)
    p.add_argument("--accept-fab", action="append", default=[], metavar="SHA256",
                   help="also accept runs of this app bundle hash (default: only the bundle built from this "
                        "installation); repeatable")
    p.add_argument("--policy", type=Path, default=None, metavar="FILE",
                   help="this site's policy (YAML, deploy/site-policy.example.yaml): the methods, rounds, epochs, "
                        "DP, secure aggregation and reply size it agrees to, and whether a person approves each run")
    p.add_argument("--check-only", action="store_true", help="validate the site folder and exit")
    p.add_argument("--no-local-baseline", dest="local_baseline", action="store_false",
                   help="the site's verdict after each run (<state-dir>/reports/) leaves out the local-only model "
                        "it would otherwise train once per data and config (docs/site-verdict.md)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["verify"]:
        from client.verify import main as verify_main

        return verify_main(argv[1:])
    if argv[:1] and argv[0] in SUBCOMMANDS:
        from client import site_cli

        return site_cli.main(argv)
    args = build_parser().parse_args(argv)
    try:
        cmd, env = prepare(args)
        if args.check_only:
            return 0
        wait_for_coordinator(args.server, args.connect_timeout)
    except CoordinatorUnreachable as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return EXIT_DISCONNECTED
    except NearlError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    how = ("cold: every message runs in a new process with the code the coordinator sends in its app bundle"
           if args.cold else "warm: one site worker runs this site's installed NEARL code for every message")
    print(f"{PROG}: site {args.site} joining {args.server} ({'INSECURE, no TLS' if args.insecure else 'TLS'}"
          f"{', authenticated' if args.auth_key else ''}; {how}; {describe_limit(limit_of(args.connect_timeout))})",
          flush=True)
    if args.roster is None:
        print(f"{PROG}: warning: no --roster: in secure-aggregation rounds this site trusts the coordinator's list "
              "of peers, which protects its update from an honest-but-curious coordinator only (docs/security.md)",
              flush=True)
    try:
        cmd = supervisor_command(args, cmd, env)
    except NearlError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    sys.stdout.flush()
    os.execvpe(cmd[0], cmd, env)  # this process becomes the site's supervisor
    return 0  # pragma: no cover


def prepare(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """Validate everything, return the SuperNode command and environment."""
    from client.egress import valid_site_name
    from client.fab_check import valid_hash
    from nearl_core.config import load_config
    from nearl_core.site_check import check_data
    from nearl_protocol import processes as flower

    if not valid_site_name(args.site):
        raise NearlError(f"--site {args.site!r}: use 1-64 letters, digits, '_', '.' or '-' (e.g. siteA)")
    split_server(args.server)
    if not args.connect_timeout >= 0:  # also refuses nan
        raise NearlError(f"--connect-timeout {args.connect_timeout}: give a number of seconds, e.g. 180 "
                         "(0: no limit)")
    threads = thread_env(args.threads)
    data = args.data.expanduser().resolve()
    overrides = {"model.pretrained": args.pretrained} if args.pretrained else {}
    cfg = load_config(flags.config_name(args), overrides)
    if args.config is None:
        cfg = cfg.with_classes(())  # the folders' classes now; the coordinator's config names them per run
    elif not cfg.task.classes:
        raise NearlError(f"config {args.config}: names no task.classes; use the federation's config file")
    site_data = check_data(data, cfg)  # same checks as `nearl check-data`; raises DataError for a bad folder
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
    roster = check_roster(args, auth_key, certs)
    home = Path(os.environ.get("NEARL_CLIENT_HOME", Path.home() / ".nearl" / "sites" / args.site)).expanduser()
    if args.cold or args.check_only:  # a warm site's worker builds it once and prints it (client/worker.py)
        print(f"{PROG}: backbone fingerprint {backbone_fingerprint_of(cfg)}", flush=True)
    state_dir = (args.state_dir.expanduser() if args.state_dir else home / "state").resolve()
    args.state_dir_resolved = state_dir
    node_config = {"site": args.site, "data-path": str(data), "state-dir": str(state_dir),
                   "coordinator": args.server}
    if args.device:
        node_config["device"] = args.device
    if not args.local_baseline:
        node_config["local-baseline"] = False
    if args.pretrained:
        node_config["pretrained"] = str(Path(args.pretrained).expanduser().resolve())
    if roster is not None:
        node_config.update({"roster": str(roster), "auth-key": str(auth_key)})
        if args.min_secure_sites is not None:
            node_config["min-secure-sites"] = args.min_secure_sites
    if args.max_epsilon is not None:
        if args.max_epsilon <= 0:
            raise NearlError(f"--max-epsilon {args.max_epsilon}: give a positive budget, e.g. --max-epsilon 3")
        node_config["max-epsilon"] = float(args.max_epsilon)
    args.policy_dict = site_policy(args, certs)
    if args.policy_dict and args.policy_dict.get("max-reply-bytes"):
        node_config["max-reply-bytes"] = int(args.policy_dict["max-reply-bytes"])
    from client.site_state import site_facts, write_site_facts

    write_site_facts(state_dir, site_facts(args.site, data, site_data, max_epsilon=args.max_epsilon,
                                           policy=args.policy_dict, coordinator=args.server))
    for digest in args.accept_fab:
        if not valid_hash(digest):
            raise NearlError(f"--accept-fab {digest!r}: give the app bundle's sha256 as 64 lowercase hex digits")
    args.runtime_dir = state_dir / "runtime"  # the warm site's secret, spec, task-in-hand and status files
    cmd = flower.supernode_command(superlink=args.server, port=args.port or flower.free_port(),
                                   node_config=node_config, certs=certs, auth_key=auth_key,
                                   secret_file=None if args.cold else args.runtime_dir / f"secret-{os.getpid()}")
    # flower-supernode's arguments, run by client.supernode: a SuperNode that ends with its connection.  No
    # --max-wait-time: Flower retries (capped at 20 s) and the supervisor enforces --connect-timeout.
    cmd = [sys.executable, "-m", "client.supernode", *cmd[1:]]
    env = flower.flower_env(os.environ.get("FLWR_HOME") or home / "flwr", threads)
    Path(env["FLWR_HOME"]).mkdir(parents=True, exist_ok=True)
    return cmd, env


def site_policy(args: argparse.Namespace, certs) -> dict | None:
    """``--policy FILE`` read and checked at start (its CA pin against ``--certs``); None without it.

    The warm site worker enforces it; under ``--cold`` the coordinator's own code would answer the
    messages, so a policy there would be a promise nobody keeps: refused.
    """
    if args.policy is None:
        return None
    from client.policy import check_ca, load_policy

    policy = load_policy(args.policy.expanduser())
    if args.cold:
        raise NearlError("--policy needs the warm site worker, which enforces it; under --cold the coordinator's "
                         "app bundle answers every message: drop --cold")
    check_ca(policy, certs.ca if certs is not None else None)
    print(f"{PROG}: site policy {args.policy}: approval {policy.approval}"
          f"{', methods ' + ', '.join(policy.methods) if policy.methods else ''}", flush=True)
    return policy.to_dict()


def check_roster(args: argparse.Namespace, auth_key: Path | None, certs) -> Path | None:
    """``--roster`` and ``--min-secure-sites`` at start (:func:`client.secagg_auth.pin_roster`); the roster's path."""
    from client.secagg_auth import DEFAULT_MIN_SITES as DEFAULT_MIN_SECURE_SITES, pin_roster
    from nearl_protocol.roster import RosterError

    if args.roster is None:
        if args.min_secure_sites is not None:
            raise NearlError("--min-secure-sites counts roster members: give the consortium roster with --roster FILE")
        return None
    if auth_key is None:
        raise NearlError("--roster needs this site's --auth-key KEY: the site signs its secure-aggregation keys "
                         "with it")
    path = args.roster.expanduser().resolve()
    try:
        roster = pin_roster(path, args.site, auth_key, certs.ca if certs is not None else None)
    except RosterError as err:
        raise NearlError(str(err)) from None
    if args.min_secure_sites is not None and not 2 <= args.min_secure_sites <= len(roster.members):
        raise NearlError(f"--min-secure-sites {args.min_secure_sites}: give 2 to {len(roster.members)} (the roster's "
                         "sites), e.g. 3")
    print(f"{PROG}: roster {path}: {len(roster.members)} sites, sha256 {roster.digest} (compare it with the "
          "consortium's)", flush=True)
    if args.min_secure_sites is None and len(roster.members) < DEFAULT_MIN_SECURE_SITES:
        print(f"{PROG}: warning: the roster names {len(roster.members)} sites, fewer than the default "
              f"--min-secure-sites {DEFAULT_MIN_SECURE_SITES}: this site will refuse every secure round", flush=True)
    return path


def thread_env(threads: int | None) -> dict[str, str]:
    """``--threads N`` as the variables torch's and BLAS's thread pools read at start.

    Set in the environment of everything nearl-client starts (SuperNode, supervisor, worker,
    cold ClientApps), so the worker and every cold process use the same count.
    """
    if threads is None:
        return {}
    if threads < 1:
        raise NearlError(f"--threads {threads}: give a positive number of CPU threads, e.g. --threads 2")
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def supervisor_command(args: argparse.Namespace, supernode_cmd: list[str], env: dict[str, str]) -> list[str]:
    """Write the site's spec (0600, in a 0700 folder); return the command of its supervisor.

    The spec holds what the supervisor needs to run the SuperNode and keep the connection
    rule; a warm site's adds what its worker needs (:func:`warm_spec`).
    """
    from client.worker import write_private_json

    runtime = args.runtime_dir
    runtime.mkdir(parents=True, exist_ok=True)
    os.chmod(runtime, 0o700)
    port = supernode_cmd[supernode_cmd.index("--port") + 1]
    hang = env.get("NEARL_SUPERNODE_HANG_SECONDS")
    spec = {"site": args.site, "mode": "cold" if args.cold else "warm", "runtime_address": f"127.0.0.1:{port}",
            "supernode_cmd": supernode_cmd, "coordinator": args.server,
            "connect_timeout": limit_of(args.connect_timeout), "hang_seconds": float(hang) if hang else None,
            "state_dir": str(args.state_dir_resolved)}
    if not args.cold:
        spec.update(warm_spec(args, env))
    spec_file = runtime / f"spec-{os.getpid()}.json"
    write_private_json(spec_file, spec)
    return [sys.executable, "-m", "client.supervisor", str(spec_file)]


def warm_spec(args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    """Write the warm site's secret (0600); return the worker's part of the spec.

    The SuperNode's Runtime API listens on 127.0.0.1 only, and only a holder of the secret
    may claim its tasks.
    """
    from client.fab_check import own_fab_hash
    from nearl_protocol import processes as flower

    runtime = args.runtime_dir
    pid = os.getpid()
    secret = runtime / f"secret-{pid}"
    secret.unlink(missing_ok=True)
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(os.urandom(32).hex().encode())
    try:
        own = own_fab_hash(flower.APP_DIR)
    except Exception as err:  # noqa: BLE001 - e.g. an installation without its sources
        own = None
        print(f"{PROG}: cannot build this installation's app bundle ({err})", flush=True)
    accepted = sorted({*([own] if own else []), *args.accept_fab})
    if own:
        print(f"{PROG}: this installation's app bundle sha256 {own}", flush=True)
    if not accepted:
        raise NearlError("this installation cannot build its own app bundle, so the site worker would refuse every "
                         "run: pass the coordinator's with --accept-fab SHA256, or --cold")
    return {"secret_file": str(secret), "task_file": str(runtime / f"task-{pid}.json"), "accepted_fabs": accepted,
            "config": args.config, "pretrained": str(Path(args.pretrained).expanduser().resolve())
            if args.pretrained else None, "data": str(args.data.expanduser().resolve()),
            "poll_seconds": float(env.get("NEARL_WORKER_POLL_SECONDS", "0.2")),
            "app_dir": str(flower.APP_DIR), "own_fab": own, "policy": getattr(args, "policy_dict", None)}


def backbone_fingerprint_of(cfg) -> str:
    """Build the site's frozen backbone once, as a message would, and return its fingerprint.

    The coordinator sends its own with every instruction; a site whose backbone differs
    refuses to train (``backbone mismatch``).  Printing it at start-up lets both sides compare.
    """
    from nearl_core.backbone import build_backbone
    from nearl_core.fingerprint import backbone_fingerprint

    backbone = build_backbone(cfg.model)
    return backbone_fingerprint(backbone.clip, backbone.name, backbone.source)




if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
