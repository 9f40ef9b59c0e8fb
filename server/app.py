"""The Flower ServerApp: reads the run configuration and hands the Grid to :class:`FederatedServer`."""

from __future__ import annotations

import logging
import time

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from seedtune.server.federation import FederatedServer
from seedtune.shared.config import config_from_flower

log = logging.getLogger(__name__)
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3"):  # one line per HTTP poll otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        config = config_from_flower(context.run_config)
        if config.threads:
            torch.set_num_threads(config.threads)
        run_dir = config.out_dir or f"runs/federated-{time.strftime('%Y%m%d-%H%M%S')}"
        FederatedServer(config, grid, run_dir).run()
    except Exception as exc:
        # Raised on, Flower ends the run with status finished:failed and this message as its details (flwr ls);
        # the line names the error for whoever reads the stream or the log.
        log.error("seedtune: run failed: %s: %s", type(exc).__name__, exc)
        raise
