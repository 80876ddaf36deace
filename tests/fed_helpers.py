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


def wait_for(procs: Procs, name: str, text: str, timeout: float) -> None:
    """Until ``text`` appears in the output of process ``name``; fails early when that process has ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in procs.text(name):
            return
        if procs.procs[name].poll() is not None:
            break
        time.sleep(0.5)
    raise AssertionError(f"'{text}' not seen in {name} within {timeout:.0f}s\n{dump(procs)}")


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
