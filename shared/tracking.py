"""Experiment tracking: the rows a trainer or a federation's server writes to its metrics.jsonl, also sent to
TensorBoard or MLflow (``tracking.backend``; none by default). The libraries are optional extras
(``pip install seedtune[tracking]``), imported only when a backend is chosen.

What goes where follows the privacy rules. TensorBoard writes event files inside the run folder
(``<out_dir>/tensorboard``), so it receives every numeric field of a row, a trainer's local monitoring of its
private batches included (loss, batch size, clipped counts), as metrics.jsonl holds them. MLflow may send to a
tracking server outside the run folder, so it receives only what may leave it: fields a trainer computes from
its private training data (:data:`PRIVATE_FIELDS`) are never logged there.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Mapping, Protocol

from seedtune.shared.config import ConfigError, TrackingConfig

log = logging.getLogger(__name__)

# A trainer's row fields computed on its private training batch: local monitoring, never sent off the machine.
PRIVATE_FIELDS = frozenset({"loss", "batch", "clipped", "nonfinite"})


class Tracker(Protocol):
    def log(self, row: Mapping[str, Any], step: int) -> None:
        """Record a row's numeric fields at ``step`` (a training step or a federation round)."""

    def close(self) -> None:
        """Flush and release the backend."""


def scalars(row: Mapping[str, Any], private_too: bool, prefix: str = "") -> dict[str, float]:
    """The finite numeric fields of a row (nested tables flattened with '/'); booleans and text left out."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if not private_too and key in PRIVATE_FIELDS:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(scalars(value, private_too, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    return out


class TensorBoardTracker:
    def __init__(self, run_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ConfigError("tracking.backend 'tensorboard' needs the tensorboard package: pip install "
                              "'seedtune[tracking]' (or pip install tensorboard)") from exc
        self.logdir = run_dir / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.logdir))
        log.info("TensorBoard: tensorboard --logdir %s", self.logdir)

    def log(self, row: Mapping[str, Any], step: int) -> None:
        for name, value in scalars(row, private_too=True).items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MLflowTracker:
    def __init__(self, run_dir: Path, config: TrackingConfig, params: Mapping[str, Any]) -> None:
        try:
            import mlflow
        except ImportError as exc:
            raise ConfigError("tracking.backend 'mlflow' needs mlflow: pip install 'seedtune[tracking]' (or pip "
                              "install mlflow-skinny)") from exc
        self.mlflow = mlflow
        uri = config.uri or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"  # (MLflow 3 refuses a file store)
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(config.experiment)
        self.run = mlflow.start_run(run_name=run_dir.name)
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        log.info("MLflow: run %s in experiment %r at %s (private-batch fields are not sent)",
                 self.run.info.run_id, config.experiment, uri)

    def log(self, row: Mapping[str, Any], step: int) -> None:
        values = scalars(row, private_too=False)
        if values:
            self.mlflow.log_metrics({k.replace("/", "."): v for k, v in values.items()}, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


def open_tracker(config: TrackingConfig, run_dir: Path, params: Mapping[str, Any]) -> Tracker | None:
    """The configured backend for a run folder (None for ``none``); ``params``: the run's flattened config."""
    if config.backend == "none":
        return None
    if config.backend == "tensorboard":
        return TensorBoardTracker(run_dir)
    return MLflowTracker(run_dir, config, params)
