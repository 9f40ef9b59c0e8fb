"""tracking.backend: TensorBoard event files and MLflow metrics fed from the rows a run already writes, with
the private-batch fields kept off MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import seedtune
from seedtune.shared.task.config import ConfigError, TrackingConfig, load_config
from seedtune.shared.task.tracking import PRIVATE_FIELDS, open_tracker, scalars


def _events(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_train_with_tensorboard_writes_event_files_of_its_rows(tmp_path):
    summary = seedtune.train(overrides={"model.name": "tiny-encoder", "schedule.stage_steps": [5],
                                        "eval.every": 2, "eval.dev_size": 16, "data.train_size": 800,
                                        "data.test_size": 16, "tracking.backend": "tensorboard"},
                             out=tmp_path / "run", progress=False)
    files = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert files, "no TensorBoard event file"
    events = _events(tmp_path / "run" / "tensorboard")
    assert [s for s, _ in events["coeff"]] == [1, 2, 3, 4, 5]
    assert [s for s, _ in events["dev_accuracy"]] == [0, 2, 4]
    assert events["epsilon"] == [(5, pytest.approx(summary["epsilon"]))]
    assert "loss" in events  # the run folder's own monitoring (metrics.jsonl holds it too)
    # tracking is this machine's bookkeeping: not in the ledger header every replica (every node) reads
    from seedtune.shared.protocol.ledger import Ledger

    ledger = Ledger.open(tmp_path / "run" / "ledger.sqlite")
    assert "tracking" not in json.loads(ledger.header.config_json)
    ledger.close()


def test_no_tracking_by_default_writes_nothing_more(tmp_path):
    assert load_config().tracking.backend == "none"
    assert open_tracker(TrackingConfig(), tmp_path, {}) is None and not any(tmp_path.iterdir())


def test_mlflow_gets_the_rows_without_the_private_batch_fields(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = open_tracker(TrackingConfig(backend="mlflow", uri=uri, experiment="t"), tmp_path, {"zo.lr": 0.1})
    tracker.log({"step": 1, "coeff": 0.5, "loss": 0.7, "batch": 12, "clipped": 3, "nonfinite": 0,
                 "dev_accuracy": 0.6, "epsilon": {"hospital A (Lyon)": 1.5}}, 1)
    run_id = tracker.run.info.run_id
    tracker.close()
    run = MlflowClient(uri).get_run(run_id)
    assert set(run.data.metrics) == {"step", "coeff", "dev_accuracy", "epsilon/hospital A _Lyon_"}
    assert run.data.params == {"zo.lr": "0.1"} and run.info.status == "FINISHED"
    assert not PRIVATE_FIELDS & set(run.data.metrics)


def test_mlflow_gets_no_exact_counts_of_a_users_files(tmp_path):
    """Issue 32: a summary's exact per-label counts of the user's own test file (a label held by one record
    shows as 1) and the split's size went to MLflow; the DP-noised counts of node evaluation may go."""
    counts = {"pos": {"examples": 1, "predicted": 2, "correct": 1}}
    row = {"final/test_accuracy": 0.5, "final/test_per_label": counts, "final/test_size": 40,
           "final/zero_shot_test_per_label": counts, "final/node_test_per_label": {"pos": {"examples": 1.7}},
           "test_prompts": 3, "epsilon": 1.0}
    assert scalars(row, private_too=False) == {"final/test_accuracy": 0.5, "epsilon": 1.0,
                                               "final/node_test_per_label/pos/examples": 1.7}
    assert "final/test_per_label/pos/examples" in scalars(row, private_too=True)  # TensorBoard: the run folder


def test_scalars_keep_finite_numbers_only():
    assert scalars({"a": 1, "b": float("nan"), "c": True, "d": "x", "e": {"f": 2.5}, "loss": 1.0},
                   private_too=False) == {"a": 1.0, "e/f": 2.5}


def test_an_unknown_backend_is_named():
    with pytest.raises(ConfigError, match="tracking.backend must be one of"):
        load_config(overrides={"tracking.backend": "wandb"})
