"""``nearl-server``: run a NEARL federation as its coordinator.

    nearl-server --rounds 50 [--config X] [--min-sites N] [--port P] [--local-port P] [--certs DIR | --insecure]
                 [--auth-keys DIR [--roster FILE]] [--mlflow-uri U] [--checkpoint-dir D] [--resume D]
                 [--max-body-mb MB] [--rate-limit R] [--rate-burst N] [--max-connections N] [--client-timeout S]

Starts a Flower SuperLink on 127.0.0.1 (runtime dependency installation disabled: the app
runs in this environment) and, on the public ``--host/--port``, a proxy that forwards the
SuperLink's Fleet API (what sites call) and nothing else (server/proxy.py): the Control API
(``flwr run/ls/log/stop``) and the Runtime API stay on this host. The proxy refuses bodies
larger than the run's largest message (derived from its config, server/body_bound.py) and
limits each client address's request rate, open connections and slowness. It then submits the NEARL app with ``flwr run . nearl --format json``, streams
the per-round progress the ServerApp writes, and exits 0 when the last round is done.
A run that fails (too few sites before the timeout, a crash) ends with a one-line
message and exit code 1; a wrong argument or file with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from nearl_core import flags
from nearl_core.errors import NearlError
from server import options, settings
from server.settings import FederationSettings
from server.tracking import resolve_tracking_uri
from server.events import DoneEvent, ErrorEvent, ProgressReader, select
from server.progress_view import format_event, format_summary
from server.body_bound import LimitsResolver
from server.proxy import Limits, add_limit_flags
from nearl_protocol import processes as flower
from nearl_protocol.bundle import stage
from nearl_protocol.processes import Certs, FlowerError

PROG = "nearl-server"
STATUS_OUTAGE_SECONDS = 900.0


def build_parser() -> argparse.ArgumentParser:
    """The federation settings' flags (server/options.py) and the shared NEARL flags, then this command's own."""
    p = argparse.ArgumentParser(prog=PROG, description="Coordinate a NEARL federation (Flower SuperLink + ServerApp).")
    flags.add_config_flags(p, federation_keys=True)
    options.add_federation_flags(p, settings.SERVER)
    flags.add_personalize_flags(p)
    flags.add_dp_flags(p)
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0; 127.0.0.1 = local only)")
    p.add_argument("--port", type=int, default=9092, help="port sites connect to (default 9092): serves the "
                   "Flower Fleet API only")
    p.add_argument("--local-port", type=int, default=None, metavar="PORT",
                   help="port of the SuperLink itself on 127.0.0.1 (Control API for flwr ls/log/stop, Runtime API "
                        "for the ServerApp); default: a free port, printed at start-up")
    tls = p.add_mutually_exclusive_group()
    tls.add_argument("--certs", type=Path, help="folder with ca.crt, server.pem, server.key (deploy/make-certs.sh)")
    tls.add_argument("--insecure", action="store_true", help="no TLS (loopback tests only)")
    p.add_argument("--auth-keys", type=Path, default=None,
                   help="folder of site public keys (*.pub): enables SuperNode authentication; only these sites join")
    p.add_argument("--roster", type=Path, default=None, metavar="FILE",
                   help="the consortium roster (deploy/make-roster.sh): every --auth-keys key must be on it; in secure "
                        "rounds a site whose signed keys do not verify is dropped (needs --auth-keys)")
    p.add_argument("--resume", type=Path, default=None, metavar="DIR",
                   help="continue the run checkpointed in DIR from its last complete round (same MLflow run)")
    p.add_argument("--superlink-db", type=Path, default=None, metavar="FILE",
                   help="keep the SuperLink's state in this sqlite file so connected sites survive a coordinator "
                        "restart (default: in memory; sites then rejoin by restarting nearl-client)")
    add_limit_flags(p, body_default=None)
    p.add_argument("--quiet", action="store_true", help="only the final summary")
    return p


class Interrupted(Exception):
    pass


def _on_signal(signum, frame):  # noqa: ARG001
    raise Interrupted(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    state_dir = Path(tempfile.mkdtemp(prefix="nearl-server-"))
    server = Server(args, state_dir)
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    code = 1
    try:
        code = server.run()
    except (NearlError, FlowerError, ValueError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        code = 2 if server.phase == "setup" else 1
    except Interrupted as sig:
        print(f"{PROG}: interrupted ({sig}); stopping the run. Continue it with: {PROG} --resume "
              f"{server.checkpoint_dir}", file=sys.stderr)
        code = 130
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        server.shutdown()
        if code == 0:
            shutil.rmtree(state_dir, ignore_errors=True)
        elif server.phase != "setup":
            print(f"{PROG}: logs kept in {state_dir}", file=sys.stderr)
    return code


class Server:
    def __init__(self, args: argparse.Namespace, state_dir: Path):
        self.args, self.state_dir = args, state_dir
        self.phase = "setup"
        self.superlink = None
        self.run_id: str | None = None
        self.cli_env: dict[str, str] = {}
        chosen = args.resume or args.checkpoint_dir or settings.default("checkpoint_dir")
        self.checkpoint_dir = Path(chosen).expanduser().resolve()
        self.superlink_log = state_dir / "superlink.log"
        self.proxy = None
        self.resolver: LimitsResolver | None = None
        self.limits: Limits | None = None
        self.limits_note = ""

    # -- setup checks: everything a user can get wrong fails here, before any process starts -------
    def validate(self) -> tuple[FederationSettings, Certs | None]:
        """Resolve the NEARL config and the settings from the flags; check certificates, keys and checkpoints.

        The ServerApp gets the resolved config as a file (``config``), exactly as the
        simulation hands it over, so every config key works here without a run-config
        declaration.
        """
        from nearl_core.config import load_config, resolve_config_path, write_config
        from server.checkpoint import complete_rounds, load_latest

        a = self.args
        if not (flower.APP_DIR / "pyproject.toml").is_file():
            raise NearlError(f"{flower.APP_DIR} has no pyproject.toml: run nearl-server from a NEARL source install")
        keys = options.federation_keys()
        _, federation_sets = flags.parse_set(a.overrides, keys)
        cfg = load_config(resolve_config_path(flags.config_name(a)), flags.config_overrides(a, keys))
        if not cfg.task.classes:
            raise NearlError(f"config {flags.config_name(a)} names no task.classes: a federation needs the same "
                             "list at every site; add them to the config or pass --set task.classes=A,B,C")
        config_file = write_config(cfg, self.state_dir / "nearl-config.yaml")
        roster = self.check_roster()
        fed = options.settings_from_args(
            a, settings.SERVER, federation_sets, config=str(config_file), checkpoint_dir=str(self.checkpoint_dir),
            resume=a.resume is not None, progress_file=str(self.state_dir / "progress.jsonl"), roster=roster)
        fed = replace(fed, mlflow_uri=resolve_tracking_uri(fed.mlflow_uri, os.getcwd()))
        certs = None if a.insecure else Certs((a.certs or Path("deploy/secrets/certs")).expanduser().resolve())
        if certs is not None:
            try:
                certs.check(server=True)
            except FlowerError as err:
                raise NearlError(str(err)) from None
        if a.auth_keys is not None:
            if certs is None:
                raise NearlError("--auth-keys needs TLS: drop --insecure and pass --certs DIR")
            if not sorted(a.auth_keys.glob("*.pub")):
                raise NearlError(f"--auth-keys {a.auth_keys}: no *.pub site keys found (deploy/make-site-key.sh SITE)")
        if a.resume is not None:
            ckpt = load_latest(self.checkpoint_dir)
            if ckpt.round >= fed.num_rounds:
                print(f"{PROG}: {self.checkpoint_dir} is already at round {ckpt.round} of {fed.num_rounds}; "
                      "finishing (final adapters and MLflow artifact)")
        elif complete_rounds(self.checkpoint_dir):
            raise NearlError(f"{self.checkpoint_dir} already holds checkpoints of an earlier run; continue it with "
                             f"--resume {self.checkpoint_dir} or choose another --checkpoint-dir")
        if fed.secure_aggregation and not roster:
            print(f"{PROG}: warning: secure aggregation without --roster: the sites' keys are not authenticated "
                  "here; sites without a roster protect their updates only from an honest-but-curious coordinator "
                  "(docs/security.md, Secure aggregation)", flush=True)
        return fed, certs

    def check_roster(self) -> str:
        """``--roster``: readable, and every site key in ``--auth-keys`` on it under its file's name; its path."""
        from nearl_protocol.roster import RosterError, check_site_key, load_roster

        a = self.args
        if a.roster is None:
            return ""
        if a.auth_keys is None:
            raise NearlError("--roster needs --auth-keys DIR: the roster pins the sites' SuperNode keys")
        path = a.roster.expanduser().resolve()
        try:
            roster = load_roster(path)
            for key in sorted(a.auth_keys.glob("*.pub")):
                check_site_key(roster, key.stem, key.read_text(), f"--auth-keys {key}")
        except RosterError as err:
            raise NearlError(str(err)) from None
        print(f"{PROG}: roster {path}: {len(roster.members)} sites, sha256 {roster.digest}", flush=True)
        return str(path)

    # -- the run -----------------------------------------------------------------------------------
    def run(self) -> int:
        a = self.args
        fed, certs = self.validate()
        # a model build in a child process, while the SuperLink starts (not in validate(): it takes seconds)
        self.resolver = LimitsResolver(a, Path(fed.config), fed.transport_dtype, fed.secure_aggregation)
        run_config = fed.to_run_config()
        self.phase = "start"
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        connect_host = "127.0.0.1" if a.host in ("0.0.0.0", "::", "") else a.host
        if flower.port_open(connect_host, a.port):
            raise FlowerError(f"port {a.port} on {connect_host} is already in use; pick another --port")
        local_port = a.local_port or flower.free_port()
        if flower.port_open("127.0.0.1", local_port):
            raise FlowerError(f"--local-port {local_port} on 127.0.0.1 is already in use; pick another")
        # The SuperLink answers on loopback only: its Control and Runtime APIs are for this host.
        cmd = flower.superlink_command(host="127.0.0.1", port=local_port, certs=certs, database=a.superlink_db,
                                       supernode_auth=a.auth_keys is not None)
        self.superlink = flower.start_process(cmd, env=flower.flower_env(self.state_dir / "superlink-home"),
                                              log_file=self.superlink_log, cwd=os.getcwd())
        flower.wait_for_port("127.0.0.1", local_port, self.superlink, self.superlink_log, "the SuperLink")
        self.limits, self.limits_note = self.resolver.result()
        self.start_proxy(connect_host, local_port, certs)
        home = self.state_dir / "cli-home"
        flower.write_connection(home, f"127.0.0.1:{local_port}", certs)
        self.cli_env = flower.flower_env(home)
        if a.auth_keys is not None:
            run_config["site-registry"] = str(self.register_sites(a.auth_keys))
        run_file = flower.write_run_config(self.state_dir / "run-config.toml", run_config)
        print(f"{PROG}: sites connect to {a.host}:{a.port} ({'TLS' if certs else 'INSECURE, no TLS'}"
              f"{', SuperNode authentication on' if a.auth_keys else ''}): Fleet API only, every other path refused; "
              f"sites join with: nearl-client --site NAME --data DIR --server <this-host>:{a.port}"
              f"{' --insecure' if certs is None else ' --certs DIR'}", flush=True)
        print(f"{PROG}: the public port refuses {self.limits.describe()}; body limit: {self.limits_note}",
              flush=True)
        print(f"{PROG}: SuperLink Control and Runtime APIs on 127.0.0.1:{local_port} (this host only); operate "
              f"the run here with: FLWR_HOME={home} flwr ls {flower.CONNECTION} (or flwr log RUN_ID / flwr stop "
              f"RUN_ID)", flush=True)
        app = stage(flower.APP_DIR, self.state_dir / "app-bundle")  # the same bundle, without walking .venv
        submitted = flower.flwr_json(["run", str(app), flower.CONNECTION, "--run-config", str(run_file)],
                                     env=self.cli_env, timeout=300)
        self.run_id = str(submitted["run-id"])
        self.phase = "run"
        print(f"{PROG}: run {self.run_id} submitted ({fed.num_rounds} rounds, strategy {fed.strategy}, "
              f"at least {fed.min_nodes} sites); waiting for sites...", flush=True)
        return self.follow(Path(run_config["progress-file"]))

    def start_proxy(self, connect_host: str, local_port: int, certs: Certs | None) -> None:
        """The public ``--host/--port``: server/proxy.py, forwarding the Fleet API only.

        Its output goes to ours, so a refused request shows up in the coordinator's log.
        """
        a = self.args
        cmd = flower.fleet_proxy_command(host=a.host, port=a.port, upstream_port=local_port, certs=certs,
                                         limits=self.limits.to_args() if self.limits else ())
        self.proxy = subprocess.Popen(cmd, env=flower.flower_env(self.state_dir / "proxy-home"), cwd=os.getcwd(),
                                      stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 60
        while not flower.port_open(connect_host, a.port):
            if self.proxy.poll() is not None:
                raise FlowerError(f"the Fleet proxy on {a.host}:{a.port} exited with code {self.proxy.returncode} "
                                  "(its error is above)")
            if time.monotonic() > deadline:
                raise FlowerError(f"the Fleet proxy did not open {a.host}:{a.port} within 60s")
            time.sleep(0.2)

    def register_sites(self, folder: Path) -> Path:
        """Register every ``<site>.pub`` with the SuperLink and keep the site registry (name -> key, node id).

        The ServerApp binds each node to the site whose key it registered with, so a node can
        only ever answer as its own site.  A key the SuperLink already knows (``--superlink-db``)
        keeps the node id recorded the first time.
        """
        registry_file = self.checkpoint_dir / "site-registry.json"
        old = json.loads(registry_file.read_text()).get("sites", {}) if registry_file.is_file() else {}
        sites: dict[str, dict[str, Any]] = {}
        for key in sorted(folder.glob("*.pub")):
            entry = {"public_key": key.read_text().strip(), "node_id": None}
            try:
                out = flower.flwr_json(["supernode", "register", str(key), flower.CONNECTION], env=self.cli_env,
                                       timeout=60)
                entry["node_id"] = int(out["node-id"])
                print(f"{PROG}: registered site key {key.name} (node {entry['node_id']})")
            except FlowerError as err:
                if "already" not in str(err).lower():
                    raise
                same = old.get(key.stem, {})
                entry["node_id"] = same.get("node_id") if same.get("public_key") == entry["public_key"] else None
            sites[key.stem] = entry
        registry_file.parent.mkdir(parents=True, exist_ok=True)
        registry_file.write_text(json.dumps({"sites": sites}, indent=2))
        return registry_file

    def follow(self, progress_file: Path) -> int:
        """Stream progress lines; poll the run status; decide the exit code."""
        reader, events, last_poll, status = ProgressReader(progress_file), [], 0.0, ""
        failing_since: float | None = None
        while True:
            for event in reader.read_new():
                events.append(event)
                text = format_event(event)
                if text and (not self.args.quiet or isinstance(event, (DoneEvent, ErrorEvent))):
                    print(text, flush=True)
            if status.startswith("finished"):
                break
            if self.superlink is not None and self.superlink.poll() is not None:
                raise FlowerError(f"the SuperLink stopped (exit {self.superlink.returncode}): "
                                  f"{flower.tail(self.superlink_log, 1)}")
            if self.proxy is not None and self.proxy.poll() is not None:
                raise FlowerError(f"the Fleet proxy on port {self.args.port} stopped (exit {self.proxy.returncode})")
            ending = any(isinstance(e, (DoneEvent, ErrorEvent)) for e in events[-2:])
            if flower.status_due(last_poll, ending=ending):
                try:
                    status, _ = flower.run_status(self.run_id, env=self.cli_env)
                    failing_since = None
                except FlowerError as err:  # a busy machine: keep following, give up only after a long outage
                    failing_since = failing_since or time.monotonic()
                    if time.monotonic() - failing_since > STATUS_OUTAGE_SECONDS:
                        raise FlowerError(f"no run status from the SuperLink for {STATUS_OUTAGE_SECONDS:.0f}s "
                                          f"({err})") from None
                last_poll = time.monotonic()
                if status.startswith("finished"):
                    continue  # one more pass to drain the progress file
            time.sleep(1.0)
        errors = select(events, ErrorEvent)
        if status.endswith("completed") and select(events, DoneEvent) and not errors:
            print(format_summary(events), flush=True)
            return 0
        if errors:
            message = errors[-1].message
        elif status.endswith("stopped"):
            message = "the run was stopped"
        else:
            logs = flower.run_logs(self.run_id, env=self.cli_env, lines=5).splitlines()
            message = f"run ended {status} before the last round" + (f": {logs[-1]}" if logs else "")
        print(f"{PROG}: error: federation failed: {message}", file=sys.stderr)
        return 1

    def shutdown(self) -> None:
        """Stop the proxy, then the SuperLink with its SuperExec and ServerApp (a run still going ends with them)."""
        if self.resolver is not None:
            self.resolver.cancel()
        if self.proxy is not None:  # its graceful shutdown (3 s at most) ends with its line of totals
            flower.stop_process(self.proxy, timeout=10)
            self.proxy = None
        if self.superlink is None:
            return
        flower.stop_process(self.superlink, timeout=5)
        self.superlink = None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
