"""A replica of the global model: base weights plus the ledger entries applied so far.

The server, every client and ``seedtune replay`` hold one. All of them build the same base model and the
same trainable set from the configuration pinned in the ledger header, check both against the header's
digests, and then move forward only by applying chain-verified entries through
:meth:`TrainableView.apply`, so equal ledger positions mean bit-identical weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from seedtune.shared.task.config import ConfigError, ModelConfig, RunConfig, TaskConfig, from_dict
from seedtune.shared.protocol.digest import model_digest, tensor_digest
from seedtune.shared.engine.follower import LedgerFollower
from seedtune.shared.privacy.noise import Noise
from seedtune.shared.task.loading import HEAD_FILE, load_task_model
from seedtune.shared.task.models import TextClassifier
from seedtune.shared.task.placement import placement
from seedtune.shared.protocol.proto import LEDGER_FORMAT_VERSION, LedgerHeader
from seedtune.shared.engine.selection import TrainableSet, select_all, select_patterns, select_pruned, stage_fraction
from seedtune.shared.engine.update import ScoredView, TrainableView


def select_trainable(task: TextClassifier, config: RunConfig, stage: int = 0) -> TrainableSet:
    sel = config.selection
    if sel.mode == "all":
        return select_all(task.module)
    if sel.mode == "patterns":
        return select_patterns(task.module, sel.patterns)
    if sel.mode == "head":
        return task.head_set()
    fraction = stage_fraction(sel.fraction, sel.strategy, stage)
    return select_pruned(task.module, task.synflow_output, fraction, sel.patterns)


def float32_model(task: TextClassifier, config: RunConfig, view: TrainableView) -> TextClassifier:
    """The float32 CPU model with the view's trainable values: ``task`` itself when its forward passes run
    there; else the base model loaded afresh (the half-precision copy has lost the float32 weights) with the
    master's values written in, the model a float32 replay rebuilds."""
    if task.dtype == torch.float32 and task.device.type == "cpu":
        return task
    full = load_task_model(config.model, config.task)
    TrainableView(full.module, view.selection).set_values([v.cpu() for v in view.values()])
    return full


def placed_config(config: RunConfig, device: str | None = None, dtype: str | None = None) -> RunConfig:
    """``config`` with its forward passes placed elsewhere (None keeps a setting): placement is this machine's
    choice, not the ledger's, and never changes the replayed float32 values."""
    if device is None and dtype is None:
        return config
    model = dataclasses.replace(config.model, device=device or config.model.device, dtype=dtype or config.model.dtype)
    return dataclasses.replace(config, model=model).validate()


# Settings of this machine's bookkeeping, not of the run: kept out of the ledger header (a federation sends the
# header to every node; a tracking URI may name an internal host or carry a token) and out of resume's check.
OPERATIONAL_KEYS = ("tracking",)


def config_json(config: RunConfig) -> str:
    data = {k: v for k, v in config.to_dict().items() if k not in OPERATIONAL_KEYS}
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def _header(config_text: str, base_digest: str, trainable_digest: str, direction: str,
            noise: Noise | None) -> LedgerHeader:
    return LedgerHeader(
        format_version=LEDGER_FORMAT_VERSION, base_model_digest=base_digest, trainable_digest=trainable_digest,
        config_json=config_text, direction=direction, noise=noise.family if noise else "none",
        noise_params=noise.to_json() if noise else "", created_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )


def ledger_header(config: RunConfig, base_digest: str, trainable_digest: str, noise: Noise | None) -> LedgerHeader:
    """What a ledger pins so that any node can rebuild its base replica: the model and trainable-set digests and
    the whole configuration (a federation's server and a centralized run write the same header)."""
    return _header(config_json(config), base_digest, trainable_digest, config.zo.direction, noise)


OWN_MODEL = "own_model"  # the config_json key of a ledger written by seedtune.PrivateZO for a user's own model


def own_model_header(settings: dict[str, Any], base_digest: str, trainable_digest: str, direction: str,
                     noise: Noise | None) -> LedgerHeader:
    """The header of a ledger over a user's own torch model (``seedtune.PrivateZO``): no RunConfig rebuilds
    that model, so the header pins its digests and records the run's settings under :data:`OWN_MODEL`."""
    return _header(json.dumps({OWN_MODEL: settings}, sort_keys=True, separators=(",", ":")), base_digest,
                   trainable_digest, direction, noise)


def own_model_settings(header: LedgerHeader) -> dict[str, Any] | None:
    """The settings of an own-model ledger; None for a ledger of a RunConfig (a language model run)."""
    try:
        config = json.loads(header.config_json)
    except ValueError:
        return None
    return config.get(OWN_MODEL) if isinstance(config, dict) else None


class Replica(LedgerFollower):
    task: TextClassifier
    view: ScoredView

    def __init__(self, config: RunConfig, task: TextClassifier | None = None,
                 selection: TrainableSet | None = None, base_digest: str | None = None) -> None:
        """``selection`` and ``base_digest`` may come from a node's cache (``from_header``), which saves the
        SynFlow pass and the full-model hash that a fresh ClientApp process would otherwise redo each round."""
        if config.selection.mode == "prune" and config.selection.strategy != "static":
            raise ConfigError(f"selection.strategy must be 'static' for a ledger (one trainable set for the whole "
                              f"history), got {config.selection.strategy!r}")
        self.config = config
        self.task = task or load_task_model(config.model, config.task)
        self.selection = selection or select_trainable(self.task, config)
        super().__init__(base_digest or model_digest(self.task.module), self.selection.digest(), self.selection.size)
        device, dtype = placement(config.model)
        self.view = ScoredView.placed(self.task, self.selection, config.zo.direction, device, dtype,
                                      config.model.feature_cache_mb)
        self._base_values = self.view.values()

    @property
    def engine(self) -> str:
        """What runs the forward passes, e.g. ``torch:cpu:float32`` (a node reports it in its replies)."""
        return f"torch:{self.task.device}:{self.config.model.dtype}"

    # ---------------------------------------------------------------------------------------- header
    def make_header(self, noise: Noise | None) -> LedgerHeader:
        return ledger_header(self.config, self.base_digest, self.trainable_digest, noise)

    @classmethod
    def from_header(cls, header: LedgerHeader, cache_dir: Path | None = None, device: str | None = None,
                    dtype: str | None = None) -> "Replica":
        """The base replica a ledger was made for; with ``cache_dir``, the trainable set and base digest are
        kept there after the first build (checked against the header's digests on every load). ``device`` and
        ``dtype`` place its forward passes (default: the header's ``model.device`` and ``model.dtype``); the
        replayed float32 values are the same whatever they are."""
        config = placed_config(from_dict(json.loads(header.config_json)).validate(), device, dtype)
        cached = cache_dir / f"{header.trainable_digest[:32]}.pt" if cache_dir is not None else None
        selection = base_digest = saved = None
        if cached is not None and cached.is_file():
            saved = torch.load(cached, weights_only=True)
            selection = TrainableSet(tuple(saved["names"]), tuple(tuple(s) for s in saved["shapes"]),
                                     tuple(saved["indices"]))
            base_digest = saved["base_digest"]
        replica = cls(config, selection=selection, base_digest=base_digest)
        if saved is not None and tensor_digest(torch.from_numpy(replica.values())) != saved["values_digest"]:
            # The local base weights changed since the cache was written (e.g. an upgraded model package).
            replica = cls(config)
            saved = selection = None
        replica.attach(header)  # checks both digests, cached or not
        if cached is not None and selection is None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(f".{os.getpid()}.tmp")  # processes sharing the cache never share a tmp
            torch.save({"names": list(replica.selection.names), "shapes": [list(s) for s in replica.selection.shapes],
                        "indices": list(replica.selection.indices), "base_digest": replica.base_digest,
                        "values_digest": tensor_digest(torch.from_numpy(replica.values()))}, tmp)
            tmp.replace(cached)
        return replica

    # --------------------------------------------------------------------------- the torch weights
    def _reset_values(self) -> None:
        self.view.set_values(self._base_values)

    def values(self) -> np.ndarray:
        return np.concatenate([v.cpu().numpy() for v in self.view.values()])

    def base_values(self) -> np.ndarray:
        """The base model's trainable values (version 0) as one float32 vector."""
        return np.concatenate([v.cpu().numpy() for v in self._base_values])

    @torch.no_grad()
    def _set_values(self, values: np.ndarray) -> None:
        chunks = np.split(values, np.cumsum(self.selection.counts)[:-1])
        self.view.set_values([torch.from_numpy(c.copy()) for c in chunks])

    def predictions(self, ids: Sequence[Sequence[int]]) -> np.ndarray:
        return self.task.predictions(ids, self.config.model.microbatch)

    def digest(self) -> str:
        """The full float32 model's digest (every weight): what ``seedtune replay`` reports, whatever device
        and dtype ran this replica's forward passes."""
        return model_digest(float32_model(self.task, self.config, self.view).module)

    # ---------------------------------------------------------------------------------------- export
    def save(self, out_dir: str | Path) -> Path:
        """A Hugging Face model folder (weights, config, tokenizer); a head of the model's own (an encoder's, a
        decoder's with model.decoder_head other than "label_rows") goes in HEAD_FILE; seedtune.json names the decoder's
        head setting, so that load_saved builds the module that file belongs to."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        task = float32_model(self.task, self.config, self.view)
        module = task.module
        backbone = module.lm if self.task.kind == "decoder" else module.body
        backbone.save_pretrained(out)
        self.task.tokenizer.save_pretrained(out)
        if hasattr(module, "head"):
            save_file({k: v.contiguous() for k, v in module.head.state_dict().items()}, str(out / HEAD_FILE))
        (out / SAVED_FILE).write_text(json.dumps({
            "kind": self.task.kind, "base_model": self.config.model.name, "ledger_version": self.version,
            "ledger_head": self.head.hex(), "model_digest": self.digest(),
            "max_length": self.config.model.max_length, "task": dataclasses.asdict(self.config.task),
            "decoder_head": self.config.model.decoder_head, "head_layer": self.config.model.head_layer,
        }, indent=2))
        return out


SAVED_FILE = "seedtune.json"  # beside a saved model: what it is, and the task its head or label words serve


def load_saved(folder: str | Path, device: str = "cpu", dtype: str = "float32") -> TextClassifier:
    """A model folder written by :meth:`Replica.save` (``seedtune replay --out``), ready to predict: the
    Hugging Face weights, an encoder's finetuned head from its side file, the task from seedtune.json."""
    folder = Path(folder)
    meta_path = folder / SAVED_FILE
    if not meta_path.is_file():
        raise ConfigError(f"{folder} is not a model folder written by seedtune replay (no {SAVED_FILE})")
    meta = json.loads(meta_path.read_text())
    if "task" not in meta or "max_length" not in meta:
        raise ConfigError(f"{meta_path} was written by an older seedtune, without the task: replay the ledger "
                          f"again (seedtune replay LEDGER --out {folder})")
    task = from_dict(meta["task"], TaskConfig, "task.")
    task.validate()
    # a decoder's own head (seedtune.json from before 2026-12-07 has no setting: its decoders kept the label rows)
    model = ModelConfig(name=str(folder), kind=meta["kind"], max_length=meta["max_length"], device=device,
                        dtype=dtype, decoder_head=meta.get("decoder_head", "label_rows"),
                        head_layer=meta.get("head_layer", 0))
    model.validate()
    loaded = load_task_model(model, task)
    loaded.place(*placement(model))
    return loaded
