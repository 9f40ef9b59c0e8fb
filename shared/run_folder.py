"""The files a run folder holds (``out_dir``: a training's, a federation server's, a baseline's), named once.

Readers (replay, benchmarks, tests) and writers use these names, so a folder's layout is defined here alone.
"""

import os
from pathlib import Path

LEDGER_FILE = "ledger.sqlite"  # the hash-chained history (shared.ledger), from which replay rebuilds the model
METRICS_FILE = "metrics.jsonl"  # one JSON row per step (training) or round (federation), appended as it runs
SUMMARY_FILE = "summary.json"  # written last: its presence means the run finished
CONFIG_FILE = "config.json"  # the full run configuration of a training
PRIVACY_LEDGER_FILE = "privacy-ledger.sqlite"  # a simulated data holders' privacy ledger (client.privacy_ledger)


def ends_with_newline(path: Path) -> bool:
    """Whether the file is empty, absent, or ends its last line (reads one byte, not the file): a metrics row a
    crash cut short must not run into the next one appended."""
    if not path.exists() or path.stat().st_size == 0:
        return True
    with path.open("rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"
