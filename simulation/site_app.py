"""The simulation's Flower app: the product's own handlers, with the virtual sites bound here.

On the Simulation Engine a virtual node has only a ``partition-id``; this app maps
partition k to ``site{k+1}`` with its data under ``sim-data-root`` and its DP ledger and
audit trail under ``sim-state-root``, then calls the same :func:`client.task.train_reply`
and :func:`client.task.evaluate_reply` a hospital runs.  Its ServerApp removes these
simulation keys and runs the product's :func:`server.federation.run_federation`, which
refuses any key it does not own.  :func:`simulation.launch.app_dir` writes the app's
pyproject.toml: the product's, with these components and keys.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from client.binding import SiteBinding
from client.secagg import stage_reply
from client.task import evaluate_reply, train_reply
from server.federation import run_federation

SIM_KEYS = {
    "sim-data-root": "",  # virtual site k reads <sim-data-root>/site<k+1>
    "sim-state-root": "",  # ... and keeps its DP ledger and audit trail in <sim-state-root>/site<k+1>
    "sim-max-epsilon": "",  # own DP ceilings of chosen sites, e.g. "site2=1.5,site3=4"
}


def simulated_site(partition: int, run_config: Mapping[str, Any]) -> SiteBinding:
    """Virtual site k+1: data, state and optional own DP ceiling under the run's folder."""
    name = f"site{partition + 1}"
    root = str(run_config.get("sim-data-root", "")).strip()
    if not root:
        raise ValueError("the simulation's run config has no sim-data-root; start it with simulation/run.py")
    state_root = str(run_config.get("sim-state-root", "")).strip()
    ceilings = {}
    for item in str(run_config.get("sim-max-epsilon", "")).split(","):
        site, _, value = item.partition("=")
        if site.strip() and value.strip():
            ceilings[site.strip()] = float(value)
    return SiteBinding(name, Path(root) / name, state_dir=Path(state_root) / name if state_root else None,
                       max_epsilon=ceilings.get(name), coordinator="simulation")


def _binding(context: Context) -> SiteBinding:
    return simulated_site(int(context.node_config["partition-id"]), context.run_config)


clientapp = ClientApp()


@clientapp.train()
def train(msg: Message, context: Context) -> Message:
    return train_reply(msg, context, binding=_binding(context))


@clientapp.train("secagg")
def secagg(msg: Message, context: Context) -> Message:
    return stage_reply(msg, context, binding=_binding(context))


@clientapp.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return evaluate_reply(msg, context, binding=_binding(context))


serverapp = ServerApp()


@serverapp.main()
def main(grid: Grid, context: Context) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run_federation(grid, {k: v for k, v in context.run_config.items() if k not in SIM_KEYS})
