"""A replica of the global model: base weights plus the ledger entries applied so far.

The server, every client and ``seedtune replay`` hold one. All of them build the same base model and the
same trainable set from the configuration pinned in the ledger header, check both against the header's
digests, and then move forward only by applying chain-verified entries through
:meth:`TrainableView.apply`, so equal ledger positions mean bit-identical weights.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from shared.chain import ChainError, Entry, genesis, link, unpack_tail
from shared.config import ConfigError, RunConfig, from_dict
from shared.digest import model_digest, tensor_digest
from shared.noise import Noise
from shared.models import HEAD_FILE, TextClassifier, load_task_model
from shared.proto import LEDGER_FORMAT_VERSION, LedgerHeader, LedgerTail
from shared.selection import TrainableSet, select_all, select_patterns, select_pruned, stage_fraction
from shared.update import TrainableView


class ReplicaError(RuntimeError):
    """The local base model or trainable set is not the one the ledger was made for, or the replica cannot
    reach the requested version from where it is."""


def select_trainable(task: TextClassifier, config: RunConfig, stage: int = 0) -> TrainableSet:
    sel = config.selection
    if sel.mode == "all":
        return select_all(task.module)
    if sel.mode == "patterns":
        return select_patterns(task.module, sel.patterns)
    fraction = stage_fraction(sel.fraction, sel.strategy, stage)
    return select_pruned(task.module, task.synflow_output, fraction, sel.patterns)


def config_json(config: RunConfig) -> str:
    return json.dumps(config.to_dict(), sort_keys=True, separators=(",", ":"))


class Replica:
    def __init__(self, config: RunConfig, task: TextClassifier | None = None,
                 selection: TrainableSet | None = None, base_digest: str | None = None) -> None:
        """``selection`` and ``base_digest`` may come from a node's cache (``from_header``), which saves the
        SynFlow pass and the full-model hash that a fresh ClientApp process would otherwise redo each round."""
        if config.selection.mode == "prune" and config.selection.strategy != "static":
            raise ConfigError(f"selection.strategy must be 'static' for a ledger (one trainable set for the whole "
                              f"history), got {config.selection.strategy!r}")
        self.config = config
        self.task = task or load_task_model(config.model)
        self.base_digest = base_digest or model_digest(self.task.module)
        self.selection = selection or select_trainable(self.task, config)
        self.view = TrainableView(self.task.module, self.selection, config.zo.direction)
        self._base_values = self.view.values()
        self.version = 0
        self.head = b""  # chain hash at `version`; set by attach()
        self.header: LedgerHeader | None = None

    # ---------------------------------------------------------------------------------------- header
    def make_header(self, noise: Noise | None) -> LedgerHeader:
        return LedgerHeader(
            format_version=LEDGER_FORMAT_VERSION, base_model_digest=self.base_digest,
            trainable_digest=self.selection.digest(), config_json=config_json(self.config),
            direction=self.config.zo.direction, noise=noise.family if noise else "none",
            noise_multiplier=noise.sigma if noise else 0.0, noise_params=noise.to_json() if noise else "",
            created_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )

    @classmethod
    def from_header(cls, header: LedgerHeader, cache_dir: Path | None = None) -> "Replica":
        """The base replica a ledger was made for; with ``cache_dir``, the trainable set and base digest are
        kept there after the first build (checked against the header's digests on every load)."""
        config = from_dict(json.loads(header.config_json)).validate()
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
            replica = cls(config, task=replica.task)
            saved = selection = None
        replica.attach(header)  # checks both digests, cached or not
        if cached is not None and selection is None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(".tmp")
            torch.save({"names": list(replica.selection.names), "shapes": [list(s) for s in replica.selection.shapes],
                        "indices": list(replica.selection.indices), "base_digest": replica.base_digest,
                        "values_digest": tensor_digest(torch.from_numpy(replica.values()))}, tmp)
            tmp.replace(cached)
        return replica

    def attach(self, header: LedgerHeader) -> None:
        """Bind to a ledger after checking that its base model and trainable set are ours; resets to version 0."""
        if header.base_model_digest != self.base_digest:
            raise ReplicaError(f"base model digest {self.base_digest[:16]} differs from the ledger's "
                               f"{header.base_model_digest[:16]}: a different model or version of it")
        if header.trainable_digest != self.selection.digest():
            raise ReplicaError(f"trainable set digest {self.selection.digest()[:16]} differs from the ledger's "
                               f"{header.trainable_digest[:16]}")
        self.header = header
        self.reset()

    def reset(self) -> None:
        """Back to the base weights (version 0)."""
        self.view.set_values(self._base_values)
        self.version, self.head = 0, genesis(self.header)

    # ------------------------------------------------------------------------------------ state I/O
    def values(self) -> np.ndarray:
        """The trainable entries as one float32 vector (what a node keeps between rounds)."""
        return np.concatenate([v.numpy() for v in self.view.values()])

    @torch.no_grad()
    def load_values(self, values: np.ndarray, version: int, head: bytes) -> None:
        if values.shape != (self.selection.size,) or values.dtype != np.float32:
            raise ReplicaError(f"stored trainable values have shape {values.shape} and dtype {values.dtype}; "
                               f"expected ({self.selection.size},) float32")
        chunks = np.split(values, np.cumsum(self.selection.counts)[:-1])
        self.view.set_values([torch.from_numpy(c.copy()) for c in chunks])
        self.version, self.head = version, head

    # --------------------------------------------------------------------------------------- replay
    def apply(self, entries: list[Entry], head: bytes) -> None:
        """Apply entries that start at our version, checking they chain from our head to ``head``."""
        if entries and entries[0].index != self.version:
            raise ReplicaError(f"entries start at index {entries[0].index}, the replica is at version {self.version}")
        h = self.head
        for e in entries:
            h = link(h, e)
        if h != head:
            raise ChainError(f"entries {self.version}..{self.version + len(entries)} do not chain to the expected head")
        self._advance(entries, head)

    def _advance(self, entries: list[Entry], head: bytes) -> None:
        """The replay loop proper, for entries already checked to chain from our head to ``head``."""
        for e in entries:
            self.view.apply(e.seed, e.coeff)
        self.version += len(entries)
        self.head = head

    def catch_up(self, tail: LedgerTail) -> int:
        """Apply a ledger tail; a tail starting before our version is fine if it agrees with our history.
        Returns the number of entries applied."""
        entries = list(unpack_tail(tail))  # verifies prev_hash -> head_hash
        if tail.start_index > self.version:
            raise ReplicaError(f"the ledger tail starts at {tail.start_index} but this replica is at version "
                               f"{self.version}; it needs the entries from {self.version}")
        skip = self.version - tail.start_index
        if skip > len(entries):
            raise ReplicaError(f"this replica is at version {self.version}, ahead of the ledger's "
                               f"{tail.start_index + len(entries)}")
        h = tail.prev_hash
        for e in entries[:skip]:
            h = link(h, e)
        if h != self.head:
            raise ChainError(f"the ledger's history up to version {self.version} differs from this replica's")
        # unpack_tail checked prev_hash -> head_hash, and the prefix reaches our head: the rest chains on.
        self._advance(entries[skip:], tail.head_hash)
        return len(entries) - skip

    def digest(self) -> str:
        return model_digest(self.task.module)

    # ---------------------------------------------------------------------------------------- export
    def save(self, out_dir: str | Path) -> Path:
        """A Hugging Face model folder (weights, config, tokenizer); an encoder's head goes in HEAD_FILE."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        module = self.task.module
        backbone = module.lm if self.task.kind == "decoder" else module.body
        backbone.save_pretrained(out)
        self.task.tokenizer.save_pretrained(out)
        if self.task.kind == "encoder":
            save_file({k: v.contiguous() for k, v in module.head.state_dict().items()}, str(out / HEAD_FILE))
        (out / "seedtune.json").write_text(json.dumps({
            "kind": self.task.kind, "base_model": self.config.model.name, "ledger_version": self.version,
            "ledger_head": self.head.hex(), "model_digest": self.digest(),
        }, indent=2))
        return out
