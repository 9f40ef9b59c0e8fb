"""Rebuild the finetuned model from the base model and the ledger: ``seedtune replay LEDGER --out DIR``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from server.ledger import Ledger
from shared.replica import Replica


def replay(ledger_path: str | Path, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Verify the chain, replay every entry onto the base model, optionally save a Hugging Face folder."""
    start = time.time()
    ledger = Ledger.open(ledger_path)
    try:
        n = ledger.verify()
        replica = Replica.from_header(ledger.header)
        replica.apply(list(ledger.entries()), ledger.hash_at(n))
        result = {"ledger": str(ledger_path), "rounds": ledger.last_round, "entries": n,
                  "model": replica.config.model.name, "model_digest": replica.digest(),
                  "ledger_head": replica.head.hex()}
    finally:
        ledger.close()
    if out_dir is not None:
        result["out"] = str(replica.save(out_dir))
    result["wall_s"] = round(time.time() - start, 2)
    return result
