"""Rebuild the finetuned model from the base model and the ledger: ``seedtune replay LEDGER --out DIR``
and ``seedtune export-onnx LEDGER --out FILE``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from seedtune.server.report import anchor_beside
from seedtune.shared.ledger import Ledger
from seedtune.shared.replica import Replica, placed_config

# Replay and export run no training: the float32 model on the CPU, whatever placement the run used (its
# trainable values are float32 in any case), so an export traces the float32 graph ONNX Runtime nodes load.
CPU_FLOAT32 = {"device": "cpu", "dtype": "float32"}


def replay_ledger(ledger_path: str | Path) -> tuple[Replica, dict[str, Any]]:
    """Verify the chains (against the run folder's anchor, when there is one) and replay every entry onto the
    base model."""
    ledger = Ledger.open(ledger_path)
    try:
        n = ledger.verify(anchor_beside(ledger_path))
        replica = Replica.from_header(ledger.header, **CPU_FLOAT32)
        replica.apply(list(ledger.entries()), ledger.hash_at(n))
        return replica, {"ledger": str(ledger_path), "rounds": ledger.last_round, "entries": n}
    finally:
        ledger.close()


def replay(ledger_path: str | Path, out_dir: str | Path | None = None) -> dict[str, Any]:
    """``seedtune replay``: the replayed model's digests, optionally saved as a Hugging Face folder."""
    start = time.time()
    replica, result = replay_ledger(ledger_path)
    result.update({"model": replica.config.model.name, "model_digest": replica.digest(),
                   "state_digest": replica.state_digest(), "ledger_head": replica.head.hex()})
    if out_dir is not None:
        result["out"] = str(replica.save(out_dir))
    result["wall_s"] = round(time.time() - start, 2)
    return result


def export(ledger_path: str | Path | None, out: str | Path, config=None) -> dict[str, Any]:
    """``seedtune export-onnx``: the model after the ledger (or the base model of ``config``) as ONNX."""
    from seedtune.shared.onnx_export import export_onnx

    if ledger_path is not None:
        replica, info = replay_ledger(ledger_path)
    else:
        replica, info = Replica(placed_config(config, **CPU_FLOAT32)), {"ledger": None}
    return {**info, **export_onnx(replica, out)}
