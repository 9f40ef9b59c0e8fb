"""A federated run's folder: per-round metrics as JSON lines and CSV, a summary, and PNG plots.

metrics.jsonl is appended and flushed per round, so it is readable while the run goes on and survives
a server crash (a resumed run appends to it); the CSV, the summary and the plots are written at the end.
Each committed round's line carries the ledger's round chain head (``ledger_record``): the :class:`Anchor`
outside the ledger file against which a resumed server and ``seedtune verify`` check that the ledger did not
go backwards or get rewritten. A line torn by a crash (the last one) is skipped with a warning; values that
are not finite numbers are written as null, never as ``Infinity`` (not JSON).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from seedtune.shared.protocol.ledger import Anchor
from seedtune.shared.protocol.run_folder import METRICS_FILE, SUMMARY_FILE, anchor_of, ends_with_newline, read_rows
from seedtune.shared.task.tracking import Tracker

log = logging.getLogger(__name__)
CSV_COLUMNS = ("round", "dev_accuracy", "nodes", "replies", "accepted", "rejected", "entries",
               "ledger_entries", "epsilon_max", "bytes_up_max", "bytes_up_per_step", "bytes_down_max",
               "bytes_down_total", "wall_s")


class RunReport:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.tracker: Tracker | None = None  # set once the run checked out: rows and the summary also go there
        self.path = run_dir / METRICS_FILE
        self.rows: list[dict[str, Any]] = read_rows(self.path)

    def anchor(self) -> Anchor | None:
        """The last committed round's ledger record, as this run folder wrote it (None before any round)."""
        return anchor_of(self.rows, str(self.path))

    @contextmanager
    def tracking(self, tracker: Tracker | None) -> Iterator[None]:
        """Rows and the summary also go to ``tracker`` within this block; a run that fails closes it as failed."""
        self.tracker = tracker
        try:
            yield
        except BaseException:
            if self.tracker is not None:
                self.tracker.close(failed=True)
                self.tracker = None
            raise

    def add(self, row: dict[str, Any]) -> None:
        row = finite(row)
        self.rows = [r for r in self.rows if r.get("round") != row.get("round")] + [row]
        torn = not ends_with_newline(self.path)
        with self.path.open("a") as fh:  # after a torn line, on a line of its own (the torn one stays skipped)
            fh.write(("\n" if torn else "") + json.dumps(row, allow_nan=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if self.tracker is not None:
            self.tracker.log(row, int(row.get("round", 0)))

    def finish(self, summary: dict[str, Any]) -> None:
        (self.run_dir / SUMMARY_FILE).write_text(json.dumps(finite(summary), indent=2, allow_nan=False))
        with (self.run_dir / "metrics.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for row in sorted(self.rows, key=lambda r: r["round"]):
                writer.writerow({k: row.get(k, "") for k in CSV_COLUMNS})
        self.plot()
        if self.tracker is not None:
            self.tracker.log({f"final/{k}": v for k, v in summary.items()},
                             max((int(r.get("round", 0)) for r in self.rows), default=0))
            self.tracker.close()
            self.tracker = None

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


def finite(value: Any, where: str = "") -> Any:
    """``value`` with every non-finite float replaced by None (logged): JSON has no Infinity or NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        log.warning("metric %s is %r; written as null", where or "value", value)
        return None
    if isinstance(value, dict):
        return {k: finite(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return value
