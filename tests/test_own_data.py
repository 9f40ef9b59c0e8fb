"""Each node's own data: a data-path per node, read as the ledger's task reads it; natural partitions."""

from __future__ import annotations

import json
import sqlite3

import pytest

from seedtune.server.federation import FederatedServer
from seedtune.shared.task.config import load_config
from seedtune.simulations.inprocess import InProcessGrid
from tests.helpers import QUESTIONS, write_csv



def _task_file(tmp_path):
    cfg = tmp_path / "task.toml"
    cfg.write_text('[task]\nname = "questions"\ntext_fields = ["text"]\ntemplate = "Q: {text}\\nA:"\n'
                   'labels = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]\nlabel_words = []\nlabel_prompts = []\n')
    return cfg


def _config(tmp_path, **extra):
    overrides = {"model.name": "tiny-encoder", "federation.rounds": 1, "federation.local_steps": 2,
                 "federation.sample_rate": 0.5, "out_dir": str(tmp_path / "run"), "threads": 1, "eval.every": 0,
                 "privacy.noise_multiplier": 1.5, "data.data_dir": str(tmp_path / "server")}
    overrides.update(extra)
    return load_config([_task_file(tmp_path)], overrides)


def test_nodes_train_on_their_own_files_and_a_bad_file_refuses_by_name(tmp_path, caplog):
    write_csv(tmp_path / "server" / "train.csv", QUESTIONS)  # the server's public splits (it trains on nothing)
    write_csv(tmp_path / "server" / "test.csv", QUESTIONS)
    own_a = write_csv(tmp_path / "clinic-a" / "records.csv", QUESTIONS * 3)
    own_b = write_csv(tmp_path / "clinic-b" / "train.csv", list(reversed(QUESTIONS)) * 3)  # a folder's train file
    bad = write_csv(tmp_path / "clinic-c" / "records.csv", QUESTIONS + [("my secret diagnosis", "XRAY")])
    nodes = {0: {"data-path": str(own_a), "holder": "clinic-a"}, 1: {"data-path": str(own_b.parent),
             "holder": "clinic-b"}, 2: {"data-path": str(bad), "holder": "clinic-c"}}
    grid = InProcessGrid(3, node_configs=nodes)
    server = FederatedServer(_config(tmp_path), grid, tmp_path / "run")
    row = server.run_round(1)
    assert row["accepted"] == 2 and row["entries"] == 2 and row["rejected_by_kind"] == {"refused": 1}
    to_server = [r.getMessage() for r in caplog.records if r.name.startswith("seedtune.server.")]
    assert any("data file is unusable" in m for m in to_server)
    assert not any("secret" in m or "XRAY" in m for m in to_server)
    assert any("record 7 has label 'XRAY'" in r.getMessage() for r in caplog.records if r.name == "seedtune.client.node")
    with sqlite3.connect(tmp_path / "run" / "ledger.sqlite") as db:
        statuses = dict(db.execute("SELECT holder, status FROM replies WHERE round = 1"))
    assert statuses == {"clinic-a": "accepted", "clinic-b": "accepted", "clinic-c": "refused"}
    summary = server.run()
    # the node whose data is unusable still follows the model: its replica agrees (the sync loads no data)
    assert summary["ledger_entries"] == 2 and summary["clients_agree"] and len(summary["client_digests"]) == 3
    spent = json.loads((tmp_path / "run" / "summary.json").read_text())["epsilon_holders"]
    assert set(spent) == {"clinic-a", "clinic-b", "clinic-c"} and spent["clinic-c"] == 0.0  # it released nothing
    assert spent["clinic-a"] > 0 and spent["clinic-b"] > 0


def test_a_node_with_own_data_but_no_holder_refuses_by_name(tmp_path):
    write_csv(tmp_path / "server" / "train.csv", QUESTIONS)
    write_csv(tmp_path / "server" / "test.csv", QUESTIONS)
    own = write_csv(tmp_path / "mine.csv", QUESTIONS * 2)
    grid = InProcessGrid(1, node_configs={0: {"data-path": str(own)}})
    server = FederatedServer(_config(tmp_path), grid, tmp_path / "run")
    assert server.run_round(1)["accepted"] == 0
    assert not server.holders.of  # it never identified


def test_a_natural_partition_gives_each_node_one_institutions_records(tmp_path):
    rows = [(f"{t} ({site})", y, site) for site in ("north", "south", "west") for t, y in QUESTIONS]
    (tmp_path / "server").mkdir()
    for split in ("train", "test"):
        (tmp_path / "server" / f"{split}.csv").write_text(
            "text,label,site\n" + "".join(f"\"{t}\",{y},{s}\n" for t, y, s in rows))
    from seedtune.client.partition import load_partition
    from seedtune.shared.task.loading import load_task_model

    config = _config(tmp_path, **{"federation.partition": "natural", "federation.partition_by": "site"})
    task = load_task_model(config.model, config.task)
    parts = [load_partition(config, task, i, 3) for i in range(3)]
    assert [len(p.labels) for p in parts] == [6, 6, 6] and len({str(p.ids) for p in parts}) == 3
    from seedtune.shared.task.tasks import DataError

    with pytest.raises(DataError, match="column 'site' has 3 distinct values but the federation has 2 nodes"):
        load_partition(config, task, 0, 2)
    bad = _config(tmp_path, **{"federation.partition": "natural", "federation.partition_by": "hospital"})
    with pytest.raises(DataError, match=r"no column 'hospital' \(federation.partition_by\)"):
        load_partition(bad, task, 0, 3)
