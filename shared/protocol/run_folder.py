"""The files a run folder holds (``out_dir``: a training's, a federation server's, a baseline's), named once.

Readers (replay, benchmarks, tests) and writers use these names, so a folder's layout is defined here alone.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from seedtune.shared.protocol.ledger import Anchor, LedgerError

log = logging.getLogger(__name__)

LEDGER_FILE = "ledger.sqlite"  # the hash-chained history (shared.protocol.ledger), from which replay rebuilds the model
METRICS_FILE = "metrics.jsonl"  # one JSON row per step (training) or round (federation), appended as it runs
SUMMARY_FILE = "summary.json"  # written last: its presence means the run finished
CONFIG_FILE = "config.json"  # the full run configuration of a training
DATA_PIN_FILE = "data-pin.json"  # a training's data as accounted: records, sampling rate, digest (private)
PRIVACY_LEDGER_FILE = "privacy-ledger.sqlite"  # a simulated data holders' privacy ledger (client.privacy_ledger)
ANCHORS_ENV = "SEEDTUNE_ANCHORS"  # the folder of second anchors (default: anchor_home())


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
    anchored: list[tuple[int, str]] = []
    for r in rows:
        at, record = r.get("round", r.get("step")), r.get("ledger_record")
        if isinstance(at, int) and isinstance(record, str):
            anchored.append((at, record))
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


def anchor_home() -> Path:
    """Where every run keeps its second anchor: ``$SEEDTUNE_ANCHORS``, else ``$XDG_DATA_HOME/seedtune/anchors``
    (by default under ``~/.local/share``), a folder for data users keep and, above all, outside every run
    folder: restoring a run folder from a backup, or deleting its metrics.jsonl, leaves it where it was."""
    if os.environ.get(ANCHORS_ENV):
        return Path(os.environ[ANCHORS_ENV])
    if os.environ.get("XDG_DATA_HOME"):
        return Path(os.environ["XDG_DATA_HOME"]) / "seedtune" / "anchors"
    try:
        return Path.home() / ".local" / "share" / "seedtune" / "anchors"
    except RuntimeError:  # no HOME and no passwd entry (some containers)
        raise LedgerError(f"no home folder to keep runs' anchors in: set {ANCHORS_ENV} (or XDG_DATA_HOME)") from None


def check_anchor_home() -> None:
    """The anchors folder exists and takes a file: checked before a run writes anything, so that it never
    commits a round or step it then cannot anchor."""
    home = anchor_home()
    try:
        home.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=home, prefix=".probe-"):
            pass
    except OSError as exc:
        raise LedgerError(f"{home}, where runs keep their ledger's anchor outside the run folder, is not writable "
                          f"({exc.strerror}); make it so, or set {ANCHORS_ENV} to another folder") from None


def _home_file(genesis: bytes) -> Path:
    return anchor_home() / f"{genesis.hex()}.json"


def write_home_anchor(ledger_path: str | Path, genesis: bytes, rnd: int, record: bytes) -> None:
    """Record that the ledger with header hash ``genesis`` reached round (or step) ``rnd`` with round record
    ``record``: written to a temporary file, synced and renamed into place, so a crash leaves the last one."""
    path = _home_file(genesis)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"ledger": str(Path(ledger_path).resolve()), "round": int(rnd), "ledger_record": record.hex(),
            "updated_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tmp = path.with_name(path.name + ".new")
    try:
        with tmp.open("w") as fh:
            fh.write(json.dumps(body) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise LedgerError(f"could not write round {rnd}'s anchor to {path} ({exc.strerror}); the round is committed "
                          f"in the ledger: free the disk and resume") from None


def home_anchor(genesis: bytes) -> Anchor | None:
    """The second anchor of the ledger with header hash ``genesis`` (None if this machine holds none); a file
    that is not one is a named error, never read as 'no anchor'."""
    path = _home_file(genesis)
    try:
        body = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise LedgerError(f"{path}, the ledger's anchor outside its run folder, is unreadable ({exc}): restore "
                          f"it, or delete it if you vouch for the ledger") from None
    if not (isinstance(body, dict) and type(body.get("round")) is int and body["round"] >= 0
            and isinstance(body.get("ledger_record"), str)):
        raise LedgerError(f"{path}, the ledger's anchor outside its run folder, is malformed: restore it, or "
                          f"delete it if you vouch for the ledger")
    return Anchor(body["round"], body["ledger_record"], str(path))


def anchors_of(ledger_path: str | Path, genesis: bytes, beside: Anchor | None = None) -> list[Anchor]:
    """Every anchor of a ledger: its run folder's (``beside``, else read from the metrics.jsonl beside it) and
    the one outside it (:func:`home_anchor`)."""
    found = [beside if beside is not None else anchor_beside(ledger_path), home_anchor(genesis)]
    return [a for a in found if a is not None]
