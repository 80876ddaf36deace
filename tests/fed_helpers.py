"""Helpers for the federation tests: Flower messages without processes, and bounded real processes.

Real-process helpers start everything in its own session on loopback with free ports,
give each process its own FLWR_HOME, and :class:`Procs` stops every process it started
(process group SIGTERM, then SIGKILL) in a ``finally``/fixture teardown.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, Metadata, MetricRecord, RecordDict

from nearl_protocol import processes as flower
from nearl_protocol.flat import FlatLayout
from nearl_protocol.messages import adapter_record
from nearl_protocol.processes import Certs
from nearl_protocol.schema import schema_of

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


# -- messages without a SuperLink ---------------------------------------------------------------------
def metadata(message_type: str = "train", *, src: int = 0, dst: int = 1, run_id: int = 1) -> Metadata:
    return Metadata(run_id=run_id, message_id=f"m-{src}-{dst}-{time.monotonic_ns()}", src_node_id=src,
                    dst_node_id=dst, reply_to_message_id="", group_id="", created_at=time.time(), ttl=3600.0,
                    message_type=message_type)


def instruction(content: RecordDict, message_type: str = "train", dst: int = 1) -> Message:
    """A message as a ClientApp receives it from the server."""
    return Message(content=content, metadata=metadata(message_type, src=0, dst=dst))


def reply_from(node: int, content: RecordDict | None = None, *, error: str | None = None,
               message_type: str = "train") -> Message:
    """A reply as the ServerApp receives it from node ``node``."""
    md = metadata(message_type, src=node, dst=0)
    if error is not None:
        return Message(error=Error(code=0, reason=error), metadata=md)
    return Message(content=content, metadata=md)


def flat_record(tensors: dict[str, Any]) -> ArrayRecord:
    """Tensors (numpy or torch, one dtype) as they travel: one flat array, packed in the dict's order."""
    return adapter_record(FlatLayout.of(schema_of(tensors)).pack({k: np.asarray(v) for k, v in tensors.items()}))


def train_reply_content(site: str, arrays: dict[str, np.ndarray], n: int = 10, **metrics: float) -> RecordDict:
    m = {"num-examples": n, "train-loss": 1.0, "train-accuracy": 0.5, **metrics}
    return RecordDict({"arrays": flat_record(arrays), "metrics": MetricRecord(m), "site": ConfigRecord({"name": site})})


class FakeGrid:
    """The part of flwr.serverapp.Grid the strategy's configure_* methods use."""

    def __init__(self, node_ids: Iterable[int]):
        self.node_ids = list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)


class RoundRecorder:
    """A strategy listener that keeps every round report (and ignores evaluations)."""

    def __init__(self):
        self.rounds = []

    def evaluated(self, step, metrics, per_site):
        pass

    def round_finished(self, report, strategy):
        self.rounds.append(report)


# -- real processes -------------------------------------------------------------------------------------
def env(flwr_home: Path | str, **extra: str) -> dict[str, str]:
    return flower.flower_env(flwr_home, {k: str(v) for k, v in extra.items()})


class Procs:
    """Every process a test starts; ``stop_all`` ends each one by its own process group."""

    def __init__(self, logdir: Path):
        self.logdir = logdir
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, cmd: list[str], *, env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen:
        proc = flower.start_process(cmd, env=env, log_file=self.log(name), cwd=cwd)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> Path:
        return self.logdir / f"{name}.log"

    def text(self, name: str) -> str:
        return self.log(name).read_text(errors="replace") if self.log(name).exists() else ""

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[name]
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)

    def wait(self, name: str, timeout: float) -> int:
        try:
            return self.procs[name].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} still running after {timeout:.0f}s; log tail:\n"
                                 f"{flower.tail(self.log(name), 40)}") from None

    def stop_all(self) -> None:
        for name, proc in self.procs.items():  # servers first: they stop their SuperLink themselves
            flower.stop_process(proc, timeout=30 if "server" in name or name == "resumed" else 10)


def nearl_client(procs: Procs, site: str, data: Path, port: int, tmp: Path, *extra: str,
                 name: str | None = None) -> subprocess.Popen:
    cmd = [str(BIN / "nearl-client"), "--site", site, "--data", str(data), "--server", f"127.0.0.1:{port}",
           "--threads", "1", *extra]  # several sites share this machine's cores
    return procs.start(name or site, cmd, env=env(tmp / f"home-{name or site}"), cwd=tmp)


def nearl_server(procs: Procs, port: int, tmp: Path, *extra: str, name: str = "server") -> subprocess.Popen:
    cmd = [str(BIN / "nearl-server"), "--host", "127.0.0.1", "--port", str(port), *extra]
    return procs.start(name, cmd, env=env(tmp / f"home-{name}"), cwd=tmp)


def progress_events(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("round ")]


def mlflow_run(tracking_uri: str, run_id: str | None = None):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    if run_id is None:
        exp = client.get_experiment_by_name("nearl-federated")
        runs = client.search_runs([exp.experiment_id])
        assert len(runs) == 1, f"expected one MLflow run, found {len(runs)}"
        run_id = runs[0].info.run_id
    return client, client.get_run(run_id)


def history(client, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def dump(procs: Procs) -> str:
    return "\n".join(f"--- {n} ---\n{flower.tail(procs.log(n), 30)}" for n in procs.procs)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def server_task_identity():
    """Strategies build Messages, which read the process's task identity (set by Flower in a ServerApp)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    return saved


def restore_task_identity(saved) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def wait_for(procs: Procs, name: str, text: str | re.Pattern, timeout: float) -> re.Match | None:
    """Until ``text`` (or a match of a compiled pattern, returned) appears in the output of process ``name``;
    fails early when that process has ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = procs.text(name)
        if isinstance(text, re.Pattern):
            if match := text.search(out):
                return match
        elif text in out:
            return None
        if procs.procs[name].poll() is not None:
            break
        time.sleep(0.5)
    shown = text.pattern if isinstance(text, re.Pattern) else text
    raise AssertionError(f"'{shown}' not seen in {name} within {timeout:.0f}s\n{dump(procs)}")


# A Flower app that is not NEARL: its ServerApp sends one train message to every node and records the
# replies' errors in the run config's ``out`` file; its ClientApp would leave ``marker`` at a site that ran it,
# its ServerApp ``<marker>-server`` wherever it ran.
FOREIGN_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "foreign-app"
version = "1.0.0"
dependencies = ["flwr"]

[tool.setuptools]
py-modules = ["foreign_app"]

[tool.flwr.app]
publisher = "someone-else"

[tool.flwr.app.components]
serverapp = "foreign_app:server"
clientapp = "foreign_app:client"

[tool.flwr.app.config]
out = ""
"""

FOREIGN_APP = '''\
import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

MARKER = Path({marker!r})
server = ServerApp()
client = ClientApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    MARKER.with_name(MARKER.name + "-server").write_text("the foreign ServerApp ran")
    while not list(grid.get_node_ids()):
        time.sleep(0.5)
    msgs = [Message(content=RecordDict({{"config": ConfigRecord({{"x": 1}})}}), dst_node_id=n, message_type="train")
            for n in grid.get_node_ids()]
    replies = list(grid.send_and_receive(msgs, timeout=300))
    rows = [{{"error": m.error.reason if m.has_error() else None}} for m in replies]
    Path(context.run_config["out"]).write_text(json.dumps(rows))


@client.train()
def train(msg: Message, context: Context) -> Message:
    MARKER.write_text("the foreign ClientApp ran")
    return Message(RecordDict({{"metrics": MetricRecord({{"num-examples": 1}})}}), reply_to=msg)
'''


def foreign_app(folder: Path, marker: Path) -> Path:
    """Write the foreign app into ``folder`` (for ``flwr run``); a site that ran its ClientApp leaves ``marker``."""
    folder.mkdir(parents=True)
    (folder / "pyproject.toml").write_text(FOREIGN_PYPROJECT)
    (folder / "foreign_app.py").write_text(FOREIGN_APP.format(marker=str(marker)))
    return folder


# -- shared federations ----------------------------------------------------------------------------------
# Each runs to its end, stops every process it started and returns what the tests read (logs, folders,
# exit codes); the fixtures in conftest.py run each one once for every test that reads it.
ROUND_TIMEOUT = "900"  # generous: other work shares the 2 CPU cores; a dead site is detected by heartbeat (~60 s)


def initial_adapters() -> dict[str, np.ndarray]:
    from nearl_core.adapter_io import get_adapter_state
    from nearl_core.config import load_config
    from nearl_core.model import build_model

    return {k: v.numpy() for k, v in get_adapter_state(build_model(load_config("demo"))).items()}


def final_adapters(tmp: Path) -> dict[str, np.ndarray]:
    """The final adapters a coordinator wrote under ``tmp/ck``."""
    from safetensors.numpy import load_file

    return load_file(str(tmp / "ck" / "final" / "adapters.safetensors"))


def make_keys(tmp: Path, names: list[str]) -> tuple[Path, Path]:
    certs, keys = tmp / "certs", tmp / "keys"
    subprocess.run([str(ROOT / "deploy" / "make-certs.sh"), "--out", str(certs), "localhost"], check=True,
                   capture_output=True, timeout=120)
    for site in names:
        subprocess.run([str(ROOT / "deploy" / "make-site-key.sh"), "--out", str(keys), site], check=True,
                       capture_output=True, timeout=60)
    return certs, keys


def other_backbone(path: Path) -> Path:
    """A nearl-tiny checkpoint whose weights differ from the coordinator's random init."""
    import torch

    from nearl_core.backbone import build_backbone
    from nearl_core.config import load_config

    clip = build_backbone(load_config("demo").model).clip
    torch.save({k: v + 0.25 for k, v in clip.state_dict().items()}, path)
    return path


def flwr_outside(args: list[str], home: Path, cwd: Path) -> str:
    res = subprocess.run([str(BIN / "flwr"), *args, "--format", "json"], env=env(home), cwd=cwd, capture_output=True,
                         text=True, timeout=120)
    return (res.stdout + res.stderr).strip()


def outsider_attempts(procs: Procs, tmp: Path, port: int, certs: Path) -> dict[str, str]:
    """With nothing but the CA certificate and the public address: submit a foreign app, stop the run, list."""
    app = foreign_app(tmp / "foreign", tmp / "foreign-ran")
    run_id = re.search(r"run (\d+) submitted", procs.text("server")).group(1)
    outside = tmp / "outside-home"
    flower.write_connection(outside, f"127.0.0.1:{port}", Certs(certs))
    tried = {"run": flwr_outside(["run", str(app), flower.CONNECTION], outside, tmp),
             "stop": flwr_outside(["stop", run_id, flower.CONNECTION], outside, tmp),
             "ls": flwr_outside(["ls", flower.CONNECTION], outside, tmp)}
    home = re.search(r"FLWR_HOME=(\S+) flwr ls", procs.text("server")).group(1)  # the operator, on the host
    local = subprocess.run([str(BIN / "flwr"), "ls", flower.CONNECTION, "--run-id", run_id, "--format", "json"],
                           env=env(home), capture_output=True, text=True, timeout=120)
    tried["operator ls"] = local.stdout + local.stderr
    return tried


def plain_server(tmp: Path, sites: list[Path], rounds: int) -> tuple[Procs, int, str]:
    """The coordinator of a plain federation (insecure, MLflow in ``tmp``), started, not awaited."""
    procs = Procs(tmp / "logs")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    port = flower.free_port()
    nearl_server(procs, port, tmp, "--insecure", "--rounds", str(rounds), "--min-sites", str(len(sites)),
                 "--round-timeout", "600", "--wait-timeout", "300", "--checkpoint-dir", str(tmp / "ck"),
                 "--mlflow-uri", uri)
    return procs, port, uri


def plain_sites(procs: Procs, port: int, tmp: Path, sites: list[Path], mode: str) -> None:
    """Once the coordinator has submitted its run: every site joins in ``mode`` (--warm/--cold)."""
    wait_for(procs, "server", "submitted", 300)
    for i, site in enumerate(sites, 1):
        nearl_client(procs, f"site{i}", site, port, tmp, "--insecure", "--state-dir", str(tmp / f"state-site{i}"),
                     mode)


def federation(tmp: Path, sites: list[Path], mode: str, rounds: int) -> tuple[Procs, str]:
    """A plain federation: insecure, every site in ``mode`` (--warm/--cold), MLflow in ``tmp``; started, not awaited."""
    procs, port, uri = plain_server(tmp, sites, rounds)
    plain_sites(procs, port, tmp, sites, mode)
    return procs, uri


@dataclass
class SecuredRun:
    """The secured federation (warm sites) and the cold federation it is compared with, both ended."""

    procs: Procs
    tmp: Path
    sites: list[Path]
    code: int  # nearl-server's exit code
    tried: dict[str, str]  # what an outsider with the CA certificate got from the public port
    cold_procs: Procs
    cold_tmp: Path
    cold_code: int
    cold_uri: str


SECURED_ROUNDS = 2  # two rounds: a warm worker must build the backbone once over more than one round


def secured_federation(tmp: Path) -> SecuredRun:
    """TLS and SuperNode authentication, two honest warm sites, an unregistered intruder, a registered node
    that claims another site's name and a site on another backbone; 2 rounds and the final evaluation.
    Meanwhile an outsider with the CA certificate tries ``flwr run/stop/ls`` on the public port, and a cold
    federation (``nearl-client --cold``: a process per message, insecure) runs the same 2 rounds on the same
    data and seed.  At the end site1 is asked to stop (SIGTERM) and everything is stopped."""
    from nearl_core.demo_data import generate_demo_data

    procs = Procs(tmp / "logs")
    cold_tmp = tmp / "cold"
    sites = generate_demo_data(tmp / "data", 2, train_per_site=24, val_per_site=8, test_per_site=8)
    # the cold federation runs meanwhile: both spend most of their time in Flower's polling sleeps
    cold_procs, cold_port, cold_uri = plain_server(cold_tmp, sites, SECURED_ROUNDS)
    try:
        certs, keys = make_keys(tmp, ["site1", "site2", "site3", "site4", "intruder"])
        registered = tmp / "registered"
        registered.mkdir()
        for site in ("site1", "site2", "site3", "site4"):  # the intruder's key is never registered
            (registered / f"{site}.pub").write_text((keys / f"{site}.pub").read_text())
        tls = ["--certs", str(certs)]
        port = flower.free_port()
        nearl_server(procs, port, tmp, *tls, "--auth-keys", str(registered), "--rounds", str(SECURED_ROUNDS),
                     "--min-sites", "4", "--round-timeout", ROUND_TIMEOUT, "--wait-timeout", "400",
                     "--checkpoint-dir", str(tmp / "ck"))
        other = other_backbone(tmp / "other.pt")
        plain_sites(cold_procs, cold_port, cold_tmp, sites, "--cold")
        wait_for(procs, "server", "submitted", 300)
        nearl_client(procs, "intruder", sites[0], port, tmp, *tls, "--auth-key", str(keys / "intruder"))
        for i, site in enumerate(sites, 1):  # warm, as tests/test_warm_e2e.py reads them
            nearl_client(procs, f"site{i}", site, port, tmp, *tls, "--auth-key", str(keys / f"site{i}"),
                         "--state-dir", str(tmp / f"state-site{i}"), "--warm")
        # a registered node (site3's key) that answers as site1
        nearl_client(procs, "site1", sites[1], port, tmp, *tls, "--auth-key", str(keys / "site3"),
                     "--state-dir", str(tmp / "state-impostor"), name="impostor")
        nearl_client(procs, "site4", sites[1], port, tmp, *tls, "--auth-key", str(keys / "site4"),
                     "--state-dir", str(tmp / "state-site4"), "--pretrained", str(other))
        tried = outsider_attempts(procs, tmp, port, certs)
        code = procs.wait("server", 1500)
        # a SuperNode asked to stop exits cleanly (test_each_sites_audit_trail_matches_what_the_server_received)
        procs.kill("site1", signal.SIGTERM)
        procs.stop_all()
        cold_code = cold_procs.wait("server", 1200)
    finally:
        procs.stop_all()
        cold_procs.stop_all()
    return SecuredRun(procs, tmp, sites, code, tried, cold_procs, cold_tmp, cold_code, cold_uri)


def copy_app(dst: Path) -> Path:
    """This installation's code with one changed byte in README.md: another NEARL bundle (another hash)."""
    dst.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dst / name)
    for pkg in ("nearl_core", "nearl_protocol", "server", "client", "configs"):
        shutil.copytree(ROOT / pkg, dst / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (dst / "README.md").write_text((dst / "README.md").read_text() + "\nanother version\n")
    return dst


@dataclass
class RefusalRun:
    """One coordinator that runs another NEARL version, one site, and a foreign Flower app on the same SuperLink."""

    procs: Procs
    tmp: Path
    nearl_run: int  # the Flower run id of the other NEARL version's run
    foreign_run: int
    foreign_out: Path  # the foreign ServerApp's record of the replies
    marker: Path  # what the foreign ClientApp would leave at a site that ran it


def refusal_federation(tmp: Path) -> RefusalRun:
    """nearl-server started from a copy of this code with one byte changed (another bundle hash) submits its
    run; the operator submits a foreign Flower app (``flwr run`` on the coordinator's host) to the same
    SuperLink; one site (this installation) joins and refuses both.  Ends once the coordinator
    logged the site's refusal and the foreign ServerApp recorded its replies."""
    from nearl_core.demo_data import generate_demo_data

    sites = generate_demo_data(tmp / "data", 1, train_per_site=24, val_per_site=8, test_per_site=8)
    other = copy_app(tmp / "other-version")
    marker, out = tmp / "foreign-ran", tmp / "foreign.json"
    app = foreign_app(tmp / "foreign", marker)
    procs = Procs(tmp / "logs")
    port = flower.free_port()
    try:
        # more rounds than the test needs: the run must outlast the foreign app's (it stops the SuperLink at its end)
        cmd = [str(Path(flower.BIN) / "nearl-server"), "--host", "127.0.0.1", "--port", str(port), "--insecure",
               "--rounds", "30", "--min-sites", "1", "--round-timeout", "300", "--wait-timeout", "300",
               "--checkpoint-dir", str(tmp / "ck"), "--mlflow-uri", f"sqlite:///{tmp / 'mlflow.db'}"]
        procs.start("server", cmd, env=env(tmp / "home-server", PYTHONPATH=str(other)), cwd=tmp)
        # the site starts with the coordinator: nearl-client waits for its port (--connect-timeout)
        nearl_client(procs, "site1", sites[0], port, tmp, "--insecure", "--state-dir", str(tmp / "state-site1"))
        wait_for(procs, "server", " flwr ls ", 300)
        home = re.search(r"FLWR_HOME=(\S+) flwr ls", procs.text("server")).group(1)  # the operator, on the host
        cli_env = env(home)
        run_cfg = flower.write_run_config(tmp / "run.toml", {"out": str(out)})
        foreign_run = int(flower.flwr_json(["run", str(app), flower.CONNECTION, "--run-config", str(run_cfg)],
                                           env=cli_env, timeout=300)["run-id"])
        wait_for(procs, "server", "submitted", 300)
        nearl_run = int(re.search(r"run (\d+) submitted", procs.text("server")).group(1))
        wait_for(procs, "server", "rejected site1", 600)
        deadline = time.monotonic() + 600
        while not out.exists() and time.monotonic() < deadline and procs.procs["server"].poll() is None:
            time.sleep(0.5)
        if not out.exists():
            try:
                logs = flower.run_logs(str(foreign_run), env=cli_env)
            except flower.FlowerError as err:  # the SuperLink went with its coordinator
                logs = str(err)
            raise AssertionError(f"the foreign ServerApp recorded no replies\n{logs}\n{dump(procs)}")
    finally:
        procs.stop_all()
    return RefusalRun(procs, tmp, nearl_run, foreign_run, out, marker)
