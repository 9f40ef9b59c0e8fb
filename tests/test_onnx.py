"""The ONNX Runtime client: export, per-example losses against torch, bit-identical numpy replay, a mixed
torch/ONNX Runtime federation, and a node process that never imports torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from seedtune.client.onnx_runtime import OnnxReplica, OnnxTask
from seedtune.server.federation import FederatedServer
from seedtune.shared.protocol.ledger import Ledger
from seedtune.shared.protocol.chain import Entry, link
from seedtune.shared.task.config import from_dict
from seedtune.shared.engine.follower import ReplicaError
from seedtune.server.onnx_export import export_onnx
from seedtune.shared.task.onnx_format import OnnxModelError
from seedtune.shared.protocol.proto import Instruction
from seedtune.shared.engine.replica import Replica
from seedtune.shared.protocol.wire import from_content
from seedtune.simulations.inprocess import InProcessGrid
from tests.helpers import LABELS, SENTENCES
from tests.test_federation import fed_config

ROOT = Path(__file__).resolve().parents[1]


def _replica(name: str) -> Replica:
    return Replica(from_dict({"model": {"name": name}, "selection": {"mode": "prune", "fraction": 0.02}}).validate())


@pytest.fixture(scope="module", params=["tiny-encoder", "tiny-decoder"])
def exported(request, tmp_path_factory):
    replica = _replica(request.param)
    replica.attach(replica.make_header(None))
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    report = export_onnx(replica, path)
    return replica, path, report


def _random_entries(replica: Replica, count: int, seed: int) -> tuple[list[Entry], bytes]:
    rng = np.random.default_rng(seed)
    entries, head = [], replica.head
    for i in range(replica.version, replica.version + count):
        entry = Entry(i, int(rng.integers(0, 2**64, dtype=np.uint64)), float(np.float32(rng.normal() * 1e-3)), 1)
        head = link(head, entry)
        entries.append(entry)
    return entries, head


def test_a_centred_decoder_head_exports_with_the_layers_above_it_cut(tmp_path):
    """model.decoder_head = "centred" swaps the body's layer list during the forward; the exported graph must be the
    cut model's (export_onnx checks its per-example losses against torch's)."""
    replica = Replica(from_dict({"model": {"name": "tiny-decoder", "decoder_head": "centred", "head_layer": 1},
                                 "selection": {"mode": "head"}}).validate())
    replica.attach(replica.make_header(None))
    report = export_onnx(replica, tmp_path / "model.onnx")
    assert report["check"]["max_abs_diff"] < 1e-4 * max(1.0, report["check"]["scale"])


def test_per_example_losses_match_torch(exported):
    replica, path, report = exported
    assert report["check"]["max_abs_diff"] < 1e-4 * max(1.0, report["check"]["scale"])
    onnx = OnnxReplica.from_header(replica.header, path)
    ids = replica.task.encode(SENTENCES)
    assert onnx.task.encode(SENTENCES) == ids  # same tokenisation without transformers
    for view in (replica.view, onnx.view):  # also at a perturbed point: the trainable input drives the graph
        view.snapshot()
        view.perturb(seed=99, scale=1e-2)
    torch_losses, onnx_losses = replica.view.per_example_loss(ids, LABELS), onnx.view.per_example_loss(ids, LABELS)
    for view in (replica.view, onnx.view):
        view.restore()
    np.testing.assert_allclose(onnx_losses, torch_losses, rtol=1e-4)
    np.testing.assert_allclose(onnx.view.per_example_loss(ids, LABELS), replica.view.per_example_loss(ids, LABELS),
                               rtol=1e-4)


def test_numpy_replay_is_bit_identical_to_torch(exported):
    replica, path, _ = exported
    onnx = OnnxReplica.from_header(replica.header, path)
    replica.reset()
    assert onnx.state_digest() == replica.state_digest()
    entries, head = _random_entries(replica, 1000, seed=3)
    replica.apply(entries, head)
    onnx.apply(entries, head)
    assert np.array_equal(onnx.values().view(np.uint32), replica.values().view(np.uint32))
    assert onnx.state_digest() == replica.state_digest()
    replica.reset()


def test_exported_file_runs_alone_with_its_finetuned_values(exported, tmp_path):
    replica, _, _ = exported
    entries, head = _random_entries(replica, 50, seed=4)
    replica.apply(entries, head)
    path = tmp_path / "finetuned.onnx"
    report = export_onnx(replica, path)
    task = OnnxTask(path)
    ids = replica.task.encode(SENTENCES)
    np.testing.assert_allclose(task.logits(ids), replica.task.logits(replica.task.collate(ids, LABELS)).numpy(),
                               rtol=1e-4, atol=1e-5)
    assert report["ledger_version"] == replica.version == 50
    replica.reset()


def test_altered_or_mismatched_models_are_refused(exported, tmp_path):
    replica, path, _ = exported
    broken = tmp_path / "model.onnx"
    for src in path.parent.iterdir():
        (tmp_path / src.name).write_bytes(src.read_bytes())
    with broken.open("r+b") as f:
        f.seek(-8, 2)
        f.write(b"\x00" * 8)
    with pytest.raises(OnnxModelError, match="SHA-256"):
        OnnxTask(broken)
    other = Replica(from_dict({"model": {"name": replica.config.model.name},
                               "selection": {"mode": "prune", "fraction": 0.05}}).validate())
    with pytest.raises(ReplicaError, match="trainable set digest"):
        OnnxReplica.from_header(other.make_header(None), path)


def test_execution_providers_are_chosen_by_the_node_and_a_missing_one_is_named(exported, tmp_path):
    """onnx-providers lists the node's preference; one this onnxruntime build lacks is refused by name, before
    any forward pass (this machine's build is CPU-only)."""
    import onnxruntime as ort

    replica, path, _ = exported
    assert OnnxTask(path, providers=["CPUExecutionProvider"]).provider == "CPUExecutionProvider"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(OnnxModelError, match="onnx-providers CUDAExecutionProvider not available"):
            OnnxTask(path, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(OnnxModelError, match="onnx-providers is empty"):
        OnnxTask(path, providers=[])


def test_a_node_asking_for_a_missing_provider_refuses_by_name(tmp_path, caplog):
    config = fed_config(tmp_path / "run", **{"federation.rounds": 1})
    model = tmp_path / "onnx" / "model.onnx"
    export_onnx(Replica(config), model)
    grid = InProcessGrid(2, node_configs={0: {"runtime": "onnx", "onnx-model": str(model),
                                              "onnx-providers": "NoSuchExecutionProvider,CPUExecutionProvider"},
                                          1: {"runtime": "onnx", "onnx-model": str(model)}})
    summary = FederatedServer(config, grid, tmp_path / "run").run()
    assert "onnx-providers NoSuchExecutionProvider not available" in caplog.text
    assert list(summary["client_runtimes"].values()) == ["onnx:CPUExecutionProvider"] and not summary["clients_agree"]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A federation of 4 nodes, two of them on ONNX Runtime, over the in-process transport."""
    run_dir = tmp_path_factory.mktemp("mixed")
    config = fed_config(run_dir)
    model = run_dir / "onnx" / "model.onnx"
    export_onnx(Replica(config), model)
    onnx_nodes = {i: {"runtime": "onnx", "onnx-model": str(model)} for i in (1, 3)}
    grid = InProcessGrid(4, node_configs=onnx_nodes)
    summary = FederatedServer(config, grid, run_dir).run()
    return run_dir, model, grid, summary


def test_mixed_federation_agrees_and_replays_to_one_model_on_both_paths(mixed):
    run_dir, model, grid, summary = mixed
    assert summary["clients_agree"] and len(summary["client_digests"]) == 4
    assert sorted(summary["client_runtimes"].values()) == ["onnx:CPUExecutionProvider"] * 2 + ["torch:cpu:float32"] * 2
    ledger = Ledger.open(run_dir / "ledger.sqlite")
    try:
        onnx_ids = {nid for i, nid in enumerate(grid.get_node_ids()) if i in (1, 3)}
        nodes = {p.node for r in range(1, ledger.last_round + 1) for p in ledger.replies(r) if p.status == "accepted"}
        assert onnx_ids <= nodes and nodes - onnx_ids  # both runtimes' scalars went into the aggregates
        onnx = OnnxReplica.from_header(ledger.header, model)
        onnx.apply(list(ledger.entries()), ledger.hash_at(len(ledger)))
    finally:
        ledger.close()
    out = subprocess.run([sys.executable, "-m", "seedtune.cli", "replay", str(run_dir / "ledger.sqlite")],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    replayed = json.loads(out.stdout.strip().splitlines()[-1])
    assert replayed["state_digest"] == onnx.state_digest() == summary["state_digest"]


def test_export_onnx_command_writes_a_checked_finetuned_model(mixed, tmp_path):
    run_dir, _, _, summary = mixed
    out = subprocess.run([sys.executable, "-m", "seedtune.cli", "export-onnx", str(run_dir / "ledger.sqlite"),
                          "--out", str(tmp_path / "final.onnx")], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["state_digest"] == summary["state_digest"] and report["entries"] == summary["ledger_entries"]
    assert report["check"]["max_abs_diff"] < 1e-4 * max(1.0, report["check"]["scale"])
    card = (tmp_path / "final.README.md").read_text()  # the card beside the file, its guarantee the server's
    assert report["model_card"] == str(tmp_path / "final.README.md")
    assert f"epsilon: {summary['epsilon_max']:.4g}" in card and "seedtune export-onnx" in card
    bad = subprocess.run([sys.executable, "-m", "seedtune.cli", "export-onnx", "--out", str(tmp_path / "x.onnx")],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert bad.returncode == 2 and "LEDGER" in bad.stderr


NO_TORCH_NODE = r"""
import sys
from seedtune.shared.protocol.proto import Instruction
from seedtune.shared.protocol.wire import from_content, to_content
from seedtune.simulations.inprocess import InProcessGrid
from flwr.app import Message

instruction = Instruction.FromString(sys.stdin.buffer.read())
grid = InProcessGrid(4, node_configs={i: {"runtime": "onnx", "onnx-model": sys.argv[1]} for i in range(4)})
node = grid.get_node_ids()[int(sys.argv[2])]
[reply] = grid.send_and_receive([Message(to_content(instruction), dst_node_id=node, message_type="train")])
assert "torch" not in sys.modules, "the ONNX Runtime node imported torch"
Reply = __import__("seedtune.shared.protocol.proto", fromlist=["Reply"]).Reply
sys.stdout.buffer.write(from_content(reply.content, Reply).SerializeToString())
"""


def test_onnx_node_process_imports_no_torch(mixed):
    from seedtune.shared.protocol.proto import Reply

    _, model, grid, _ = mixed
    first = next(m for m in grid.sent if m.metadata.message_type == "train")
    index = grid.get_node_ids().index(first.metadata.dst_node_id)
    ins = from_content(first.content, Instruction)
    out = subprocess.run([sys.executable, "-c", NO_TORCH_NODE, str(model), str(index)], input=ins.SerializeToString(),
                         capture_output=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr.decode()[-3000:]
    reply = Reply.FromString(out.stdout)
    assert not reply.refusal, reply.refusal
    scalars = np.frombuffer(reply.scalars, dtype="<f4")
    assert len(scalars) == len(ins.seeds) and np.isfinite(scalars).all()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["minilm", "smollm2"])
def test_real_models_losses_match_torch(name, tmp_path):
    replica = Replica(from_dict({"model": {"name": name}, "selection": {"mode": "prune", "fraction": 0.01}}).validate())
    replica.attach(replica.make_header(None))
    report = export_onnx(replica, tmp_path / "model.onnx")
    onnx = OnnxReplica.from_header(replica.header, tmp_path / "model.onnx")
    ids = replica.task.encode(SENTENCES)
    assert onnx.task.encode(SENTENCES) == ids
    for view in (replica.view, onnx.view):
        view.snapshot()
        view.perturb(seed=7, scale=1e-3)
    np.testing.assert_allclose(onnx.view.per_example_loss(ids, LABELS), replica.view.per_example_loss(ids, LABELS),
                               rtol=1e-4)
    entries, head = _random_entries(replica, 200, seed=5)
    for view in (replica.view, onnx.view):
        view.restore()
    replica.apply(entries, head)
    onnx.apply(entries, head)
    assert np.array_equal(onnx.values().view(np.uint32), replica.values().view(np.uint32))
    assert report["check"]["max_abs_diff"] < 1e-4 * max(1.0, report["check"]["scale"])


def test_a_node_whose_onnx_model_is_missing_refuses_by_name(mixed, tmp_path):
    from seedtune.client.privacy_ledger import Budget, open_privacy_ledger
    from seedtune.client.node import Holder, NodeState, Runtime, handle_instruction

    _, _, grid, _ = mixed
    first = next(m for m in grid.sent if m.metadata.message_type == "train")
    holder = Holder("partition-0-of-4", Budget(3.0, 1e-5), open_privacy_ledger(create=True))
    reply = handle_instruction(from_content(first.content, Instruction), 1, NodeState(), lambda r: None, holder,
                               runtime=Runtime("onnx", str(tmp_path / "absent.onnx")))
    assert "absent.seedtune.json is missing" in reply.refusal and not reply.scalars
