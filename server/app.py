"""NEARL ServerApp: builds the zero-initialised adapters (round 0 = zero-shot CLIP), picks the
strategy from the run config and runs the rounds with :mod:`server.loop` (Flower's
``Strategy.start()`` loop, with early stopping); see :mod:`server.federation` for logging,
checkpoints, resume and which round's adapters the federation keeps."""

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.federation import run_federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run_federation(grid, dict(context.run_config))
