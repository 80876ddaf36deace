"""``nearl-server``: run a NEARL federation as its coordinator.

    nearl-server --rounds 50 [--config X] [--min-sites N] [--port P] [--local-port P] [--certs DIR | --insecure]
                 [--auth-keys DIR] [--mlflow-uri U] [--checkpoint-dir D] [--resume D]

Starts a Flower SuperLink on 127.0.0.1 (runtime dependency installation disabled: the app
runs in this environment) and, on the public ``--host/--port``, a proxy that forwards the
SuperLink's Fleet API (what sites call) and nothing else (server/proxy.py): the Control API
(``flwr run/ls/log/stop``) and the Runtime API stay on this host. It then submits the NEARL app with ``flwr run . nearl --format json``, streams
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
from pathlib import Path
from typing import Any

from nearl_core import personalize
from nearl_core.errors import NearlError
from nearl_core.transport import TRANSPORT_DTYPES
from server import settings
from server.events import DoneEvent, ErrorEvent, ProgressReader, select
from server.progress_view import format_event, format_summary
from nearl_protocol import processes as flower
from nearl_protocol.bundle import stage
from nearl_protocol.processes import Certs, FlowerError

PROG = "nearl-server"
STATUS_OUTAGE_SECONDS = 900.0
POLL_SECONDS = 10.0  # `flwr ls` is a Python process per call; progress lines arrive through a file anyway


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Coordinate a NEARL federation (Flower SuperLink + ServerApp).")
    d, h = settings.default, settings.help_of
    p.add_argument("--rounds", type=int, default=d("num_rounds"), help=h("num_rounds"))
    p.add_argument("--config", default=d("config"), help=h("config"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a NEARL config value, e.g. --set train.lr=0.001 (repeatable)")
    p.add_argument("--strategy", default=d("strategy"), help=h("strategy"))
    p.add_argument("--min-sites", type=int, default=d("min_nodes"), help=h("min_nodes"))
    p.add_argument("--fraction-train", type=float, default=d("fraction_train"), help=h("fraction_train"))
    p.add_argument("--local-epochs", type=int, default=d("local_epochs"), help=h("local_epochs"))
    p.add_argument("--round-timeout", type=float, default=d("round_timeout"), help=h("round_timeout"))
    p.add_argument("--wait-timeout", type=float, default=d("wait_timeout"), help=h("wait_timeout"))
    p.add_argument("--no-eval-in-train", dest="evaluate_in_train", action="store_false",
                   default=d("evaluate_in_train"), help="evaluate in a separate message every round (slower; "
                   "default: inside the train message)")
    personalize.add_arguments(p)
    p.add_argument("--proximal-mu", type=float, default=d("proximal_mu"), help=h("proximal_mu"))
    p.add_argument("--server-momentum", type=float, default=d("server_momentum"), help=h("server_momentum"))
    p.add_argument("--server-lr", type=float, default=d("server_lr"), help=h("server_lr"))
    p.add_argument("--trim-beta", type=float, default=d("trim_beta"), help=h("trim_beta"))
    p.add_argument("--krum-malicious", type=int, default=d("krum_malicious"), help=h("krum_malicious"))
    guard = p.add_argument_group("what one site can do to a round (docs/security.md)")
    guard.add_argument("--max-abs-value", type=float, default=d("max_abs_value"), help=h("max_abs_value"))
    guard.add_argument("--outlier-factor", type=float, default=d("outlier_factor"), help=h("outlier_factor"))
    guard.add_argument("--examples-growth", type=float, default=d("examples_growth"), help=h("examples_growth"))
    guard.add_argument("--max-examples", type=float, default=d("max_examples"), help=h("max_examples"))
    guard.add_argument("--equal-weights", action="store_true", default=d("equal_weights"), help=h("equal_weights"))
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
    p.add_argument("--mlflow-uri", default=d("mlflow_uri"),
                   help=h("mlflow_uri", "; a relative sqlite path is in this folder; http://host:5000 for a server"))
    p.add_argument("--experiment", default=d("mlflow_experiment"), help=h("mlflow_experiment"))
    p.add_argument("--checkpoint-dir", type=Path, default=Path(d("checkpoint_dir")), help=h("checkpoint_dir"))
    p.add_argument("--keep-checkpoints", type=int, default=d("keep_checkpoints"), help=h("keep_checkpoints"))
    p.add_argument("--resume", type=Path, default=None, metavar="DIR",
                   help="continue the run checkpointed in DIR from its last complete round (same MLflow run)")
    p.add_argument("--superlink-db", type=Path, default=None, metavar="FILE",
                   help="keep the SuperLink's state in this sqlite file so connected sites survive a coordinator "
                        "restart (default: in memory; sites then rejoin by restarting nearl-client)")
    p.add_argument("--transport-dtype", default=d("transport_dtype"), choices=TRANSPORT_DTYPES,
                   help=h("transport_dtype", "; fp16/bf16 halve the payload in both directions"))
    p.add_argument("--quiet", action="store_true", help="only the final summary")
    sec = p.add_argument_group("secure aggregation (docs/security.md)")
    sec.add_argument("--secure-aggregation", action="store_true", default=d("secure_aggregation"),
                     help=h("secure_aggregation"))
    sec.add_argument("--secagg-threshold", type=float, default=d("secagg_threshold"), help=h("secagg_threshold"))
    sec.add_argument("--secagg-clip", type=float, default=d("secagg_clip"), help=h("secagg_clip"))
    sec.add_argument("--secagg-max-weight", type=int, default=d("secagg_max_weight"), help=h("secagg_max_weight"))
    sec.add_argument("--secagg-timeout", type=float, default=d("secagg_timeout"), help=h("secagg_timeout"))
    dp = p.add_argument_group("differential privacy (docs/privacy.md)")
    dp.add_argument("--dp-epsilon", type=float, default=None, metavar="E",
                    help="ask every site for DP-SGD to epsilon E over the whole federation (sample-level; "
                         "a site's own nearl-client --max-epsilon can only lower it)")
    dp.add_argument("--dp-delta", type=float, default=None, metavar="D",
                    help="sample-level delta (default: per site, below 1/N of its training images)")
    dp.add_argument("--dp-max-grad-norm", type=float, default=None, metavar="C", help="per-sample clipping bound")
    dp.add_argument("--server-dp-noise", type=float, default=d("server_dp_noise"), metavar="Z",
                    help=h("server_dp_noise", "; needs --server-dp-clip"))
    dp.add_argument("--server-dp-clip", type=float, default=d("server_dp_clip"), metavar="C",
                    help=h("server_dp_clip"))
    dp.add_argument("--server-dp-delta", type=float, default=d("server_dp_delta"), metavar="D",
                    help=h("server_dp_delta"))
    return p


def dp_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """--dp-* flags as NEARL config overrides (a flag turns sample-level DP on)."""
    out: dict[str, Any] = {}
    for flag, key in (("dp_epsilon", "privacy.target-epsilon"), ("dp_delta", "privacy.delta"),
                      ("dp_max_grad_norm", "privacy.max-grad-norm")):
        if getattr(args, flag, None) is not None:
            out[key] = getattr(args, flag)
    if out:
        out["privacy.enabled"] = True
    return out


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
        self.checkpoint_dir = (args.resume or args.checkpoint_dir).expanduser().resolve()
        self.superlink_log = state_dir / "superlink.log"
        self.proxy = None

    # -- setup checks: everything a user can get wrong fails here, before any process starts -------
    def validate(self) -> tuple[dict[str, Any], Certs | None]:
        from nearl_core.config import load_config, resolve_config_path
        from server.checkpoint import complete_rounds, load_latest
        from server.settings import FederationSettings

        a = self.args
        if not (flower.APP_DIR / "pyproject.toml").is_file():
            raise NearlError(f"{flower.APP_DIR} has no pyproject.toml: run nearl-server from a NEARL source install")
        overrides: dict[str, Any] = {}
        for item in a.overrides:
            key, sep, value = item.partition("=")
            if not sep:
                raise NearlError(f"--set {item}: expected SECTION.KEY=VALUE, e.g. --set train.lr=0.001")
            overrides[key.strip()] = value.strip()
        overrides.update(dp_overrides(a))
        overrides.update(personalize.overrides_from_args(a))
        config_path = resolve_config_path(a.config)
        load_config(config_path, overrides)  # readable error now rather than inside the ServerApp
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
            if ckpt.round >= a.rounds:
                print(f"{PROG}: {self.checkpoint_dir} is already at round {ckpt.round} of {a.rounds}; "
                      "finishing (final adapters and MLflow artifact)")
        elif complete_rounds(self.checkpoint_dir):
            raise NearlError(f"{self.checkpoint_dir} already holds checkpoints of an earlier run; continue it with "
                             f"--resume {self.checkpoint_dir} or choose another --checkpoint-dir")
        run_config = {
            "num-server-rounds": a.rounds, "config": str(config_path), "strategy": a.strategy,
            "min-nodes": a.min_sites, "fraction-train": a.fraction_train, "round-timeout": a.round_timeout,
            "wait-timeout": a.wait_timeout, "local-epochs": a.local_epochs, "evaluate-in-train": a.evaluate_in_train,
            "proximal-mu": a.proximal_mu, "server-lr": a.server_lr, "server-momentum": a.server_momentum,
            "trim-beta": a.trim_beta,
            "krum-malicious": a.krum_malicious, "max-abs-value": a.max_abs_value,
            "outlier-factor": a.outlier_factor, "examples-growth": a.examples_growth, "max-examples": a.max_examples,
            "equal-weights": a.equal_weights, "mlflow-uri": self._mlflow_uri(), "mlflow-experiment": a.experiment,
            "checkpoint-dir": str(self.checkpoint_dir), "keep-checkpoints": a.keep_checkpoints,
            "resume": a.resume is not None, "progress-file": str(self.state_dir / "progress.jsonl"),
            "server-dp-noise": a.server_dp_noise, "server-dp-clip": a.server_dp_clip,
            "server-dp-delta": a.server_dp_delta, "transport-dtype": a.transport_dtype,
            "secure-aggregation": a.secure_aggregation, "secagg-threshold": a.secagg_threshold,
            "secagg-clip": a.secagg_clip, "secagg-max-weight": a.secagg_max_weight,
            "secagg-timeout": a.secagg_timeout, **overrides,
        }
        FederationSettings.from_run_config(run_config).nearl_config()
        return run_config, certs

    def _mlflow_uri(self) -> str:
        from server.tracking import resolve_tracking_uri

        return resolve_tracking_uri(self.args.mlflow_uri, os.getcwd())

    # -- the run -----------------------------------------------------------------------------------
    def run(self) -> int:
        a = self.args
        run_config, certs = self.validate()
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
        print(f"{PROG}: SuperLink Control and Runtime APIs on 127.0.0.1:{local_port} (this host only); operate "
              f"the run here with: FLWR_HOME={home} flwr ls {flower.CONNECTION} (or flwr log RUN_ID / flwr stop "
              f"RUN_ID)", flush=True)
        app = stage(flower.APP_DIR, self.state_dir / "app-bundle")  # the same bundle, without walking .venv
        submitted = flower.flwr_json(["run", str(app), flower.CONNECTION, "--run-config", str(run_file)],
                                     env=self.cli_env, timeout=300)
        self.run_id = str(submitted["run-id"])
        self.phase = "run"
        print(f"{PROG}: run {self.run_id} submitted ({a.rounds} rounds, strategy {a.strategy}, "
              f"at least {a.min_sites} sites); waiting for sites...", flush=True)
        return self.follow(Path(run_config["progress-file"]))

    def start_proxy(self, connect_host: str, local_port: int, certs: Certs | None) -> None:
        """The public ``--host/--port``: server/proxy.py, forwarding the Fleet API only.

        Its output goes to ours, so a refused request shows up in the coordinator's log.
        """
        a = self.args
        cmd = flower.fleet_proxy_command(host=a.host, port=a.port, upstream_port=local_port, certs=certs)
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
            if time.monotonic() - last_poll > (2.0 if ending else POLL_SECONDS):
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
        if self.proxy is not None:
            flower.stop_process(self.proxy, timeout=5)
            self.proxy = None
        if self.superlink is None:
            return
        flower.stop_process(self.superlink, timeout=5)
        self.superlink = None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
