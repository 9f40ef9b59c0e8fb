"""Diagnostic: what a finetuned model (a run's ledger) gets right and wrong, and whether averaging helps.

    python -m seedtune.simulations.ledger_eval runs/<run>/ledger.sqlite --tail 100 250 --json

Replays the ledger onto its base model and prints one line per model: the base model (zero-shot), the ledger's
last state, and for each ``--tail W`` the mean of the iterates after the last W entries. For each it reports
accuracy, macro-F1 and each label's share of the predictions on the test split and on a dev subset (where the
task has one), next to the true shares: a model that collapses onto one label shows it here, where a single
accuracy hides it.

The tail average is post-processing of a released history (no privacy spent): the mean of the iterates
theta_{T-W+1}..theta_T equals the base plus every entry's coeff * z, with the entry at position t >= T - W
scaled by (T - t) / W. It is built directly on the trainable view, so it is not a ledger state.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np
import torch

from seedtune.shared.protocol.ledger import Ledger
from seedtune.server.replay import replay_ledger
from seedtune.shared.task.tasks import load_split


def tail_weight(position: int, total: int, window: int) -> float:
    """Weight of entry ``position`` (0-based) in the mean of the last ``window`` of ``total`` iterates."""
    return 1.0 if position < total - window else (total - position) / window


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m seedtune.simulations.ledger_eval", description=__doc__.split("\n")[0])
    ap.add_argument("ledger", help="ledger.sqlite of a seedtune train run or a federation")
    ap.add_argument("--tail", type=int, nargs="*", default=[], help="also evaluate the mean of the last W iterates")
    ap.add_argument("--dev-size", type=int, default=512, help="dev examples (class-balanced subset; 0 = all)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    replica, info, _ = replay_ledger(args.ledger)
    ledger = Ledger.open(args.ledger, read_only=True)
    try:
        entries = list(ledger.entries())
    finally:
        ledger.close()
    for window in args.tail:
        if not 1 <= window <= len(entries):
            ap.error(f"--tail {window}: must be between 1 and the ledger's {len(entries)} entries")
    task, cfg = replica.task, replica.config
    splits = {"test": load_split(cfg, "test"), "dev": load_split(cfg, "dev", args.dev_size)}
    if task.generation:
        ap.error("ledger_eval scores classifiers; a generation ledger's metrics are in its summary.json")
    encoded = {name: task.eval_set(split) for name, split in splits.items() if len(split)}
    final_values, final_version, final_head = replica.values(), replica.version, replica.head

    def evaluate(name: str) -> dict[str, Any]:
        row: dict[str, Any] = {"model": name}
        for split, data in encoded.items():
            labels = data.labels
            metrics = task.evaluate(data, cfg.model.microbatch)
            row[f"{split}_accuracy"], row[f"{split}_macro_f1"] = metrics["accuracy"], metrics["macro_f1"]
            # each label's share of the predictions beside its share of the split: a collapse onto one label
            # shows here, where a single accuracy hides it
            row[f"{split}_predicted_share"] = {k: c["predicted"] / len(labels) for k, c in metrics["per_label"].items()}
            row[f"{split}_share"] = {k: c["examples"] / len(labels) for k, c in metrics["per_label"].items()}
        return row

    rows = []
    replica.reset()
    rows.append(evaluate("base"))
    for window in args.tail:
        replica.reset()
        replica.view.apply_all([(e.seed, float(np.float32(e.coeff * tail_weight(t, len(entries), window))))
                                for t, e in enumerate(entries)])
        rows.append(evaluate(f"mean of the last {window} iterates"))
    replica.load_values(final_values, final_version, final_head)
    rows.append(evaluate(f"last state ({final_version} entries)"))

    for row in rows:
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print(f"{row['model']:<36} " + "  ".join(
                f"{split} {100 * row[f'{split}_accuracy']:5.1f}% (macro-F1 {100 * row[f'{split}_macro_f1']:4.1f}; "
                f"predicted " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in row[f"{split}_predicted_share"].items())
                + ")" for split in encoded))
    return 0


if __name__ == "__main__":
    sys.exit(main())
