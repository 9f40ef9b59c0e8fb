"""A node's share of the training data, partitioned with flwr-datasets (IID or Dirichlet label skew).

Every node partitions the same public-seeded subset with the same seeded partitioner, so partition i is
the same wherever it is computed; in a real deployment each institution would instead load its own data.
The tokenized partition is cached per process (simulation actors serve many nodes).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Protocol, Sequence

import numpy as np

from client.privacy_ledger import data_key
from client.node import Partition
from shared.config import RunConfig
from shared.tasks import Record, Split, load_split

log = logging.getLogger(__name__)

_CACHE: dict[tuple, Partition] = {}


class Tokenizes(Protocol):
    """A task model as far as partitioning needs it (torch's TextClassifier or ONNX Runtime's OnnxTask)."""

    name: str

    def encode(self, records: Sequence[Record]) -> list[list[int]]: ...


_SPLITS: dict[str, Split] = {}


def _data_id(config: RunConfig) -> str:
    """What decides the training split: the task's reading of the data and the data section."""
    return json.dumps({"task": dataclasses.asdict(config.task), "data": dataclasses.asdict(config.data)},
                      sort_keys=True)


def _train_split(config: RunConfig) -> Split:
    """The training split, loaded once per process (a simulation actor serves many partitions of it)."""
    key = _data_id(config)
    if key not in _SPLITS:
        _SPLITS.clear()  # one data set per process at a time
        _SPLITS[key] = load_split(config, "train")
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
    key = (task.name, _data_id(config), config.federation.partition, config.federation.alpha, partition_id,
           num_partitions)
    if key not in _CACHE:
        from datasets import Dataset

        split = _train_split(config)
        fields = [f"text{i}" for i in range(len(config.task.text_fields))]
        columns = {f: list(c) for f, c in zip(fields, zip(*split.records))} if len(split) else {f: [] for f in fields}
        partitioner = _partitioner(config, num_partitions)
        partitioner.dataset = Dataset.from_dict({**columns, "label": split.labels.tolist()})
        part = partitioner.load_partition(partition_id)
        labels = np.asarray(part["label"], dtype=np.int64)
        records = list(zip(*(part[f] for f in fields)))
        names = config.task.labels
        _CACHE[key] = Partition(task.encode(records), labels, data_key((r, names[y]) for r, y in zip(records, labels)))
        log.info("partition %d/%d (%s): %d examples", partition_id, num_partitions, config.federation.partition,
                 len(labels))
    return _CACHE[key]
