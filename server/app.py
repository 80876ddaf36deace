"""NEARL ServerApp: builds the zero-initialised adapters (round 0 = zero-shot CLIP), picks the
strategy from the run config and runs the rounds with Flower's ``Strategy.start()``; see
:mod:`server.federation` for logging, checkpoints and resume."""

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.federation import run_federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run_federation(grid, dict(context.run_config))
