"""The FedAvg server of the first-order baseline, over Flower's Message API, and an in-process runner.

Per round the server sends every node the global trainable tensors, averages the replies' tensors with
equal weights (each is one node's clipped, noised local update applied to the global model; the average is
post-processing), and records the bytes each message really costs on the wire (``shared.protocol.wire.wire_bytes``).
After the last round it evaluates the global model on the test split and writes ``summary.json``.
:func:`simulations.fedavg.run_fedavg` runs it with its client half (:mod:`client.baselines.fedavg`).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from seedtune.shared.task.first_order import METRICS, TRAINABLE, FedAvgConfig, prepare_trainable, trainable_state
from seedtune.shared.task.loading import load_task_model
from seedtune.shared.protocol.run_folder import SUMMARY_FILE
from seedtune.shared.task.tasks import load_split
from seedtune.shared.protocol.wire import TRAIN, wire_bytes

log = logging.getLogger(__name__)


def average(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Equal-weight mean of the nodes' trainable tensors."""
    return {name: torch.stack([s[name] for s in states]).mean(0) for name in states[0]}


def run_rounds(config: FedAvgConfig, grid: Grid) -> dict[str, Any]:
    start = time.time()
    cfg = config.learner
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    task = load_task_model(cfg.model, cfg.task)
    trainable = prepare_trainable(task, cfg.lora_rank, cfg.lora_alpha)
    test = load_split(cfg, "test")
    test_ids = task.encode(test.records)
    zero_shot = task.accuracy(test_ids, test.labels, cfg.model.microbatch)
    rounds: list[dict[str, Any]] = []
    for rnd in range(1, config.rounds + 1):
        nodes = sorted(grid.get_node_ids())
        content = RecordDict({TRAINABLE: ArrayRecord(trainable_state(task.module))})
        messages = [Message(content, dst_node_id=n, message_type=TRAIN, group_id=str(rnd)) for n in nodes]
        down = [wire_bytes(m) for m in messages]
        replies = [r for r in grid.send_and_receive(messages) if not r.has_error()]
        if not replies:
            raise RuntimeError(f"round {rnd}: no node replied without error")
        up = [wire_bytes(r) for r in replies]
        new = average([r.content.array_records[TRAINABLE].to_torch_state_dict() for r in replies])
        task.module.load_state_dict(new, strict=False)
        metrics = [r.content.metric_records[METRICS] for r in replies]
        rounds.append({"round": rnd, "replies": len(replies), "bytes_up_max": max(up), "bytes_down_max": max(down),
                       "epsilon_max": max((m["epsilon"] for m in metrics if "epsilon" in m), default=None)})
        log.info("fedavg round %d: %d replies, uplink %d B per node", rnd, len(replies), max(up))
    summary = {
        "model": task.name, "method": "fed-" + cfg.method, "rounds": config.rounds, "clients": len(nodes),
        "local_steps": config.local_steps, "trainable_params": trainable,
        "bytes_up_per_client_round": max(r["bytes_up_max"] for r in rounds),
        "bytes_down_per_client_round": max(r["bytes_down_max"] for r in rounds),
        "epsilon_max": rounds[-1]["epsilon_max"], "delta": cfg.delta if cfg.private else None,
        "zero_shot_accuracy": zero_shot,
        "test_accuracy": task.accuracy(test_ids, test.labels, cfg.model.microbatch),
        "rounds_log": rounds, "wall_s": round(time.time() - start, 2),
    }
    if config.out_dir:
        Path(config.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(config.out_dir) / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    return summary


def make_server_app(config: FedAvgConfig) -> ServerApp:
    """A ServerApp bound to one FedAvg configuration (``run_simulation`` passes no run config)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_rounds(config, grid)

    return app
