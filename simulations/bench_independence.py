"""Benchmark: how far a record's two-point estimate moves with its batch-mates, and what scoring alone costs.

    python -m seedtune.simulations.bench_independence [--model minilm] [--batches 6] [--threads 2]

The sensitivity argument needs each record's clipped estimate to depend on that record alone (docs/noise.md,
"Per-example independence"). Records scored together in padded microbatches do not quite: the padding length
and the kernels' blocking depend on the batch. On public rows (the task's dev split), with the config's
trainable set, mu, batch size and microbatch, this measures the largest change of one estimate when one record
joins the batch (``max_move_one_added``) and against the record scored alone (``max_move_vs_alone``), then the
same with ``microbatch = 1`` (expected 0.0) and the CPU seconds of both. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from seedtune.client.zo_step import projected_gradients
from seedtune.shared.task.config import load_config
from seedtune.shared.task.loading import load_task_model
from seedtune.shared.engine.replica import select_trainable
from seedtune.shared.task.tasks import load_split
from seedtune.shared.engine.update import ScoredView


def measure(model: str, batches: int, alone: int = 8) -> dict:
    config = load_config(overrides={"model.name": model})
    task = load_task_model(config.model, config.task)
    dev = load_split(config, "dev")
    view = ScoredView(task, select_trainable(task, config), config.zo.direction)
    mu, micro, size = config.zo.mu, config.model.microbatch, config.zo.batch_size
    rng = np.random.default_rng(0)  # which public rows and directions: a fixed, reproducible choice
    moved, versus_alone, moved_one, cpu = 0.0, 0.0, 0.0, {micro: 0.0, 1: 0.0}
    for _ in range(batches):
        rows = rng.choice(len(dev.labels), size + 1, replace=False)
        ids, labels = task.encode([dev.records[i] for i in rows]), np.asarray(dev.labels)[rows]
        seed = int(rng.integers(1 << 62))
        for m in (micro, 1):
            start = time.process_time()
            more, _ = projected_gradients(view, ids, labels, seed, mu, m)
            cpu[m] += time.process_time() - start
            fewer, _ = projected_gradients(view, ids[:-1], labels[:-1], seed, mu, m)
            change = float(np.abs(more[:-1] - fewer).max())
            if m == micro:
                moved = max(moved, change)
                singles = [projected_gradients(view, [ids[i]], labels[i:i + 1], seed, mu, 1)[0][0]
                           for i in range(alone)]
                versus_alone = max(versus_alone, float(np.abs(more[:alone] - np.array(singles)).max()))
            else:
                moved_one = max(moved_one, change)
    return {"model": model, "task": config.task.name, "batches": batches, "batch_size": size, "microbatch": micro,
            "mu": mu, "clip": config.privacy.clip, "trainable_entries": view.selection.size,
            "max_move_one_added": moved, "max_move_vs_alone": versus_alone,
            "sensitivity_bound_over_clip": 1 + size * moved / config.privacy.clip,
            "microbatch1_max_move_one_added": moved_one,
            "cpu_s": {f"microbatch_{m}": round(s, 2) for m, s in cpu.items()},
            "cpu_ratio_alone": round(cpu[1] / cpu[micro], 2) if cpu[micro] else None}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(json.dumps(measure(args.model, args.batches)), flush=True)


if __name__ == "__main__":
    main()
