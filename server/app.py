"""The Flower ServerApp: reads the run configuration and hands the Grid to :class:`FederatedServer`."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from seedtune.server.federation import FederatedServer
from seedtune.shared.task.config import ConfigError, RunConfig, config_from_flower
from seedtune.shared.task.tasks import DataError, data_roots

log = logging.getLogger(__name__)
app = ServerApp()


def check_submitted_paths(config: RunConfig) -> None:
    """A Flower run config comes from whoever submits the run (``flwr run``), and the files it names are read on
    the server's host: they must lie under the server's data roots (shared.task.tasks.data_roots: the working
    directory, ``$SEEDTUNE_DATA``, the team data folder), so that a submission cannot read any CSV there."""
    roots = [root.resolve() for root in data_roots()]
    for field in ("train_file", "test_file", "dev_file", "data_dir"):
        value = getattr(config.data, field)
        if not value:
            continue
        relative_dir = field == "data_dir" and not Path(value).is_absolute()
        places = [(root / value).resolve() for root in roots] if relative_dir else [Path(value).resolve()]
        if not all(any(place.is_relative_to(root) for root in roots) for place in places):
            raise ConfigError(f"data.{field} {value!r} is outside the server's data roots "
                              f"({', '.join(map(str, roots))}); name a file or folder under one of them "
                              f"(the server operator adds a root with $SEEDTUNE_DATA)")


@app.main()
def main(grid: Grid, context: Context) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3"):  # one line per HTTP poll otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        config = config_from_flower(context.run_config)
        check_submitted_paths(config)
        if config.threads:
            torch.set_num_threads(config.threads)
        run_dir = config.out_dir or f"runs/federated-{time.strftime('%Y%m%d-%H%M%S')}"
        try:
            FederatedServer(config, grid, run_dir).run()
        except DataError as exc:  # its message may quote the file (a header, a record): the server's log only
            log.error("seedtune: the server's data is unusable: %s", exc)
            raise DataError("the server's data files are unusable; the details (which may quote them) are in the "
                            "server's log") from None
    except Exception as exc:
        # Raised on, Flower ends the run with status finished:failed and this message as its details (flwr ls);
        # the line names the error for whoever reads the stream or the log.
        log.error("seedtune: run failed: %s: %s", type(exc).__name__, exc)
        raise
