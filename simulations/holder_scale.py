"""A cross-device federation, record-level against holder-level DP: ``python -m seedtune.simulations.holder_scale
--json``.

``--nodes`` simulated nodes (default 1,000) of ``--records`` records each (default 20: SST-2's training split,
iid), ``--per-round`` of them instructed per round, MiniLM with the README main job's other settings, over the
in-process transport (the real server loop and ClientApp handlers, simulations.inprocess). It runs the same
federation twice, ``privacy.unit = "example"`` and ``"holder"`` (``privacy.holder_rate``, default 0.1), each at
epsilon 3 per holder, and prints per unit: test accuracy before and after, the largest and the median epsilon
over the holders that were instructed (each holder's own, as the server accounts it), how many holders took part,
and the wall and CPU seconds. Hyperparameters are the main job's defaults; nothing is tuned. Run it alone: the
machine has two cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from seedtune.server.federation import FederatedServer
from seedtune.shared.task.config import load_config
from seedtune.simulations.inprocess import InProcessGrid


def run(unit: str, nodes: int, records: int, per_round: int, rounds: int, steps: int, rate: float,
        holder_rate: float, out: Path) -> dict[str, Any]:
    config = load_config(None, {
        "data.train_size": nodes * records, "eval.every": 0, "federation.rounds": rounds,
        "federation.clients_per_round": per_round, "federation.local_steps": steps, "federation.sample_rate": rate,
        "privacy.unit": unit, "privacy.holder_rate": holder_rate, "out_dir": str(out / unit), "threads": 2})
    grid = InProcessGrid(nodes, privacy_ledger=str(out / f"{unit}-holders.sqlite"))
    start, cpu = time.time(), time.process_time()
    summary = FederatedServer(config, grid, out / unit).run()
    spent = [e for e in summary["epsilon_holders"].values() if e]
    return {"unit": unit, "nodes": nodes, "records_per_node": records, "instructed_per_round": per_round,
            "rounds": rounds, "local_steps": steps, "holder_rate": holder_rate if unit == "holder" else None,
            "noise": summary["noise"], "holders_taking_part": len(spent),
            "epsilon_max": max(spent, default=0.0), "epsilon_median": statistics.median(spent) if spent else 0.0,
            "test_accuracy_zero_shot": summary["zero_shot_test_accuracy"], "test_accuracy": summary["test_accuracy"],
            "clients_agree": summary["clients_agree"], "wall_s": round(time.time() - start, 1),
            "cpu_s": round(time.process_time() - cpu, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--records", type=int, default=20)
    parser.add_argument("--per-round", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--sample-rate", type=float, default=0.5, help="records per step (unit example: the rate "
                                                                          "the guarantee is amplified by)")
    parser.add_argument("--holder-rate", type=float, default=0.1)
    parser.add_argument("--units", nargs="+", default=["example", "holder"], choices=["example", "holder"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if min(args.nodes, args.records, args.per_round, args.rounds, args.local_steps) < 1:
        print("holder_scale: every count must be >= 1", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="holder-scale-") as tmp:
        for unit in args.units:
            row = run(unit, args.nodes, args.records, args.per_round, args.rounds, args.local_steps,
                      args.sample_rate, args.holder_rate, Path(tmp))
            print(json.dumps(row) if args.json else "  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
