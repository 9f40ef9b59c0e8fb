"""Task data: SST-2 from local TSV files (the team folder) or from the Hugging Face hub.

Local files win: an explicit ``data_dir``, then ``$SEEDTUNE_DATA``, then ``shared/data/sst2`` in the team
folder beside the checkout (or the working directory). The hub (``datasets``' ``glue``/``sst2``) is the
fallback for real users; when neither is reachable the error says where it looked.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from shared.config import DataConfig

log = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test")
LABEL_NAMES = ("negative", "positive")


class DataError(ValueError):
    """A data file without the expected header, with a malformed row, or with no examples; the message names
    the file and line."""


@dataclass(frozen=True)
class Split:
    sentences: list[str]
    labels: np.ndarray  # int64, 0 = negative, 1 = positive

    def __len__(self) -> int:
        return len(self.sentences)

    def subset(self, indices: np.ndarray) -> "Split":
        return Split([self.sentences[i] for i in indices], self.labels[indices])

    def with_min_words(self, min_words: int) -> "Split":
        """The records of at least ``min_words`` words. A rule applied to each record alone, never to the data
        as a whole, so it costs no privacy: neighbouring data sets stay neighbouring after it."""
        if min_words <= 0:
            return self
        return self.subset(np.flatnonzero([len(s.split()) >= min_words for s in self.sentences]))

    def hashed_subset(self, size: int, seed: int) -> "Split":
        """About ``size`` records, each kept when a salted hash of the record alone falls below
        ``size / len(self)``: removing or adding one record changes the subset by that record only, so a
        guarantee for the subset is one for the file (a class-balanced draw reshuffles whole classes). The
        split's length is public in seedtune's privacy model (docs/federation.md, "Privacy")."""
        if size <= 0 or size >= len(self):
            return self
        threshold = size / len(self)
        keep = [_record_uniform(seed, text, int(label)) < threshold for text, label in zip(self.sentences, self.labels)]
        return self.subset(np.flatnonzero(keep))

    def balanced_subset(self, size: int, seed: int) -> "Split":
        """A class-balanced random subset (public seed): size // 2 examples of each label."""
        if size <= 0 or size >= len(self):
            return self
        rng = np.random.default_rng(seed)
        parts = [rng.permutation(np.flatnonzero(self.labels == c))[: size // 2 + (c < size % 2)] for c in (0, 1)]
        return self.subset(np.sort(np.concatenate(parts)))


def _record_uniform(seed: int, text: str, label: int) -> float:
    """A public pseudo-uniform in [0, 1) for one record: SHA-256 of (seed, label, text)."""
    digest = hashlib.sha256(f"{seed}\0{label}\0{text}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2.0**64


def _candidate_dirs(data_dir: str) -> list[Path]:
    if data_dir:
        return [Path(data_dir)]
    dirs = []
    if os.environ.get("SEEDTUNE_DATA"):
        dirs.append(Path(os.environ["SEEDTUNE_DATA"]))
    repo = Path(__file__).resolve().parents[1]
    for root in (Path.cwd(), repo):
        dirs += [root / "shared" / "data" / "sst2", root.parent / "shared" / "data" / "sst2"]
    return dirs


def _read_tsv(path: Path) -> Split:
    sentences, labels = [], []
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None or [h.strip().lower() for h in header[:2]] != ["sentence", "label"]:
            raise DataError(f"{path}: expected a header 'sentence<TAB>label', got {header!r}")
        for lineno, row in enumerate(reader, start=2):
            if len(row) != 2 or row[1].strip() not in ("0", "1"):
                raise DataError(f"{path}:{lineno}: expected 'sentence<TAB>0|1', got {row!r:.120}")
            sentences.append(row[0])
            labels.append(int(row[1]))
    if not sentences:
        raise DataError(f"{path}: no examples after the header")
    return Split(sentences, np.asarray(labels, dtype=np.int64))


def _load_hub(split: str, name: str = "glue") -> Split:
    try:
        import datasets  # optional: only real users fetching from the hub need it
    except ImportError as exc:
        raise FileNotFoundError("the datasets package is not installed") from exc
    hub_split = "validation" if split == "test" else "train"
    ds = datasets.load_dataset(name, "sst2", split=hub_split)
    sentences, labels = list(ds["sentence"]), np.asarray(ds["label"], dtype=np.int64)
    if split != "test":
        # The local files split GLUE's training set into train and dev; do the same, deterministically.
        keep = (np.arange(len(labels)) % 10 == 0) == (split == "dev")
        sentences, labels = [s for s, k in zip(sentences, keep) if k], labels[keep]
    return Split(sentences, labels)


def load_sst2(split: str, data_dir: str = "") -> Split:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    tried = []
    for d in _candidate_dirs(data_dir):
        path = d / f"{split}.tsv"
        tried.append(str(path))
        if path.is_file():
            log.debug("loading SST-2 %s from %s", split, path)
            return _read_tsv(path)
    if data_dir:
        raise FileNotFoundError(f"no {split}.tsv in data_dir {data_dir!r}")
    try:
        return _load_hub(split)
    except Exception as exc:  # offline, no datasets package, hub error: one clear message
        raise FileNotFoundError(
            f"SST-2 {split} split not found locally (looked at {', '.join(tried)}) and the Hugging Face hub "
            f"failed ({type(exc).__name__}: {exc}). Set data.data_dir or $SEEDTUNE_DATA to a folder with "
            f"{split}.tsv, or install 'datasets' with network access."
        ) from exc


def load_split(data: DataConfig, split: str, size: int | None = None) -> Split:
    """The examples a run uses from one split: ``data.min_words`` applies to train and dev (the training
    distribution, e.g. SST-2's phrases), never to test (the benchmark); then a subset of ``size`` (default:
    data.train_size or data.test_size; 0 = all): kept per record by a salted hash for the private train split,
    class-balanced for the public dev and test splits."""
    loaded = load_sst2(split, data.data_dir)
    if split != "test":
        loaded = loaded.with_min_words(data.min_words)
    if size is None:
        size = {"train": data.train_size, "test": data.test_size}.get(split, 0)
    if split == "train":
        return loaded.hashed_subset(size, data.seed)
    return loaded.balanced_subset(size, data.seed)
