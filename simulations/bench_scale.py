"""The server's cost per round against the number of replies M: ``python -m seedtune.simulations.bench_scale --json``.

Part 1, in process: the real :class:`server.federation.FederatedServer` (MiniLM, its 1% SynFlow set, K = 10
seeds per round, a real SQLite ledger) runs rounds against a load generator that answers every instruction
with a real ``Reply`` message (the holder it serves; K float32 scalars inside the honest bound). The generator
is a benchmark driver standing in for M nodes' networks and forward passes; the server's own phases are
timed by the server (``phase_s`` in each round's metrics): configure (eligibility, seeds, recorded
instructions), tail (building the instructions), validate, aggregate, commit, apply (the replica). The time
the generator takes is reported apart (``generator_s``) and not counted as the server's.

Part 2, ``--flwr-nodes N`` (default 100): a real ``flwr run`` simulation (scripts/simulate.sh) of the tiny
encoder with N simulated nodes, every node instructed every round; it reports the rounds' server phases from
the run's metrics, the ledger's entries per round and whether every node's replica agrees with the server's.

``--secure``: part 1 again in secure-aggregation mode (server.secure): the server's own SecAgg+ work is the
``secure`` phase (routing keys and shares, rebuilding seeds and keys, removing masks); the generator plays
each node's part with the real protocol code, timed apart as before.

Steady-state rounds only (round 1 also asks every node for its data-holder identity); each figure is the
median over ``--rounds`` rounds. Run it alone: the machine has two cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterable, cast

import numpy as np
from flwr.app import Message

from seedtune.server.federation import FederatedServer
from seedtune.shared.privacy.accounting import noise_epsilon
from seedtune.shared.task.config import load_config
from seedtune.shared.protocol.ledger import Ledger
from seedtune.shared.protocol.proto import PROTOCOL_VERSION, Challenge, Identity, Instruction, Reply
from seedtune.shared.engine.replica import Replica
from seedtune.shared.protocol.run_folder import LEDGER_FILE, METRICS_FILE, SUMMARY_FILE
from seedtune.shared.protocol.secagg import NodeSession, PublicKeys, RoundGraph, round_context
from seedtune.shared.protocol.wire import IDENTIFY, SECURE, from_content, to_content
from seedtune.simulations.inprocess import outside_flower

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
SERVER_PHASES = ("configure", "tail", "validate", "secure", "aggregate", "commit", "apply")  # "secure": SecAgg+'s work
SIZES = (10, 100, 1000, 10_000)


class LoadGrid:
    """M simulated nodes answering with real Identity and Reply messages (a benchmark driver for the Grid API).
    In a secure round each plays its SecAgg+ part with the real protocol code (shared.protocol.secagg), masking
    a random vector in the range a node's quantised noised sums take."""

    def __init__(self, num_nodes: int, clip: float, seed: int = 0) -> None:
        self.run = SimpleNamespace(run_id=11)
        self.ids = [(1 << 63) + 17 + i for i in range(num_nodes)]
        self.holder = {nid: f"holder-{i}" for i, nid in enumerate(self.ids)}
        self.clip = clip
        self.rng = np.random.default_rng(seed)
        self.generator_s = 0.0
        self.sessions: dict[int, NodeSession] = {}

    def secure(self, node: int, ins: Instruction, reply: Reply) -> None:
        """One node's answer to a secure round's stage (its keys, shares, masked vector or unmasking shares)."""
        step = ins.secure
        if step.stage == 1:
            graph = RoundGraph(tuple(step.ring), step.degree, step.threshold, len(ins.seeds),
                               round_context(ins.header_digest, ins.round, ins.model_version))
            self.sessions[node] = NodeSession(node, graph)
            keys = self.sessions[node].advertise()
            reply.secure.keys.encryption, reply.secure.keys.masking = keys.encryption, keys.masking
        elif step.stage == 2:
            peers = {int(j): PublicKeys(k.encryption, k.masking) for j, k in step.peers.items()}
            for j, ciphertext in self.sessions[node].share(peers).items():
                reply.secure.shares[j] = ciphertext
        elif step.stage == 3:
            vector = self.rng.integers(-20_000, 20_000, self.sessions[node].graph.length)
            reply.secure.masked = self.sessions[node].masked(vector, dict(step.inbox)).astype("<u8").tobytes()
        else:
            for j, (kind, share) in self.sessions[node].unmask(set(step.survivors), set(step.dropped)).items():
                reply.secure.answers[j].kind, reply.secure.answers[j].share = kind, share

    def get_node_ids(self) -> list[int]:
        return list(self.ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        start = time.perf_counter()
        parsed: dict[bytes, Instruction] = {}
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if msg.metadata.message_type == IDENTIFY:
                challenge = from_content(msg.content, Challenge)
                identity = Identity(protocol_version=PROTOCOL_VERSION, run_id=challenge.run_id, node=node,
                                    holder=self.holder[node])
                replies.append(Message(to_content(identity), reply_to=msg))
                continue
            raw = cast(bytes, msg.content.config_records["seedtune"]["payload"])
            if raw not in parsed:  # the server shares one payload among the nodes at one position
                parsed[raw] = from_content(msg.content, Instruction)
            ins = parsed[raw]
            reply = Reply(protocol_version=PROTOCOL_VERSION, run_id=ins.run_id, round=ins.round, node=node,
                          model_version=ins.model_version, holder=self.holder[node], runtime="load-generator")
            if msg.metadata.message_type == SECURE or ins.HasField("secure"):
                self.secure(node, ins, reply)
            elif msg.metadata.message_type == "train":
                scalars = np.clip(self.rng.normal(0.0, self.clip, len(ins.seeds)), -self.clip, self.clip)
                reply.scalars = scalars.astype("<f4").tobytes()
            replies.append(Message(to_content(reply), reply_to=msg))
        self.generator_s += time.perf_counter() - start
        return replies


def _config(run_dir: Path, rounds: int, model: str, extra: dict[str, Any] | None = None):
    return load_config(None, {
        "model.name": model, "selection.mode": "prune", "selection.fraction": 0.01, "threads": 2,
        "data.train_size": 400, "eval.dev_size": 32, "federation.rounds": rounds, "federation.local_steps": 10,
        "federation.clients_per_round": 0, "eval.every": 0, "federation.sample_rate": 0.01,
        "privacy.noise_multiplier": 1.0, "privacy.epsilon": 8.0, "out_dir": str(run_dir),
        **(extra or {})})


def _median(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r["phase_s"].get(key, 0.0) for r in rows)


def bench_in_process(sizes: Iterable[int], rounds: int, model: str, secure: bool = False) -> list[dict[str, Any]]:
    outside_flower()
    replica = None
    out = []
    base = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    for m in sizes:
        tmp = base / "run"  # one run folder name for every M: the shared replica's config pins it
        shutil.rmtree(tmp, ignore_errors=True)
        # A ledger's genesis holds its creation second: a new ledger at this path within the second the last one
        # was created would be the same ledger to this machine's anchors, which refuse it as rolled back.
        time.sleep(1.0 - time.time() % 1.0)
        noise_epsilon.cache_clear()  # every M pays its own accounting (one PLD per round: M holders share it)
        config = _config(tmp, rounds + 1, model, {"federation.secure_aggregation": "secagg+", "federation.min_replies": 2,
                                                   "privacy.noise_multiplier": 0.0} if secure else None)
        replica = replica or Replica(config)
        grid = LoadGrid(m, config.privacy.clip)
        server = FederatedServer(config, grid, tmp, replica=replica)
        server.run_round(1)  # identifies every node (a challenge) and sends it the ledger from the start
        grid.generator_s = 0.0
        rows = [server.run_round(r) for r in range(2, rounds + 2)]
        assert all(r["accepted"] == m for r in rows), [r["rejected_by_kind"] for r in rows]
        phases = {k: _median(rows, k) for k in SERVER_PHASES}
        entry = {
            "replies": m, "seeds": config.federation.local_steps, "rounds_timed": len(rows),
            "entries_per_round": rows[-1]["entries"], "trainable_entries": replica.size,
            "phase_s": {k: round(v, 6) for k, v in phases.items()},
            "server_s": round(sum(phases.values()), 6),
            "generator_s": round(grid.generator_s / len(rows), 6),
            "bytes_down_total": rows[-1]["bytes_down_total"], "bytes_up_total": rows[-1]["bytes_up_total"],
            "bytes_up_per_node": rows[-1]["bytes_up_total"] // m, "bytes_down_per_node": rows[-1]["bytes_down_total"] // m,
            "secure_aggregation": secure,
        }
        server.ledger.verify()
        server.ledger.close()
        log.info("M=%d: %s", m, json.dumps(entry))
        out.append(entry)
    shutil.rmtree(base, ignore_errors=True)
    return out


def bench_flwr(nodes: int, rounds: int) -> dict[str, Any]:
    """A real ``flwr run`` simulation of the tiny encoder with every node instructed every round."""
    with tempfile.TemporaryDirectory(prefix="bench-scale-flwr-") as tmp:
        run_dir = Path(tmp) / "run"
        env = {**os.environ, "NODES": str(nodes), "RUN_DIR": str(run_dir), "FLWR_HOME": str(Path(tmp) / "flwr"),
               "SEEDTUNE_PRIVACY_LEDGER": str(Path(tmp) / "holders.sqlite"), "NUM_CPUS": "1",
               "SEEDTUNE_RECIPE": str(ROOT / "configs" / "federated_dpzo.toml")}  # one scalar per step, as measured before
        overrides = (f"model.name=\"tiny-encoder\" federation.rounds={rounds} federation.local_steps=10 "
                     f"federation.clients_per_round={nodes} data.train_size={20 * nodes} data.test_size=64 "
                     "eval.dev_size=64 eval.every=0 federation.sample_rate=0.25")  # noise calibrated
        start = time.perf_counter()
        proc = subprocess.run(["bash", "scripts/simulate.sh", overrides], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=3600)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"the flwr simulation failed:\n{proc.stderr[-3000:]}")
        summary = json.loads((run_dir / SUMMARY_FILE).read_text())
        rows = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
        rows = [r for r in rows if r["round"] >= 2]
        ledger = Ledger.open(run_dir / LEDGER_FILE)
        per_round = sorted({r["entries"] for r in ledger.rounds()})
        ledger.close()
    accepted = sorted({r["accepted"] for r in rows})
    if accepted != [nodes]:
        raise RuntimeError(f"the flwr simulation accepted {accepted} replies per round, not all {nodes} nodes'")
    return {
        "nodes": nodes, "rounds": summary["rounds"], "wall_s": round(wall, 1), "clients_agree": summary["clients_agree"],
        "client_digests": len(summary["client_digests"]), "entries_per_round": per_round,
        "accepted_per_round": accepted,
        "round_wall_s": round(statistics.median(r["wall_s"] for r in rows), 3),
        "server_s": round(statistics.median(sum(r["phase_s"].get(k, 0.0) for k in SERVER_PHASES) for r in rows), 4),
        "phase_s": {k: round(_median(rows, k), 4) for k in (*SERVER_PHASES, "transport")},
    }


def targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets: server time sublinear in M, aggregation <= 1 s at the largest M, replica apply
    independent of M (within a factor 1.5 of the smallest M's)."""
    small, large = rows[0], rows[-1]
    growth = large["server_s"] / small["server_s"]
    applies = [r["phase_s"]["apply"] for r in rows]
    return {
        "server_growth": round(growth, 2), "replies_growth": large["replies"] / small["replies"],
        "sublinear": growth < large["replies"] / small["replies"],
        "aggregate_s_at_max": large["phase_s"]["aggregate"], "aggregate_ok": large["phase_s"]["aggregate"] <= 1.0,
        "apply_s_range": [min(applies), max(applies)], "apply_independent_of_m": max(applies) <= 1.5 * min(applies),
        "entries_per_round": sorted({r["entries_per_round"] for r in rows}),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object (the default prints it indented)")
    ap.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="numbers of replies M")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per M (after the identifying round)")
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--flwr-nodes", type=int, default=100, help="nodes of the real flwr simulation (0: skip it)")
    ap.add_argument("--flwr-rounds", type=int, default=3)
    ap.add_argument("--secure", action="store_true", help="also run part 1 with federation.secure_aggregation = "
                                                          "\"secagg+\" (each generated node plays SecAgg+)")
    args = ap.parse_args(argv)
    if any(m < 1 for m in args.sizes) or args.rounds < 1:
        ap.error("--sizes and --rounds must be positive")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger(__name__).setLevel(logging.INFO)
    rows = bench_in_process(sorted(args.sizes), args.rounds, args.model)
    result = {"bench": "scale", "model": args.model, "in_process": rows, "targets": targets(rows)}
    if args.secure:
        result["in_process_secure"] = bench_in_process(sorted(args.sizes), args.rounds, args.model, secure=True)
    if args.flwr_nodes:
        result["flwr_simulation"] = bench_flwr(args.flwr_nodes, args.flwr_rounds)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
