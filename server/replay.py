"""Rebuild the finetuned model from the base model and the ledger: ``seedtune replay LEDGER --out DIR``
and ``seedtune export-onnx LEDGER --out FILE``."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Iterator, cast

from torch import nn

from seedtune.server.model_card import CARD_FILE, PrivacyRecord, model_card, privacy_record
from seedtune.shared.protocol.run_folder import anchors_of
from seedtune.shared.task.config import ConfigError
from seedtune.shared.engine.directions import DirectionKind
from seedtune.shared.protocol.digest import model_digest
from seedtune.shared.protocol.ledger import Ledger
from seedtune.shared.engine.replica import Replica, own_model_settings, placed_config
from seedtune.shared.engine.selection import select_all, select_patterns
from seedtune.shared.engine.update import TrainableView

# Replay and export run no training: the float32 model on the CPU, whatever placement the run used (its
# trainable values are float32 in any case), so an export traces the float32 graph ONNX Runtime nodes load.
CPU_FLOAT32: dict[str, Any] = {"device": "cpu", "dtype": "float32"}


@contextlib.contextmanager
def _verified(ledger_path: str | Path, own_model: bool) -> Iterator[tuple[Ledger, int]]:
    """The ledger, open, its chains verified (against the run folder's anchor, when there is one), and of the
    kind the caller replays: a language-model run's (``own_model=False``) or a PrivateZO one's."""
    ledger = Ledger.open(ledger_path, read_only=True)
    try:
        n = ledger.verify(anchors_of(ledger_path, ledger.genesis))
        if own_model and own_model_settings(ledger.header) is None:
            raise ConfigError(f"{ledger_path} is the ledger of a language-model run: replay it with "
                              f"seedtune replay LEDGER --out DIR (or seedtune.replay(ledger, out))")
        if not own_model and own_model_settings(ledger.header) is not None:
            raise ConfigError(f"{ledger_path} is the ledger of your own torch model (seedtune.PrivateZO): rebuild "
                              f"it in Python with seedtune.replay({str(ledger_path)!r}, model=<the base model>)")
        yield ledger, n
    finally:
        ledger.close()


def replay_ledger(ledger_path: str | Path) -> tuple[Replica, dict[str, Any], PrivacyRecord]:
    """Replay every entry of a verified ledger onto the base model; with the ledger's privacy guarantee,
    accounted from what the ledger records."""
    with _verified(ledger_path, own_model=False) as (ledger, n):
        replica = Replica.from_header(ledger.header, **CPU_FLOAT32)
        replica.apply(list(ledger.entries()), ledger.hash_at(n))
        record = privacy_record(ledger, replica.config, ledger_path)
        return replica, {"ledger": str(ledger_path), "rounds": ledger.last_round, "entries": n}, record


def _card(replica: Replica, info: dict[str, Any], record: PrivacyRecord, command: str, path: Path) -> str:
    info = {**info, "base_model_digest": replica.base_digest, "trainable_digest": replica.trainable_digest,
            "ledger_head": replica.head.hex(), "model_digest": info.get("model_digest") or replica.digest()}
    path.write_text(model_card(info, replica.config, record, command))
    return str(path)


def _privacy(record: PrivacyRecord) -> dict[str, Any]:
    return {"epsilon": record.epsilon_max, "delta": record.delta if record.private else None}


def replay_onto(ledger_path: str | Path, model: nn.Module) -> dict[str, Any]:
    """Replay an own-model ledger (``seedtune.PrivateZO``) onto ``model``, in place: ``model`` must be the base
    model the ledger pins (its digest is checked first, and nothing is written to it otherwise)."""
    with _verified(ledger_path, own_model=True) as (ledger, n):
        digest = model_digest(model)
        if digest != ledger.header.base_model_digest:
            raise ConfigError(f"the model given is not the base model of {ledger_path}: digest {digest[:16]} "
                              f"vs the ledger's {ledger.header.base_model_digest[:16]} (replay onto the weights "
                              f"training started from)")
        patterns = (own_model_settings(ledger.header) or {}).get("trainable")
        selection = select_patterns(model, patterns) if patterns else select_all(model)
        if selection.digest() != ledger.header.trainable_digest:
            raise ConfigError(f"the trainable set of {ledger_path} ({patterns or 'all parameters'}) does not "
                              f"match this model's parameters")
        TrainableView(model, selection, cast(DirectionKind, ledger.header.direction)).apply_all(
            [(e.seed, e.coeff) for e in ledger.entries()])
        return {"ledger": str(ledger_path), "rounds": ledger.last_round, "entries": n,
                "ledger_head": ledger.hash_at(n).hex(), "model_digest": model_digest(model)}


def replay(ledger_path: str | Path, out_dir: str | Path | None = None) -> dict[str, Any]:
    """``seedtune replay``: the replayed model's digests and privacy guarantee; with ``out_dir``, the model saved
    there as a Hugging Face folder with its model card (README.md)."""
    start = time.time()
    replica, result, record = replay_ledger(ledger_path)
    result.update({"model": replica.config.model.name, "model_digest": replica.digest(),
                   "state_digest": replica.state_digest(), "ledger_head": replica.head.hex(), **_privacy(record)})
    if out_dir is not None:
        result["out"] = str(replica.save(out_dir))
        result["model_card"] = _card(replica, result, record, f"seedtune replay {ledger_path} --out {out_dir}",
                                     Path(out_dir) / CARD_FILE)
    result["wall_s"] = round(time.time() - start, 2)
    return result


def export(ledger_path: str | Path | None, out: str | Path, config=None) -> dict[str, Any]:
    """``seedtune export-onnx``: the model after the ledger (or the base model of ``config``) as ONNX; a
    finetuned model's card goes beside it (``<name>.README.md``)."""
    from seedtune.server.onnx_export import export_onnx

    if ledger_path is None:
        return {"ledger": None, **export_onnx(Replica(placed_config(config, **CPU_FLOAT32)), out)}
    replica, info, record = replay_ledger(ledger_path)
    result = {**info, **export_onnx(replica, out), **_privacy(record)}
    stem = Path(out).with_suffix("")
    result["model_card"] = _card(replica, result, record, f"seedtune export-onnx {ledger_path} --out {out}",
                                 stem.with_name(stem.name + "." + CARD_FILE))
    return result
