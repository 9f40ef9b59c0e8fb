"""The prepared accelerator check (scripts/gpu_check.sh): what a GPU machine must show, in one run that fits
its time, printing one JSON line per check and a final summary line.

    python -m seedtune.simulations.gpu_check --device cuda --budget-s 450        # on a GPU machine (under 8 minutes)
    python -m seedtune.simulations.gpu_check --device cpu --quick                 # the same code path on tiny models

1. ``bench_step`` rows for MiniLM and SmolLM2 in float32 and bfloat16 on the device: step/forward ratio and
   peak memory while training against inference (``torch.cuda.max_memory_allocated`` on CUDA).
2. Direction streams generated on the device equal the CPU and numpy streams, bit for bit.
3. A short bfloat16 training run on the device replays on the CPU in float32 to the same model digest.
4. SmolLM2 on SST-2 at epsilon 3 (configs/smollm2_eps3.toml) on the device in bfloat16, with as many steps as
   the remaining budget allows (thousands on a GPU): zero-shot and final test accuracy, steps, epsilon.

Hyperparameters are the config's (chosen on the public dev split, docs/results.md), not tuned on this run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seedtune.shared.task.config import load_config
from seedtune.shared.engine.directions import direction_numpy, direction_torch
from seedtune.simulations import bench_step

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger(__name__)


def emit(row: dict[str, Any]) -> dict[str, Any]:
    print(json.dumps(row), flush=True)
    return row


def bench_rows(models: list[str], device: str, dtypes: list[str], repeats: int, batch_size: int) -> list[dict]:
    """bench_step on the device, with the accelerator's own peak memory per phase where it has one."""
    rows = []
    for name in models:
        for dtype in dtypes:
            row = bench_step.bench(name, batch_size, 64, 0.01, repeats, device=device, dtype=dtype)
            rows.append(emit({"check": "bench_step", **row}))
    return rows


def direction_check(device: str) -> dict[str, Any]:
    """Rademacher and Gaussian streams on the device against the CPU and numpy, at unaligned offsets."""
    cases = 0
    for kind in ("rademacher", "gaussian"):
        for seed, start, count in ((1, 0, 4096), (2**63 + 5, 12_345, 300_001), (2**64 - 1, 7, 1_000_003)):
            on_device = direction_torch(seed, start, count, kind, device=device).cpu()
            if not (torch.equal(on_device, direction_torch(seed, start, count, kind))
                    and np.array_equal(on_device.numpy(), direction_numpy(seed, start, count, kind))):
                return emit({"check": "directions", "ok": False, "device": device, "kind": kind, "seed": seed,
                             "start": start, "count": count})
            cases += 1
    return emit({"check": "directions", "ok": True, "device": device, "cases": cases})


def replay_check(model: str, device: str, steps: int, out: Path) -> dict[str, Any]:
    """Train a few steps with bfloat16 forwards on the device; replay the ledger in float32 on the CPU."""
    from seedtune.client.trainer import train
    from seedtune.server.replay import replay

    config = load_config(None, {"model.name": model, "model.device": device, "model.dtype": "bfloat16",
                                "schedule.stage_steps": [steps], "eval.every": 0, "data.train_size": 2000,
                                "data.test_size": 64, "out_dir": str(out)})
    summary = train(config, progress=False)
    replayed = replay(summary["ledger"])
    return emit({"check": "replay", "ok": replayed["model_digest"] == summary["model_digest"], "model": model,
                 "device": summary["device"], "steps": steps, "train_model_digest": summary["model_digest"],
                 "replay_model_digest": replayed["model_digest"]})


def utility_run(config_file: Path, device: str, dtype: str, seconds: float, step_s: float,
                out: Path) -> dict[str, Any]:
    """The config's run at its epsilon with the steps that fit in ``seconds`` (the budget left), in the config's
    stage proportions."""
    from seedtune.client.trainer import train

    base = load_config(config_file, {})
    planned = base.schedule.stage_steps
    steps = max(1, int(0.7 * seconds / max(step_s, 1e-3)))  # evaluation and setup take the rest
    scale = steps / sum(planned)
    stage_steps = [max(1, round(s * scale)) for s in planned]
    config = load_config(config_file, {"model.device": device, "model.dtype": dtype,
                                       "schedule.stage_steps": stage_steps, "eval.every": 0,
                                       "data.test_size": 872, "out_dir": str(out)})
    start = time.time()
    summary = train(config, progress=False)
    return emit({"check": "utility", "config": str(config_file), "device": summary["device"], "dtype": dtype,
                 "steps": summary["steps"], "stage_steps": stage_steps, "epsilon": summary["epsilon"],
                 "zero_shot_accuracy": summary["zero_shot_accuracy"], "test_accuracy": summary["test_accuracy"],
                 "gain_points": round(100 * (summary["test_accuracy"] - summary["zero_shot_accuracy"]), 2),
                 "train_s": summary["train_s"], "wall_s": round(time.time() - start, 1)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="the accelerator (cuda, cuda:N, mps) or cpu")
    parser.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget of the whole check")
    parser.add_argument("--quick", action="store_true", help="tiny models and a few steps (CI; any device)")
    parser.add_argument("--out", default="", help="run folders (default: a temporary folder)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    start = time.time()
    out = Path(args.out or tempfile.mkdtemp(prefix="gpu-check-"))
    env = {"check": "environment", "device": args.device, "torch": torch.__version__,
           "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    emit(env)
    if args.quick:
        models, config_file, repeats, batch, replay_model = ["tiny-encoder", "tiny-decoder"], None, 3, 8, "tiny-decoder"
    else:
        models, config_file, repeats, batch, replay_model = \
            ["minilm", "smollm2"], ROOT / "configs" / "smollm2_eps3.toml", 5, 32, "smollm2"
    checks: dict[str, Any] = {}
    rows = bench_rows(models, args.device, ["float32", "bfloat16"], repeats, batch)
    checks["directions"] = direction_check(args.device)["ok"]
    checks["replay"] = replay_check(replay_model, args.device, 20 if args.quick else 50, out / "replay")["ok"]
    smollm2_bf16 = next((r for r in rows if r["model"] == models[-1] and r["dtype"] == "bfloat16"), rows[-1])
    left = args.budget_s - (time.time() - start)
    if config_file is not None and left > 60:
        utility = utility_run(config_file, args.device, "bfloat16", left, smollm2_bf16["zo_step_s"],
                              out / "utility")
        checks["utility_gain_points"] = utility["gain_points"]
    emit({"check": "summary", "ok": checks["directions"] and checks["replay"], **checks,
          "wall_s": round(time.time() - start, 1)})
    return 0 if checks["directions"] and checks["replay"] else 1


if __name__ == "__main__":
    sys.exit(main())
