"""The FedAvg baseline as one in-process Flower simulation: its server half (:mod:`server.baselines.fedavg`)
and client half (:mod:`client.baselines.fedavg`) run together by ``flwr.simulation.run_simulation`` (Ray
backend); what bench_utility's ``fed-dpsgd`` rows and the baseline tests call."""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from seedtune.client.baselines.fedavg import make_client_app
from seedtune.server.baselines.fedavg import make_server_app
from seedtune.shared.task.first_order import FedAvgConfig
from seedtune.shared.protocol.run_folder import SUMMARY_FILE


@contextmanager
def _caller_process_kept() -> Iterator[None]:
    """Give the caller back its environment and import path. Flower's Ray backend sets ``PYTHONPATH`` to this
    process's whole ``sys.path`` (so that its actors import what the driver does) and never restores it: every
    subprocess the caller started afterwards imported from those folders (in the tests: a checkout in place of
    the wheel under test, issue 36)."""
    environ, path = dict(os.environ), list(sys.path)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(environ)
        sys.path[:] = path


def run_fedavg(config: FedAvgConfig) -> dict[str, Any]:
    """Run the federation in this process with Flower's simulation runtime; returns the server's summary."""
    from flwr.simulation import run_simulation

    if not config.out_dir:
        raise ValueError("run_fedavg needs config.out_dir: the ServerApp reports through its summary.json")
    config.learner.validate()
    threads = max(config.learner.threads, 1)
    with _caller_process_kept():
        run_simulation(server_app=make_server_app(config), client_app=make_client_app(config),
                       num_supernodes=config.num_clients,
                       backend_config={"client_resources": {"num_cpus": threads, "num_gpus": 0.0},
                                       "init_args": {"num_cpus": threads, "include_dashboard": False}})
        import ray

        if ray.is_initialized():  # leave no actor behind (a benchmark runs rows one after another)
            ray.shutdown()
    path = Path(config.out_dir) / SUMMARY_FILE
    if not path.is_file():
        raise RuntimeError(f"the FedAvg simulation wrote no {path}; see the log above")
    return json.loads(path.read_text())
