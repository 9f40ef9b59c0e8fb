"""Forward passes in bfloat16 (or on another device) over a float32 master of the trainable entries (issue 19):
the losses stay close to float32, the updates are kept exactly, a ledger replays to the same float32 values and
digest whatever dtype trained it, and a device this machine lacks is refused by name before anything is
written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from seedtune.shared.task.config import ConfigError, ModelConfig, load_config
from seedtune.shared.engine.directions import direction_numpy, direction_torch
from seedtune.shared.task.loading import load_task_model
from seedtune.shared.engine.selection import select_pruned
from seedtune.shared.engine.update import ScoredView
from tests.helpers import LABELS, SENTENCES

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
LOSS_TOLERANCE = 0.05  # |bfloat16 - float32| per-example cross-entropy on the tiny models (measured: 0.011, 5e-4)


def _views(name: str, dtype: torch.dtype = torch.bfloat16) -> tuple[ScoredView, ScoredView]:
    full = load_task_model(ModelConfig(name=name))
    selection = select_pruned(full.module, full.synflow_output, 0.05, ())
    half = load_task_model(ModelConfig(name=name))
    return ScoredView(full, selection), ScoredView.placed(half, selection, "rademacher", CPU, dtype)


@pytest.mark.parametrize("name", ["tiny-encoder", "tiny-decoder"])
def test_bfloat16_losses_agree_with_float32(name):
    full, half = _views(name)
    ids = full.task.encode(SENTENCES)
    a, b = full.per_example_loss(ids, LABELS), half.per_example_loss(ids, LABELS)
    assert b.dtype == np.float32 and np.abs(a - b).max() < LOSS_TOLERANCE
    assert next(half.task.module.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["tiny-encoder", "tiny-decoder"])
def test_small_updates_are_kept_in_the_float32_master(name):
    """An update of 1e-6 vanishes in a bfloat16 weight; the master keeps it, bit for bit as float32 does, and a
    perturbation round trip restores it exactly."""
    full, half = _views(name)
    before = [v.clone() for v in half.values()]
    weights = [p.detach().clone() for p in half.task.module.parameters()]
    for seed in range(6):
        full.apply(seed, 1e-6)
        half.apply(seed, 1e-6)
    assert all(torch.equal(x, y) for x, y in zip(full.values(), half.values()))
    moved_master = sum(int((x != y).sum()) for x, y in zip(before, half.values()))
    # in the forward copy almost nothing moved: 6e-6 is below bfloat16's resolution except next to zero
    moved_weights = sum(int((w != p).sum()) for w, p in zip(weights, half.task.module.parameters()))
    assert moved_master > 0.5 * sum(v.numel() for v in before) and moved_weights < 0.1 * moved_master
    half.snapshot()
    half.perturb(99, 1e-3)
    half.restore()
    assert all(torch.equal(x, y) for x, y in zip(full.values(), half.values()))


def _train(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "seedtune.cli", "train", "--no-progress", "--out",
                           str(tmp_path / "run"), "-s", "model.name=tiny-decoder", "-s", "schedule.stage_steps=[5]",
                           "-s", "eval.every=0", "-s", "data.train_size=300", "-s", "data.test_size=32",
                           "-s", "zo.lr=1e-3", *extra], capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_the_gpu_check_runs_and_a_bfloat16_ledger_replays_on_the_cpu_in_float32(tmp_path):
    """scripts/gpu_check.sh on the CPU with tiny models: the bench rows in both dtypes, the direction check, and a
    bfloat16 training run whose ledger, replayed in float32 on the CPU, gives the trainer's model digest."""
    env = {**os.environ, "DEVICE": "cpu", "QUICK": "1", "OUT": str(tmp_path), "PYTHON": sys.executable}
    out = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    bench = {(r["model"], r["dtype"]) for r in rows if r["check"] == "bench_step"}
    assert bench == {(m, d) for m in ("tiny-encoder", "tiny-decoder") for d in ("float32", "bfloat16")}
    replay = next(r for r in rows if r["check"] == "replay")
    assert replay["ok"] and replay["train_model_digest"] == replay["replay_model_digest"]
    assert rows[-1]["check"] == "summary" and rows[-1]["ok"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_missing_cuda_device_is_refused_before_anything_is_written(tmp_path):
    out = _train(tmp_path, "-s", "model.device=cuda")
    assert out.returncode == 2 and "model.device 'cuda'" in out.stderr and "no CUDA device" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, message", [
    ({"model.dtype": "float64"}, "model.dtype must be one of"),
    ({"model.device": "gpu"}, "model.device must be auto, cpu, cuda, cuda:N or mps"),
    ({"model.dtype": "bfloat16", "selection.strategy": "dynamic"}, "selection.strategy must be 'static'"),
])
def test_bad_placements_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, override)


def test_a_federation_of_float32_and_bfloat16_nodes_agrees(tmp_path, caplog):
    """Each node picks its own dtype (node config): their replicas reach the same float32 state digests, and a
    node asking for a device it lacks refuses by name."""
    from seedtune.server.federation import FederatedServer
    from seedtune.simulations.inprocess import InProcessGrid
    from tests.test_federation import fed_config

    nodes = {1: {"dtype": "bfloat16"}}
    if not torch.cuda.is_available():
        nodes[2] = {"device": "cuda"}
    grid = InProcessGrid(3, node_configs=nodes)
    summary = FederatedServer(fed_config(tmp_path, **{"federation.rounds": 2}), grid, tmp_path).run()
    digests = summary["client_digests"]
    ids = [str(n) for n in grid.get_node_ids()]
    assert digests[ids[0]] == digests[ids[1]] == summary["state_digest"]
    if 2 in nodes:
        assert ids[2] not in digests and not summary["clients_agree"]
        assert "model.device 'cuda': this machine has no CUDA device" in caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_directions_on_cuda_equal_the_cpu_and_numpy_streams():
    for kind in ("rademacher", "gaussian"):
        for seed, start, count in ((1, 0, 1000), (2**63 + 5, 12345, 70_001)):
            cuda = direction_torch(seed, start, count, kind, device="cuda").cpu()
            assert torch.equal(cuda, direction_torch(seed, start, count, kind))
            assert np.array_equal(cuda.numpy(), direction_numpy(seed, start, count, kind))
