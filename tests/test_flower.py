"""Real Flower runs: the offline simulation (`flwr run .` via scripts/simulate.sh) and a deployment on
127.0.0.1 with TLS and SuperNode authentication (scripts/deploy/, driven by tests/deploy_harness.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from seedtune.shared.protocol.ledger import Ledger
from seedtune.shared.task.config import flatten
from tests.deploy_harness import start_federation

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "sst2"
TINY = {"model.name": "tiny-encoder", "data.train_size": 240, "data.test_size": 64, "eval.dev_size": 32, "eval.every": 1,
        "federation.local_steps": 2, "federation.sample_rate": 0.25, "federation.clients_per_round": 0,
        "zo.lr": 1e-2, "privacy.noise_multiplier": 2.0, "data.data_dir": str(DATA)}
# The DP-ZO recipe (one direction per step: what secure aggregation and the ONNX node take), as app-config keys
DPZO = flatten(tomllib.loads((ROOT / "configs" / "federated_dpzo.toml").read_text()))


@pytest.mark.parametrize("recipe", ["", "configs/federated_dpzo.toml"])
def test_simulation_with_flwr_run_offline(tmp_path, recipe):
    """The README's main job path on the tiny encoder: the default recipe (the head stage), and DP-ZO through
    SEEDTUNE_RECIPE, whose keys go in as overrides while the test's own (TINY's) win."""
    overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in {**TINY, "federation.rounds": 2}.items())
    env = {**os.environ, "NODES": "3", "RUN_DIR": str(tmp_path / "run"), "FLWR_HOME": str(tmp_path / "flwr"),
           "PYTHON": sys.executable, "SEEDTUNE_RECIPE": recipe}
    out = subprocess.run(["bash", "scripts/simulate.sh", overrides], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    # rounds x local steps x directions: a full frame over the tiny encoder's head (2 labels x 33 entries: 128
    # directions) for the head stage, one for DP-ZO; all 3 nodes each round (TINY's clients_per_round 0 wins)
    assert summary["rounds"] == 2 and summary["ledger_entries"] == 2 * 2 * (1 if recipe else 128)
    rounds = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["accepted"] for r in rounds if r["round"] >= 1] == [3, 3]
    assert summary["clients_agree"] and len(summary["client_digests"]) == 3
    for name in ("metrics.csv", "metrics.png", "metrics.jsonl"):
        assert (tmp_path / "run" / name).stat().st_size > 0


@pytest.mark.slow  # a real SuperLink and SuperNodes with TLS: multi-minute on CI; run with -m slow
def test_deployment_with_tls_and_node_authentication(tmp_path):
    """Three SuperNodes, each reading its institution's own file (node config data-path), the second on ONNX
    Runtime (an edge node without torch), the third with a bad file: a mixed real federation that pins its
    nodes, whose rounds commit from the two good nodes while the third refuses by name. A fourth, rogue
    SuperNode registers a key of its own through the Control API (Flower admits it) and claims node-0's name:
    it is asked who it is, refused, and sent nothing else."""
    run_dir = tmp_path / "run"
    own = []
    for i, rows in enumerate((range(0, 60), range(60, 120))):
        own.append(tmp_path / f"site-{i}" / "train.tsv")
        own[-1].parent.mkdir()
        own[-1].write_text("sentence\tlabel\n" + "".join(f"site {i} sentence {k} , a fine one\t{k % 2}\n" for k in rows))
    bad = tmp_path / "site-2" / "train.tsv"
    bad.parent.mkdir()
    bad.write_text("sentence\tlabel\nfine\t1\nmy secret record\t7\n")
    model = tmp_path / "onnx" / "model.onnx"
    export = subprocess.run([sys.executable, "-m", "seedtune.cli", "export-onnx", "--out", str(model),
                             *(f"-s{k}={v}" for k, v in TINY.items() if k.startswith("model."))],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stderr[-3000:]
    nodes = {"NODE_CONFIG_0": f"data-path=\"{own[0]}\"",
             "NODE_CONFIG_1": f"runtime=\"onnx\" onnx-model=\"{model}\" data-path=\"{own[1].parent}\"",
             "NODE_CONFIG_2": f"data-path=\"{bad}\""}
    with start_federation(ROOT, tmp_path / "fed", num_nodes=3, extra_unregistered=True, extra_env=nodes) as fed:
        assert fed.unregistered is not None and fed.unregistered.refused, fed.unregistered
        rogue = subprocess.run([str(ROOT / "scripts" / "deploy" / "start_rogue.sh"), str(fed.state_dir)],
                               env=fed.env, capture_output=True, text=True, timeout=120)
        assert rogue.returncode == 0, rogue.stdout + rogue.stderr  # the gap in Flower that pinning closes
        rogue_id = int(re.search(r"ROGUE node_id=(\d+)", rogue.stdout).group(1))
        result = fed.run(ROOT, {**DPZO, **TINY, "federation.rounds": 2, "out_dir": str(run_dir),
                                "federation.allowed_nodes": fed.env["SEEDTUNE_ALLOWED_NODES"],
                                "federation.server_key": fed.env["SEEDTUNE_SERVER_KEY"]}, timeout=420)
        assert result.ok, result.output_tail()
        ledger = Ledger.open(run_dir / "ledger.sqlite")
        assert ledger.last_round == 2 and ledger.verify() == 2 * 2  # rounds x local steps
        for rnd in (1, 2):  # each round from the two good sites; the bad one refused, by name, every round
            assert sorted((p.holder, p.status) for p in ledger.replies(rnd)) == [
                ("node-0", "accepted"), ("node-1", "accepted"), ("node-2", "refused")]
        assert "this node's data file is unusable" in fed.log("supernode_3") + result.output_tail(20000)
        assert "record 2 has label '7'" in fed.log("supernode_3")  # the details stay in the node's own log
        summary = json.loads((run_dir / "summary.json").read_text())
        # The bad site refuses to train, yet follows the ledger: a node's sync reads no data.
        digests = summary["client_digests"]
        assert summary["clients_agree"] and len(digests) == 3, digests
        assert set(digests.values()) == {summary["state_digest"]}
        assert sorted(summary["client_runtimes"].values()) == ["onnx:CPUExecutionProvider", "torch:cpu:float32",
                                                               "torch:cpu:float32"]
        assert summary["refused_identities"] == [rogue_id] and summary["pinned_nodes"] == 3
        assert rogue_id not in {p.node for r in (1, 2) for p in ledger.replies(r)}
        received = re.findall(r"Receiving: (\S+) message", fed.log("rogue"))
        assert received == ["query.identify"], received
        assert fed.check_refusal("plaintext").refused


@pytest.mark.slow  # a real SuperLink and SuperNodes with TLS: multi-minute; run with -m slow
def test_deployment_with_tls_node_authentication_and_secure_aggregation(tmp_path):
    """Secure aggregation over the real deployment path (TLS, pinned nodes, a pinned server key): three
    SuperNodes, each its own file. The third is killed (SIGKILL, its ClientApp with it) the moment the masked
    vector is asked of it, so it has sent its encrypted shares and never sends its vector: a drop after the masks
    are shared. Round 1 still commits from the two survivors (min_replies 2, threshold 2 of 3), which needs the
    dead node's pairwise masks rebuilt from the survivors' shares; round 2 goes on without it. The ledger keeps
    no node's scalars, and both survivors follow it to the server's state."""
    run_dir = tmp_path / "run"
    files = []
    for i, rows in enumerate((range(0, 60), range(60, 120), range(120, 180))):
        files.append(tmp_path / f"site-{i}" / "train.tsv")
        files[-1].parent.mkdir()
        files[-1].write_text("sentence\tlabel\n" + "".join(f"site {i} sentence {k} , a fine one\t{k % 2}\n"
                                                           for k in rows))
    # the sites' operators trust the server to follow the protocol: their budgets are charged centrally
    nodes = {f"NODE_CONFIG_{i}": f"data-path=\"{path}\" trust-secure-aggregation=true" for i, path in enumerate(files)}
    # the federation stops first on the way out, so a failing check does not wait for the run to time out
    with ThreadPoolExecutor(1) as pool, \
            start_federation(ROOT, tmp_path / "fed", num_nodes=3, extra_unregistered=False, extra_env=nodes) as fed:
        run = pool.submit(fed.run, ROOT, {**DPZO, **TINY, "federation.rounds": 2, "out_dir": str(run_dir),
                                          "privacy.noise_multiplier": 0.0, "federation.secure_aggregation": "secagg+",
                                          "federation.min_replies": 2, "federation.round_timeout_s": 30.0,
                                          "federation.allowed_nodes": fed.env["SEEDTUNE_ALLOWED_NODES"],
                                          "federation.server_key": fed.env["SEEDTUNE_SERVER_KEY"]}, timeout=420)
        # train.secure carries stages 2 to 4: the second is stage 3, the request for the masked vector. A
        # ClientApp takes seconds to start, so a kill within 20 ms of its receipt lands before any answer; the
        # ledger's "dropped" row and the server's stage-3 warning below check that it did.
        while not run.done() and fed.log("supernode_3").count("Receiving: train.secure message") < 2:
            time.sleep(0.02)
        assert not run.done(), run.result().output_tail()
        fed.crash_node(3)
        result = run.result()
        assert result.ok, result.output_tail()
        assert "node %d sent no valid answer to secure stage 3" % fed.node_ids[2] in result.output
        ledger = Ledger.open(run_dir / "ledger.sqlite")
        assert ledger.last_round == 2 and ledger.verify() == 2 * 2 and ledger.secure_rounds() == 2
        survivors = [("", "secure_sum"), ("node-0", "masked"), ("node-1", "masked")]
        assert sorted((p.holder, p.status) for p in ledger.replies(1)) == [*survivors, ("node-2", "dropped")]
        # in round 2 the dead node is either still listed by the SuperLink (asked, and dropped at stage 1) or not
        assert sorted((p.holder, p.status) for p in ledger.replies(2)) in ([*survivors, ("node-2", "dropped")],
                                                                          survivors)
        assert all(not p.scalars for r in (1, 2) for p in ledger.replies(r) if p.status != "secure_sum")
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["clients_agree"] and len(summary["client_digests"]) == 2
        assert set(summary["client_digests"].values()) == {summary["state_digest"]}
        assert summary["noise"].startswith("skellam(")
        assert re.findall(r"Receiving: (\S+) message", fed.log("supernode_1")).count("train.secure") == 2 * 3
