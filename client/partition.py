"""A node's data: its institution's own files (node config ``data-path`` for training, ``test-path`` for
held-out evaluation), or in a simulation its share of the task's train (or test) split, partitioned with
flwr-datasets (IID, Dirichlet label skew, or natural groups).

Every simulated node partitions the same public-seeded subset with the same seeded partitioner, so partition
i is the same wherever it is computed. A deployed node reads its own file, which never leaves it, as the
ledger header's task reads it. The tokenized data are cached per process (simulation actors serve many nodes).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np

from seedtune.client.node import Partition
from seedtune.shared.task.config import RunConfig
from seedtune.shared.engine.follower import Tokenizes
from seedtune.shared.task.tasks import DataError, Split, load_own, load_split

log = logging.getLogger(__name__)

_CACHE: dict[tuple, Partition] = {}


_SPLITS: dict[tuple[str, str], Split] = {}


def _group_field(config: RunConfig) -> str:
    fed = config.federation
    return fed.partition_by if fed.partition == "natural" else ""


def _data_id(config: RunConfig) -> str:
    """What decides the training split: the task's reading of the data, the data section, the grouping column."""
    return json.dumps({"task": dataclasses.asdict(config.task), "data": dataclasses.asdict(config.data),
                       "groups": _group_field(config)}, sort_keys=True)


def _split(config: RunConfig, split: str) -> Split:
    """A split of the task's data, loaded once per process (a simulation actor serves many partitions of it)."""
    key = (_data_id(config), split)
    if key not in _SPLITS:
        for other in [k for k in _SPLITS if k[0] != key[0]]:  # one data set per process at a time
            del _SPLITS[other]
        _SPLITS[key] = load_split(config, split, group_field=_group_field(config))
    return _SPLITS[key]


def _partitioner(config: RunConfig, num_partitions: int):
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner

    fed = config.federation
    if fed.partition == "iid":
        return IidPartitioner(num_partitions)
    if fed.partition == "natural":
        return NaturalIdPartitioner(partition_by="group")
    return DirichletPartitioner(num_partitions, partition_by="label", alpha=fed.alpha, seed=config.data.seed,
                                min_partition_size=2, self_balancing=True)


def _partition(task: Tokenizes, split: Split) -> Partition:
    """The tokenized records (the holder's privacy ledger charges them to the holder, client.node.Holder)."""
    ids, labels = task.examples(split)
    return Partition(ids, labels)


def load_own_data(config: RunConfig, task: Tokenizes, path: str, split: str = "train") -> Partition:
    """The holder's own training (or held-out ``test``) file; re-read when the file changes."""
    stat = Path(path).stat() if Path(path).exists() else None
    key = (task.name, _data_id(config), str(Path(path).resolve()), split, stat and (stat.st_mtime_ns, stat.st_size))
    if key not in _CACHE:
        _CACHE[key] = _partition(task, load_own(config, path, split))
        log.info("own %s data %s: %d examples", split, path, len(_CACHE[key].labels))
    return _CACHE[key]


def load_partition(config: RunConfig, task: Tokenizes, partition_id: int, num_partitions: int,
                   split: str = "train") -> Partition:
    """Partition ``partition_id`` of ``num_partitions`` of the task's ``split`` (a simulated node's training
    data, or its held-out share of the test split)."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} outside 0..{num_partitions - 1}")
    key = (task.name, _data_id(config), split, config.federation.partition, config.federation.alpha, partition_id,
           num_partitions)
    if key not in _CACHE:
        from datasets import Dataset

        data = _split(config, split)
        fields = [f"text{i}" for i in range(len(config.task.text_fields))]
        columns = {f: list(c) for f, c in zip(fields, zip(*data.records))} if len(data) else {f: [] for f in fields}
        partitioner = _partitioner(config, num_partitions)
        if data.groups is not None:
            columns["group"] = data.groups
            ids = sorted(set(data.groups))
            if len(ids) != num_partitions:
                raise DataError(f"federation.partition 'natural': column {config.federation.partition_by!r} has "
                                f"{len(ids)} distinct values but the federation has {num_partitions} nodes; run "
                                f"one node per value")
        if data.targets is not None:
            columns["target"] = data.targets
        partitioner.dataset = Dataset.from_dict({**columns, "label": data.labels.tolist()})
        part = partitioner.load_partition(partition_id)
        records = list(zip(*(part[f] for f in fields)))
        _CACHE[key] = _partition(task, Split(records, np.asarray(part["label"], dtype=np.int64),
                                                     targets=part["target"] if "target" in part.column_names else None))
        log.info("partition %d/%d of %s (%s): %d examples", partition_id, num_partitions, split,
                 config.federation.partition, len(_CACHE[key].labels))
    return _CACHE[key]
