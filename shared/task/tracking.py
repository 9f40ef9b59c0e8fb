"""Experiment tracking: the rows a trainer or a federation's server writes to its metrics.jsonl, also sent to
TensorBoard or MLflow (``tracking.backend``; none by default). The libraries are optional extras
(``pip install seedtune[tracking]``), imported only when a backend is chosen.

What goes where follows the privacy rules. TensorBoard writes event files inside the run folder
(``<out_dir>/tensorboard``), so it receives every numeric field of a row, a trainer's local monitoring of its
private batches included (loss, batch size, clipped counts), as metrics.jsonl holds them. MLflow may send to a
tracking server outside the run folder, so it receives only what may leave it: fields a trainer computes from
its private training data (:data:`PRIVATE_FIELDS`) are never logged there, nor exact counts of a user's files
(:func:`exact_count`: per-label examples, predictions and hits, a split's size), which single out records of
a small class; the node evaluation's per-label counts are DP-noised and do go.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import re
import time
from pathlib import Path
from typing import Any, Mapping, Protocol

from seedtune.shared.task.config import ConfigError, TrackingConfig

log = logging.getLogger(__name__)

# A trainer's row fields computed on its private training batch: local monitoring, never sent off the machine.
PRIVATE_FIELDS = frozenset({"loss", "batch", "clipped", "nonfinite"})
_COUNT_SUFFIXES = ("per_label", "_size", "_prompts", "_references")


def exact_count(key: str) -> bool:
    """Whether a row field holds exact counts of a user's data file (``test_per_label``, ``final/test_size``,
    ...): kept in the run folder, not sent off the machine. ``node_*`` counts are DP-noised releases."""
    name = key.rsplit("/", 1)[-1]
    return name.endswith(_COUNT_SUFFIXES) and not name.startswith("node_")


class Tracker(Protocol):
    def log(self, row: Mapping[str, Any], step: int) -> None:
        """Record a row's numeric fields at ``step`` (a training step or a federation round). A backend's error
        is logged, never raised: tracking must not stop a run (or a federation after a commit)."""

    def close(self, failed: bool = False) -> None:
        """Flush and release the backend; ``failed``: the run ended with an error."""


_BACKEND_MODULES = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow-skinny")}


def check_backend(config: TrackingConfig) -> None:
    """The chosen backend's library is installed: checked before a run writes anything."""
    if config.backend not in _BACKEND_MODULES:
        return
    module, package = _BACKEND_MODULES[config.backend]
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"tracking.backend {config.backend!r} needs the {package} package: pip install "
                          f"'seedtune[tracking]' (or pip install {package})")


def _metric_name(name: str) -> str:
    """MLflow's metric names allow letters, digits and _ - . / : and spaces; a holder or label name may not."""
    return re.sub(r"[^\w\-./: ]", "_", name)


def scalars(row: Mapping[str, Any], private_too: bool, prefix: str = "") -> dict[str, float]:
    """The finite numeric fields of a row (nested tables flattened with '/'); booleans and text left out."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if not private_too and (key in PRIVATE_FIELDS or exact_count(f"{prefix}{key}")):
            continue
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(scalars(value, private_too, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    return out


class _LogOnly:
    """Backend errors become one warning each time, not a failed run."""

    def log(self, row: Mapping[str, Any], step: int) -> None:
        try:
            self._log(row, step)
        except Exception as exc:  # a tracking server down, a full disk: the run's own files have the row
            log.warning("tracking: %s could not log step %d (%s); the run goes on", type(self).__name__, step, exc)

    def _log(self, row: Mapping[str, Any], step: int) -> None:
        raise NotImplementedError


class TensorBoardTracker(_LogOnly):
    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = run_dir / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.logdir))
        log.info("TensorBoard: tensorboard --logdir %s", self.logdir)

    def _log(self, row: Mapping[str, Any], step: int) -> None:
        for name, value in scalars(row, private_too=True).items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class MLflowTracker(_LogOnly):
    """An MLflow run through an explicit client: ``mlflow.set_tracking_uri`` and ``set_experiment`` would set
    MLFLOW_TRACKING_URI and MLFLOW_EXPERIMENT_ID in the caller's environment, so that a user's own MLflow calls
    (and every subprocess) after ``seedtune.train`` went to this run's store."""

    def __init__(self, run_dir: Path, config: TrackingConfig, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = config.uri or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"  # (MLflow 3 refuses a file store)
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(config.experiment)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self.client.create_experiment(config.experiment))
        self.run = self.client.create_run(experiment_id, run_name=run_dir.name)
        items = [Param(k, str(v)[:500]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow's limit per batch
            self.client.log_batch(self.run.info.run_id, params=items[start:start + 100])
        log.info("MLflow: run %s in experiment %r at %s (private-batch fields are not sent)",
                 self.run.info.run_id, config.experiment, uri)

    def _log(self, row: Mapping[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        values = scalars(row, private_too=False)
        if values:
            now = int(time.time() * 1000)
            self.client.log_batch(self.run.info.run_id,
                                  metrics=[Metric(_metric_name(k), v, now, step) for k, v in values.items()])

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run.info.run_id, status="FAILED" if failed else "FINISHED")


def open_tracker(config: TrackingConfig, run_dir: Path, params: Mapping[str, Any]) -> Tracker | None:
    """The configured backend for a run folder (None for ``none``); ``params``: the run's flattened config."""
    if config.backend == "none":
        return None
    check_backend(config)
    if config.backend == "tensorboard":
        return TensorBoardTracker(run_dir)
    return MLflowTracker(run_dir, config, params)
