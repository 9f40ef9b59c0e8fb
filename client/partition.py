"""A node's share of the training data, partitioned with flwr-datasets (IID or Dirichlet label skew).

Every node partitions the same public-seeded subset with the same seeded partitioner, so partition i is
the same wherever it is computed; in a real deployment each institution would instead load its own data.
The tokenized partition is cached per process (simulation actors serve many nodes).
"""

from __future__ import annotations

import logging
from typing import Protocol, Sequence

import numpy as np

from client.privacy_ledger import data_key
from client.node import Partition
from shared.config import RunConfig
from shared.tasks import Split, load_split

log = logging.getLogger(__name__)

_CACHE: dict[tuple, Partition] = {}


class Tokenizes(Protocol):
    """A task model as far as partitioning needs it (torch's TextClassifier or ONNX Runtime's OnnxTask)."""

    name: str

    def encode(self, sentences: Sequence[str]) -> list[list[int]]: ...


_SPLITS: dict[tuple, Split] = {}


def _train_split(config: RunConfig) -> Split:
    """The training split, loaded once per process (a simulation actor serves many partitions of it)."""
    d = config.data
    key = (d.task, d.data_dir, d.train_size, d.seed, d.min_words)
    if key not in _SPLITS:
        _SPLITS.clear()  # one data set per process at a time
        _SPLITS[key] = load_split(d, "train")
    return _SPLITS[key]


def _partitioner(config: RunConfig, num_partitions: int):
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    fed = config.federation
    if fed.partition == "iid":
        return IidPartitioner(num_partitions)
    return DirichletPartitioner(num_partitions, partition_by="label", alpha=fed.alpha, seed=config.data.seed,
                                min_partition_size=2, self_balancing=True)


def load_partition(config: RunConfig, task: Tokenizes, partition_id: int, num_partitions: int) -> Partition:
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} outside 0..{num_partitions - 1}")
    key = (task.name, config.data.data_dir, config.data.train_size, config.data.seed, config.federation.partition,
           config.federation.alpha, partition_id, num_partitions)
    if key not in _CACHE:
        from datasets import Dataset

        split = _train_split(config)
        partitioner = _partitioner(config, num_partitions)
        partitioner.dataset = Dataset.from_dict({"sentence": split.sentences, "label": split.labels.tolist()})
        part = partitioner.load_partition(partition_id)
        labels = np.asarray(part["label"], dtype=np.int64)
        _CACHE[key] = Partition(task.encode(part["sentence"]), labels,
                                data_key(config.data.task, zip(part["sentence"], labels.tolist())))
        log.info("partition %d/%d (%s): %d examples, %.0f%% positive", partition_id, num_partitions,
                 config.federation.partition, len(labels), 100 * labels.mean() if len(labels) else 0)
    return _CACHE[key]
