"""The files a run folder holds (``out_dir``: a training's, a federation server's, a baseline's), named once.

Readers (replay, benchmarks, tests) and writers use these names, so a folder's layout is defined here alone.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from seedtune.shared.ledger import Anchor

log = logging.getLogger(__name__)

LEDGER_FILE = "ledger.sqlite"  # the hash-chained history (shared.ledger), from which replay rebuilds the model
METRICS_FILE = "metrics.jsonl"  # one JSON row per step (training) or round (federation), appended as it runs
SUMMARY_FILE = "summary.json"  # written last: its presence means the run finished
CONFIG_FILE = "config.json"  # the full run configuration of a training
DATA_PIN_FILE = "data-pin.json"  # a training's data as accounted: records, sampling rate, digest (private)
PRIVACY_LEDGER_FILE = "privacy-ledger.sqlite"  # a simulated data holders' privacy ledger (client.privacy_ledger)


def ends_with_newline(path: Path) -> bool:
    """Whether the file is empty, absent, or ends its last line (reads one byte, not the file): a metrics row a
    crash cut short must not run into the next one appended."""
    if not path.exists() or path.stat().st_size == 0:
        return True
    with path.open("rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl file; a line that is not a JSON object (the last one torn by a crash while
    appending, or one damaged since) is skipped with a warning naming it."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            what = "its torn last line" if number == len(lines) else "malformed line"
            log.warning("%s: skipping %s %d (%.60r): %s", path, what, number, line, exc)
            continue
        rows.append(row)
    return rows


def anchor_of(rows: list[dict[str, Any]], source: str) -> Anchor | None:
    """The anchor of the highest round (a federation's row) or step (a training's: one ledger round per step)
    whose row carries a ledger record."""
    anchored = [(r.get("round", r.get("step")), r["ledger_record"]) for r in rows
                if isinstance(r.get("ledger_record"), str) and isinstance(r.get("round", r.get("step")), int)]
    if not anchored:
        return None
    last = max(anchored)
    return Anchor(last[0], last[1], source)


def anchor_beside(ledger_path: str | Path) -> Anchor | None:
    """The anchor in the metrics.jsonl of the ledger's own run folder, if the folder has one."""
    path = Path(ledger_path).parent / METRICS_FILE
    return anchor_of(read_rows(path), str(path))


def write_summary(out_dir: str, summary: dict) -> None:
    """A first-order baseline's summary.json in ``out_dir`` (none when it is empty), written last."""
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
