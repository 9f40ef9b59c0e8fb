"""Soak run: hundreds of federated rounds with faulty and malicious clients and server crashes.

    python -m seedtune.simulations.soak --rounds 200 --clients 20 [--model tiny-encoder] [--json]

The real server loop and the real ClientApp handlers run over the in-process transport (simulations/
inprocess.py), with faults injected on the way back: honest clients drop out or straggle past the deadline,
crash after computing, and a fixed set of malicious clients send non-finite, out-of-range, in-range extreme
(poisoning), replayed, duplicated or garbage replies. The server process state is thrown away in the middle of
chosen rounds (after the instructions went out, before any reply was used) and a new server resumes from the
ledger; after each crash the ledger is verified. At the end the ledger is verified again and replayed in a
fresh process, whose model digest must equal the server's. Prints a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Error, Message, RecordDict

import seedtune.client.app as client_app
from seedtune.server.federation import FederatedServer
from seedtune.shared.protocol.ledger import Ledger
from seedtune.shared.protocol.run_folder import LEDGER_FILE, PRIVACY_LEDGER_FILE
from seedtune.shared.task.config import load_config
from seedtune.shared.protocol.proto import Reply
from seedtune.shared.protocol.wire import from_content, to_content
from seedtune.simulations.inprocess import InProcessGrid

log = logging.getLogger("soak")
MALICIOUS = ("non_finite", "huge", "extreme", "replay", "duplicate", "garbage")


class Crash(RuntimeError):
    """The server 'process' dies in the middle of a round."""


class FaultyGrid(InProcessGrid):
    def __init__(self, num_nodes: int, dropout: float, crash: float, crash_rounds: set[int], seed: int,
                 malicious: tuple[str, ...] = MALICIOUS, privacy_ledger: str = "") -> None:
        super().__init__(num_nodes, privacy_ledger=privacy_ledger)
        self.rng = random.Random(seed)  # public fault schedule, not privacy randomness
        self.dropout, self.crash = dropout, crash
        self.crash_rounds = set(crash_rounds)
        ids = self.get_node_ids()
        self.roles = dict(zip(ids[len(ids) - len(malicious):], malicious))
        self.last_reply: dict[int, Message] = {}
        self.injected: Counter[str] = Counter()
        self.bound = 1e6  # set by the soak loop from the server's scalar bound

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        rnd = int(messages[0].metadata.group_id) if messages else 0
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            is_train = msg.metadata.message_type == "train"
            role = self.roles.get(node, "honest") if is_train else "honest"
            if is_train and role == "honest" and self.rng.random() < self.dropout:
                self.injected["dropout_or_straggler"] += 1  # never answers before the deadline
                continue
            handler = client_app.handler_for(msg.metadata.message_type)
            reply = handler(msg, self.contexts[node])
            if is_train and role == "honest" and self.rng.random() < self.crash:
                self.injected["crash_after_compute"] += 1
                replies.append(Message(Error(code=1, reason="ClientApp crashed mid-step"), reply_to=msg))
                continue
            if role != "honest":
                self.injected[role] += 1
                replies.extend(self._attack(role, node, msg, reply))
            else:
                replies.append(reply)
        if rnd in self.crash_rounds:
            self.crash_rounds.discard(rnd)
            raise Crash(f"server killed in round {rnd} with {len(replies)} replies pending")
        return replies

    def _attack(self, role: str, node: int, msg: Message, reply: Message) -> list[Message]:
        honest = from_content(reply.content, Reply)
        k = len(honest.scalars) // 4
        if role == "replay":  # resend last round's (authentic) reply
            previous, self.last_reply[node] = self.last_reply.get(node), reply
            return [Message(previous.content, reply_to=msg)] if previous is not None else [reply]
        if role == "duplicate":
            return [reply, Message(reply.content, reply_to=msg)]
        if role == "garbage":
            return [Message(RecordDict({"seedtune": ConfigRecord({"payload": self.rng.randbytes(64)})}), reply_to=msg)]
        values = {"non_finite": [float("nan")] * k, "huge": [1e30] * k,
                  "extreme": [0.99 * self.bound * (-1) ** j for j in range(k)]}[role]
        honest.scalars = np.asarray(values, dtype="<f4").tobytes()
        return [Message(to_content(honest), reply_to=msg)]


def soak(rounds: int, clients: int, model: str, run_dir: Path, seed: int, dropout: float, crash: float,
         crash_rounds: set[int], lr: float = 1e-2, eval_every: int = 20, malicious: tuple[str, ...] = MALICIOUS,
         overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    start = time.time()
    config = load_config(None, {
        "model.name": model, "data.train_size": 100 * clients, "data.test_size": 256, "eval.dev_size": 256,
        "federation.rounds": rounds, "federation.local_steps": 2, "federation.sample_rate": 0.1,
        "federation.min_replies": 3, "eval.every": eval_every, "federation.aggregation": "trimmed_mean",
        "federation.trim": 0.2, "zo.lr": lr, "privacy.epsilon": 8.0, "privacy.clip": 5.0,
        "out_dir": str(run_dir), "threads": 1, **(overrides or {}),
    })
    # Fresh simulated data holders for every soak: their privacy ledger lives in the run folder.
    grid = FaultyGrid(clients, dropout, crash, crash_rounds, seed, malicious,
                      privacy_ledger=str(Path(run_dir) / PRIVACY_LEDGER_FILE))
    restarts, summary = [], None
    while summary is None:
        server = FederatedServer(config, grid, run_dir)
        grid.bound = server.bound
        try:
            summary = server.run()
        except Crash as exc:
            server.ledger.close()
            ledger = Ledger.open(run_dir / LEDGER_FILE)
            restarts.append({"crash": str(exc), "committed_rounds": ledger.last_round, "entries": ledger.verify()})
            ledger.close()
            log.warning("%s; ledger intact at round %d; restarting", exc, restarts[-1]["committed_rounds"])
    ledger = Ledger.open(run_dir / LEDGER_FILE)
    rows = [r for r in server.report.rows if r["round"] > 0]
    rejected: Counter[str] = Counter()
    for r in rows:
        rejected.update(r.get("rejected_by_kind", {}))
    replay = subprocess.run([sys.executable, "-m", "seedtune.cli", "replay", str(run_dir / LEDGER_FILE)],
                            capture_output=True, text=True, check=True)
    replayed = json.loads(replay.stdout.strip().splitlines()[-1])
    committed = [r["round"] for r in ledger.rounds()]
    return {
        "rounds": rounds, "clients": clients, "model": model, "malicious_roles": list(malicious),
        "injected": dict(grid.injected), "rejected_by_kind": dict(rejected),
        "instructed_replies": sum(r.get("nodes", 0) for r in rows),
        "accepted_replies": sum(r.get("accepted", 0) for r in rows),
        "rounds_below_min_replies": sum(1 for r in rows if r.get("nodes") and not r.get("entries")),
        "rounds_without_eligible_nodes": sum(1 for r in rows if not r.get("nodes")),
        "dev_accuracy_by_round": {r["round"]: r["dev_accuracy"] for r in server.report.rows if "dev_accuracy" in r},
        "server_crashes": restarts, "rounds_committed_once_in_order": committed == list(range(1, rounds + 1)),
        "ledger_entries": ledger.verify(), "ledger_verified": True,
        "replay_digest_matches": replayed["model_digest"] == summary["model_digest"],
        "clients_agree": summary["clients_agree"], "epsilon_max": summary["epsilon_max"],
        "dev_accuracy_first": summary["dev_accuracy_first"], "dev_accuracy_last": summary["dev_accuracy_last"],
        "zero_shot_test_accuracy": summary["zero_shot_test_accuracy"], "test_accuracy": summary["test_accuracy"],
        "wall_s": round(time.time() - start, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--model", default="tiny-encoder")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--run-dir", default=f"runs/soak-{time.strftime('%Y%m%d-%H%M%S')}")
    parser.add_argument("--seed", type=int, default=0, help="seed of the (public) fault schedule")
    parser.add_argument("--dropout", type=float, default=0.15, help="chance an honest reply misses the deadline")
    parser.add_argument("--crash", type=float, default=0.05, help="chance an honest client crashes after computing")
    parser.add_argument("--crash-rounds", type=int, nargs="*", default=None,
                        help="rounds in which the server is killed (default: 4 spread over the run)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    crash_rounds = set(args.crash_rounds) if args.crash_rounds is not None else \
        {max(1, int(args.rounds * f)) for f in (0.19, 0.41, 0.63, 0.86)}
    run_dir = Path(args.run_dir)
    if (run_dir / LEDGER_FILE).exists():
        parser.error(f"{run_dir} already holds a ledger; choose a new --run-dir")
    print(json.dumps(soak(args.rounds, args.clients, args.model, run_dir, args.seed, args.dropout, args.crash,
                          crash_rounds, args.lr, args.eval_every)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
