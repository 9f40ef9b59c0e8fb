"""A federated run's folder: per-round metrics as JSON lines and CSV, a summary, and PNG plots.

metrics.jsonl is appended and flushed per round, so it is readable while the run goes on and survives
a server crash (a resumed run appends to it); the CSV, the summary and the plots are written at the end.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from shared.run_folder import METRICS_FILE, SUMMARY_FILE
CSV_COLUMNS = ("round", "dev_accuracy", "nodes", "replies", "accepted", "rejected", "entries",
               "ledger_entries", "epsilon_max", "bytes_up_max", "bytes_up_per_step", "bytes_down_max",
               "bytes_down_total", "wall_s")


class RunReport:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.path = run_dir / METRICS_FILE
        self.rows: list[dict[str, Any]] = []
        if self.path.exists():
            with self.path.open() as fh:
                self.rows = [json.loads(line) for line in fh if line.strip()]

    def add(self, row: dict[str, Any]) -> None:
        # A resumed run may repeat a round whose metrics line was written but whose commit was lost: keep the last.
        self.rows = [r for r in self.rows if r.get("round") != row.get("round")] + [row]
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def finish(self, summary: dict[str, Any]) -> None:
        (self.run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        with (self.run_dir / "metrics.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for row in sorted(self.rows, key=lambda r: r["round"]):
                writer.writerow({k: row.get(k, "") for k in CSV_COLUMNS})
        self.plot()

    def plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = sorted(self.rows, key=lambda r: r["round"])
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        acc = [(r["round"], r["dev_accuracy"]) for r in rows if r.get("dev_accuracy") is not None]
        if acc:
            axes[0].plot(*zip(*acc), marker="o")
        axes[0].set(title="global model, dev accuracy", xlabel="round", ylabel="accuracy")
        eps = [(r["round"], r["epsilon_max"]) for r in rows if r.get("epsilon_max") is not None]
        if eps:
            axes[1].plot(*zip(*eps), marker="o")
        axes[1].set(title="privacy spent (max over clients, PLD)", xlabel="round", ylabel="epsilon")
        up = [(r["round"], r["bytes_up_max"]) for r in rows if r.get("bytes_up_max")]
        down = [(r["round"], r["bytes_down_max"]) for r in rows if r.get("bytes_down_max")]
        if up:
            axes[2].plot(*zip(*up), marker="o", label="uplink (max per client)")
        if down:
            axes[2].plot(*zip(*down), marker="s", label="downlink (max per client)")
        axes[2].set(title="bytes on the wire per round", xlabel="round", ylabel="bytes", yscale="log")
        if up or down:
            axes[2].legend()
        fig.tight_layout()
        fig.savefig(self.run_dir / "metrics.png", dpi=100)
        plt.close(fig)
