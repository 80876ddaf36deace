"""Run the federation's own ServerApp and ClientApp on Flower's Simulation Engine.

The launcher starts and owns a SuperLink in simulation mode on a private loopback port
(so nothing outlives the command), submits the app in this repository with
``flwr run``, follows the ServerApp's progress file, and stops the SuperLink at the end.
Flower reports client failures only through the results, so the caller counts sites.
"""

from __future__ import annotations

import shutil
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from nearl_protocol.processes import (CONNECTION, FlowerError, flower_env, flwr_json, free_port, run_logs, run_status,
                           start_process, status_due, stop_process, superlink_command, wait_for_port, write_connection,
                           write_run_config)
from server.events import DoneEvent, ErrorEvent, EvalEvent, Event, ProgressReader, RoundEvent, select

ROOT = Path(__file__).resolve().parent.parent
SITE_APP = "simulation.site_app"


def app_dir(workdir: Path) -> Path:
    """A Flower app folder for the simulation: the product's pyproject.toml with the simulation's
    components (:mod:`simulation.site_app`) and its ``sim-*`` keys, and that module.

    The product's own run config never carries simulation keys; nearl_core, client/ and
    server/ come from this environment, exactly as a hospital runs them.
    """
    import tomli_w

    from simulation.site_app import SIM_KEYS

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    app = project["tool"]["flwr"]["app"]
    app["components"] = {"serverapp": f"{SITE_APP}:serverapp", "clientapp": f"{SITE_APP}:clientapp"}
    app["fab-include"] = ["pyproject.toml", "simulation/__init__.py", "simulation/site_app.py"]
    app["config"].update(SIM_KEYS)
    folder = workdir / "app"
    (folder / "simulation").mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(tomli_w.dumps({"build-system": project["build-system"],
                                                          "project": project["project"], "tool": {"flwr": {"app": app}}}))
    for name in ("__init__.py", "site_app.py"):
        shutil.copyfile(ROOT / "simulation" / name, folder / "simulation" / name)
    return folder


@dataclass
class SimulationResult:
    events: list[Event] = field(default_factory=list)
    adapters: Path | None = None
    run_id: str | None = None  # MLflow run id
    status: str = ""
    seconds: float = 0.0
    done: DoneEvent | None = None  # which round the federation kept, why it stopped, the kept adapters' tests

    def rounds(self) -> list[RoundEvent]:
        return select(self.events, RoundEvent)

    def evals(self) -> list[EvalEvent]:
        return select(self.events, EvalEvent)

    def add(self, event: Event) -> None:
        """Keep an event; ``done`` says where the final adapters and the MLflow run are, and which round they are."""
        self.events.append(event)
        if isinstance(event, DoneEvent):
            self.adapters, self.run_id, self.done = Path(event.adapters), event.run_id, event


def run_simulation(*, sites: int, run_config: dict[str, Any], workdir: Path, cpus_per_site: float = 1.0,
                   timeout: float = 1800.0, on_event: Callable[[Event], None] | None = None
                   ) -> SimulationResult:
    """Start a private simulation SuperLink, run the app with ``sites`` virtual SuperNodes, wait."""
    workdir.mkdir(parents=True, exist_ok=True)
    flwr_home = workdir / ".flwr"
    progress = workdir / "progress.jsonl"
    progress.unlink(missing_ok=True)
    reader = ProgressReader(progress)
    env = flower_env(flwr_home, {"RAY_DEDUP_LOGS": "0", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"})
    port = free_port()
    command = superlink_command(host="127.0.0.1", port=port, certs=None, database=None) + ["--simulation"]
    link = start_process(command, env=env, log_file=workdir / "superlink.log", cwd=workdir)
    result, start = SimulationResult(), time.perf_counter()
    try:
        wait_for_port("127.0.0.1", port, link, workdir / "superlink.log", "simulation SuperLink")
        write_connection(flwr_home, f"127.0.0.1:{port}", None)
        config_file = write_run_config(workdir / "run-config.toml", {**run_config, "progress-file": str(progress)})
        federation = f"num-supernodes={sites} client-resources-num-cpus={cpus_per_site:g}"
        submitted = flwr_json(["run", str(app_dir(workdir)), CONNECTION, "--federation-config", federation,
                               "--run-config", str(config_file)], env=env, cwd=ROOT)
        flwr_run = str(submitted.get("run-id") or submitted.get("run_id"))
        last_poll = 0.0
        while True:
            _follow(reader, result, on_event)
            if status_due(last_poll, ending=any(isinstance(e, (DoneEvent, ErrorEvent)) for e in result.events[-2:])):
                status, _ = run_status(flwr_run, env=env)
                last_poll = time.monotonic()
                if status.startswith("finished"):
                    _follow(reader, result, on_event)
                    result.status = status
                    break
            if time.perf_counter() - start > timeout:
                raise FlowerError(f"simulation did not finish within {timeout:.0f}s; see {workdir}/superlink.log")
            time.sleep(1.0)
        if result.status != "finished:completed" or result.adapters is None:
            errors = [e.message for e in select(result.events, ErrorEvent)]
            detail = errors[0] if errors else run_logs(flwr_run, env=env)
            raise FlowerError(f"simulation run {flwr_run} ended {result.status}: {detail}")
        return result
    finally:
        result.seconds = time.perf_counter() - start
        stop_process(link)


def _follow(reader: ProgressReader, result: SimulationResult, on_event: Callable[[Event], None] | None) -> None:
    """The events the ServerApp wrote since the last call, into ``result`` and to ``on_event``."""
    for event in reader.read_new():
        result.add(event)
        if on_event:
            on_event(event)
