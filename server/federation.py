"""The federated DP-ZO server loop, over Flower's low-level Grid API.

Per round, as the protocol reads: learn the data-holder identity of any node not seen yet (a query), sample
one node per holder still within its privacy budget, draw the round's
seeds from the server's CSPRNG, send each node the ledger entries it lacks plus the seeds, validate the
replies, turn the accepted scalars into ledger entries (``coeff = -lr * scalar / replies`` per seed and
node: the mean update, replayable entry by entry), commit the round in one transaction, apply it to the
server's replica, account every instructed holder's steps, evaluate, and write the round's metrics.

Privacy is accounted per data holder, by the identity each node states (``Reply.holder``), never by Flower's
node id, which changes at every launch and key rotation. The ledger is the source of truth: a restarted
server replays it, recovers each holder's step count from the instructions it recorded before sending
(including rounds that never committed), and continues with the next round. The nodes keep their own
accounting on their own disks (client.privacy_ledger); the summary shows both.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from flwr.app import Message

from shared.accounting import noise_epsilon
from shared.config import ConfigError, RunConfig
from shared.proto import PROTOCOL_VERSION, Hyperparameters, Instruction, Reply
from shared.replica import Replica, config_json
from shared.tasks import load_split
from shared.noise import Noise, SecureRandom
from shared.noise_search import plan_noise
from shared.wire import PayloadTooLarge, WireError, from_content, to_content, wire_bytes
from shared.ledger import Ledger, LedgerError
from server.report import RunReport

log = logging.getLogger(__name__)

TRAIN, SYNC = "train", "query"
LEDGER_FILE = "ledger.sqlite"


class Rejected(ValueError):
    """A reply the server will not use; ``kind`` is the metrics counter it goes to."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class RoundPlan:
    round: int
    version: int  # ledger length the round's scalars must be computed at
    nodes: list[int]
    seeds: list[int]
    hyper: Hyperparameters


class FederatedServer:
    def __init__(self, config: RunConfig, grid: Any, run_dir: str | Path, replica: Replica | None = None) -> None:
        if config.zo.directions != 1:  # the wire carries one scalar per instructed seed
            raise ConfigError(f"zo.directions {config.zo.directions}: a federation runs one direction per step; "
                              "several directions per step are a seedtune train option")
        self.config = config
        self.grid = grid
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.replica = replica or Replica(config)
        self.rng = SecureRandom()
        self.sampler = random.SystemRandom()
        self.ledger = self._open_ledger()
        params = self.ledger.header.noise_params
        self.noise: Noise | None = Noise.from_json(params) if params else None  # as pinned in the header
        self.known_version: dict[int, int] = {}  # what each node holds, as far as the server knows
        self.holders: dict[int, str] = {}  # Flower node id -> the data holder it stated (learned by a query)
        self.steps: Counter[str] = Counter()  # private steps instructed per holder (conservative: sent = spent)
        self._resume()
        self.report = RunReport(self.run_dir)
        dev = load_split(config.data, "dev", config.eval.dev_size)
        self.dev = (self.replica.task.encode(dev.sentences), dev.labels)

    # -------------------------------------------------------------------------------------- setup
    def _open_ledger(self) -> Ledger:
        path = self.run_dir / LEDGER_FILE
        if path.exists():
            ledger = Ledger.open(path)
            if ledger.header.config_json != config_json(self.config):
                raise LedgerError(f"{path} was started with another configuration; resume with the same "
                                  f"settings or choose a new federation.run_dir")
            self.replica.attach(ledger.header)
            return ledger
        fed, privacy = self.config.federation, self.config.privacy
        noise = None
        if privacy.enabled:
            noise = plan_noise(privacy, fed.sample_rate, fed.rounds * fed.local_steps)
            log.info("noise %s for epsilon %.3g, delta %.1e over %d steps per node at rate %.4g",
                     noise.describe(), privacy.epsilon, privacy.delta, fed.rounds * fed.local_steps, fed.sample_rate)
        header = self.replica.make_header(noise)
        self.replica.attach(header)
        return Ledger.create(path, header)

    def _resume(self) -> None:
        n = len(self.ledger)
        if n:
            log.info("resuming from %s: %d committed rounds, %d entries; replaying", self.ledger.path,
                     self.ledger.last_round, n)
            self.ledger.verify()
            self.replica.apply(list(self.ledger.entries()), self.ledger.hash_at(n))
        self.steps.update(self.ledger.instructed_steps())

    # ------------------------------------------------------------------------------------ accounting
    def epsilon(self, holder: str, extra_steps: int = 0) -> float | None:
        """The holder's epsilon at the federation's delta; None without privacy (no guarantee at all)."""
        steps = self.steps[holder] + extra_steps
        if not self.config.privacy.enabled:
            return None
        return noise_epsilon(((self.noise, self.config.federation.sample_rate, steps),), self.config.privacy.delta)

    def eligible(self, nodes: Iterable[int]) -> list[int]:
        """One node per identified holder (the lowest id if several claim it), if the holder's budget allows
        another round."""
        k = self.config.federation.local_steps
        first: dict[str, int] = {}
        for n in sorted(nodes):
            if n in self.holders:
                first.setdefault(self.holders[n], n)
        if self.config.privacy.enabled:
            first = {h: n for h, n in first.items() if self.epsilon(h, k) <= self.config.privacy.epsilon}
        return sorted(first.values())

    def identify(self, nodes: Iterable[int], rnd: int) -> None:
        """Ask the nodes the server has not heard from which data holder they serve (a query that also brings
        them up to date). A node that does not answer is not instructed: its spending could not be keyed."""
        unknown = sorted(set(nodes) - set(self.holders))
        if not unknown:
            return
        plan = RoundPlan(rnd, len(self.ledger), unknown, [], None)
        for node, reply in self._query(plan).items():
            if reply.holder:
                self.holders[node] = reply.holder
        missing = [n for n in unknown if n not in self.holders]
        if missing:
            log.warning("round %d: %d node(s) stated no data holder; not instructed: %s", rnd, len(missing),
                        missing)

    # ------------------------------------------------------------------------------------- one round
    def plan(self, rnd: int) -> RoundPlan:
        fed, privacy = self.config.federation, self.config.privacy
        live = self.grid.get_node_ids()
        self.identify(live, rnd)
        nodes = self.eligible(live)
        if fed.clients_per_round and len(nodes) > fed.clients_per_round:
            nodes = sorted(self.sampler.sample(nodes, fed.clients_per_round))
        noise = self.noise
        hyper = Hyperparameters(lr=self.config.zo.lr, mu=self.config.zo.mu, clip=privacy.clip,
                                noise_multiplier=noise.sigma if noise else 0.0, sample_rate=fed.sample_rate,
                                private=privacy.enabled, noise=noise.to_json() if noise else "")
        return RoundPlan(rnd, len(self.ledger), nodes, [self.rng.seed64() for _ in range(fed.local_steps)], hyper)

    def instruction(self, node: int, plan: RoundPlan, seeds: list[int], hyper: Hyperparameters | None) -> Instruction:
        start = min(self.known_version.get(node, 0), plan.version)
        ins = Instruction(protocol_version=PROTOCOL_VERSION, run_id=self.grid.run.run_id, round=plan.round,
                          model_version=plan.version, header_digest=self.ledger.genesis.hex(),
                          tail=self.ledger.tail(start), seeds=seeds)
        if hyper is not None:
            ins.hyper.CopyFrom(hyper)
        if start == 0:
            ins.header.CopyFrom(self.ledger.header)
        return ins

    def _send(self, plan: RoundPlan, message_type: str, train: bool) -> tuple[list[Any], dict[int, int]]:
        messages, down = [], {}
        for node in plan.nodes:
            ins = self.instruction(node, plan, plan.seeds if train else [], plan.hyper if train else None)
            msg = Message(to_content(ins), dst_node_id=node, message_type=message_type, group_id=str(plan.round))
            down[node] = wire_bytes(msg)
            messages.append(msg)
        replies = list(self.grid.send_and_receive(messages, timeout=self.config.federation.round_timeout_s))
        return replies, down

    def validate(self, msg: Any, plan: RoundPlan, accepted: dict[int, np.ndarray]) -> tuple[Reply, np.ndarray]:
        """The reply and its scalars, or :class:`Rejected` naming what is wrong with it."""
        src = msg.metadata.src_node_id
        if src not in plan.nodes:
            raise Rejected("unknown_node", f"reply from node {src}, which was not sent this round's instruction")
        if msg.has_error():
            raise Rejected("client_error", f"node {src} failed: {msg.error.reason}")
        try:
            reply = from_content(msg.content, Reply, max_bytes=self.max_reply_bytes(plan))
        except WireError as exc:
            raise Rejected("oversized" if isinstance(exc, PayloadTooLarge) else "malformed",
                           f"node {src}: {exc}") from exc
        if reply.refusal:
            self.known_version[src] = 0  # resend from the start with the header; the node skips what it has
            raise Rejected("refused", f"node {src} refused: {reply.refusal}")
        if reply.protocol_version != PROTOCOL_VERSION or reply.run_id != self.grid.run.run_id \
                or reply.round != plan.round or reply.node != src:
            raise Rejected("wrong_round", f"node {src}: reply for protocol {reply.protocol_version}, run "
                           f"{reply.run_id}, round {reply.round}, node {reply.node}; expected round {plan.round}")
        if reply.holder != self.holders.get(src):
            raise Rejected("wrong_holder", f"node {src}: reply for holder {reply.holder!r}, the node stated "
                           f"{self.holders.get(src)!r}")
        if src in accepted:
            raise Rejected("duplicate", f"node {src}: a second reply for round {plan.round}")
        if reply.model_version != plan.version:
            raise Rejected("wrong_version", f"node {src}: computed at version {reply.model_version}, "
                           f"the round is at {plan.version}")
        if len(reply.scalars) != 4 * len(plan.seeds):
            raise Rejected("wrong_count", f"node {src}: {len(reply.scalars)} bytes of scalars for "
                           f"{len(plan.seeds)} seeds (4 bytes each)")
        scalars = np.frombuffer(reply.scalars, dtype="<f4").astype(np.float64)
        if not np.all(np.isfinite(scalars)):
            raise Rejected("non_finite", f"node {src}: non-finite scalars {scalars.tolist()}")
        bound = self.scalar_bound()
        if np.any(np.abs(scalars) > bound):
            raise Rejected("out_of_range", f"node {src}: |scalar| up to {np.abs(scalars).max():.4g} > {bound:.4g}")
        self.known_version[src] = plan.version
        return reply, scalars

    @staticmethod
    def max_reply_bytes(plan: RoundPlan) -> int:
        """A reply is 4 bytes per seed plus a small envelope; anything much larger is refused unparsed."""
        return 4 * len(plan.seeds) + 16 * 1024

    def scalar_bound(self) -> float:
        """Largest |scalar| an honest client sends: a clipped mean (at most C, a little more when the Poisson
        batch is larger than expected) plus noise, loosely bounded at 20 standard deviations."""
        privacy, noise = self.config.privacy, self.noise
        return privacy.clip * (4.0 + 20.0 * noise.std) if noise is not None else 1e6

    def aggregate(self, plan: RoundPlan, accepted: dict[int, np.ndarray]) -> list[tuple[int, float, int]]:
        """Ledger entries for the round: per seed, weights over the nodes' scalars that sum to one.

        ``mean`` weighs every reply 1/M. The robust rules keep the ledger replayable entry by entry by
        giving weight only to the scalars they keep: ``trimmed_mean`` drops the floor(trim M) smallest and
        largest scalars of each seed, ``median`` keeps the middle one (or the middle two at 1/2 each)."""
        nodes = sorted(accepted)
        fed = self.config.federation
        entries = []
        for k, seed in enumerate(plan.seeds):
            values = np.array([accepted[n][k] for n in nodes])
            order = np.argsort(values, kind="stable")
            m = len(nodes)
            if fed.aggregation == "median":
                keep = order[(m - 1) // 2: m // 2 + 1]
            elif fed.aggregation == "trimmed_mean":
                t = int(fed.trim * m)
                keep = order[t: m - t]
            else:
                keep = order
            for i in sorted(keep.tolist()):
                entries.append((seed, -plan.hyper.lr * values[i] / len(keep), nodes[i]))
        return entries

    def run_round(self, rnd: int) -> dict[str, Any]:
        start = time.time()
        plan = self.plan(rnd)
        if not plan.nodes:
            log.warning("round %d: no node is within its privacy budget; committing an empty round", rnd)
            replies, down = [], {}
        else:
            holders = [self.holders[n] for n in plan.nodes]
            self.ledger.record_instructions(rnd, holders, len(plan.seeds))
            for holder in holders:
                self.steps[holder] += len(plan.seeds)
            replies, down = self._send(plan, TRAIN, train=True)
        accepted: dict[int, np.ndarray] = {}
        rejected: Counter[str] = Counter()
        up = {}
        for msg in replies:
            up[msg.metadata.src_node_id] = wire_bytes(msg)
            try:
                _, accepted[msg.metadata.src_node_id] = self.validate(msg, plan, accepted)
            except Rejected as exc:
                rejected[exc.kind] += 1
                log.warning("round %d: rejected (%s) %s", rnd, exc.kind, exc)
        min_replies = self.config.federation.min_replies
        if len(accepted) < min_replies:
            log.warning("round %d: %d valid replies < min_replies %d; committing no update", rnd, len(accepted),
                        min_replies)
            accepted = {}
        updates = self.aggregate(plan, accepted)
        entries = self.ledger.commit_round(rnd, updates, {
            "instructed": [str(n) for n in plan.nodes], "accepted": [str(n) for n in sorted(accepted)],
            "rejected": dict(rejected), "seeds": len(plan.seeds)})
        self.replica.apply(entries, self.ledger.hash_at(len(self.ledger)))
        row = {
            "round": rnd, "nodes": len(plan.nodes), "replies": len(replies), "accepted": len(accepted),
            "rejected": sum(rejected.values()), "rejected_by_kind": dict(rejected), "entries": len(entries),
            "ledger_entries": len(self.ledger),
            "bytes_up_max": max(up.values(), default=0), "bytes_up_per_step": (
                max(up.values()) / len(plan.seeds) if up else None),
            "bytes_down_max": max(down.values(), default=0), "bytes_down_total": sum(down.values()),
            "bytes_up": {str(n): b for n, b in up.items()}, "bytes_down": {str(n): b for n, b in down.items()},
            "epsilon": {h: self.epsilon(h) for h in sorted(self.steps)},
        }
        row["epsilon_max"] = max((e for e in row["epsilon"].values() if e is not None), default=None)
        every = self.config.federation.eval_every
        if every and rnd % every == 0:
            row["dev_accuracy"] = self.evaluate()
        row["wall_s"] = round(time.time() - start, 3)
        log.info("round %d: %d/%d replies accepted, %d entries, dev accuracy %s, max epsilon %s", rnd,
                 len(accepted), len(plan.nodes), len(entries), row.get("dev_accuracy"), row["epsilon_max"])
        self.report.add(row)
        return row

    def evaluate(self) -> float:
        ids, labels = self.dev
        return self.replica.task.accuracy(ids, labels, self.config.model.microbatch) if len(ids) else math.nan

    def test_accuracy(self) -> float:
        cfg = self.config
        test = load_split(cfg.data, "test")
        return self.replica.task.accuracy(self.replica.task.encode(test.sentences), test.labels, cfg.model.microbatch)

    # ------------------------------------------------------------------------------------------- run
    def _query(self, plan: RoundPlan) -> dict[int, Reply]:
        """Send the plan's nodes a query (catch up, no training); their valid, non-refusing replies by node."""
        replies, _ = self._send(plan, SYNC, train=False)
        out = {}
        for msg in replies:
            src = msg.metadata.src_node_id
            try:
                reply = from_content(msg.content, Reply) if not msg.has_error() else None
            except WireError:
                reply = None
            if reply is not None and not reply.refusal and reply.node == src and reply.model_version == plan.version:
                out[src] = reply
                self.known_version[src] = plan.version
        return out

    def sync(self) -> dict[int, Reply]:
        """Send every node the final tail; their replies carry their replicas' state digests, runtimes and the
        epsilon each holder's own ledger recorded."""
        plan = RoundPlan(self.ledger.last_round + 1, len(self.ledger), sorted(self.grid.get_node_ids()), [], None)
        return self._query(plan)

    def run(self) -> dict[str, Any]:
        start = time.time()
        fed = self.config.federation
        first = self.ledger.last_round + 1
        if first == 1:  # the base model's accuracy, before any private step
            self.report.add({"round": 0, "dev_accuracy": self.evaluate(), "test_accuracy": self.test_accuracy(),
                             "ledger_entries": 0})
        for rnd in range(first, fed.rounds + 1):
            self.run_round(rnd)
        server_digest = self.replica.state_digest()
        synced = self.sync()
        client_digests = {str(n): r.model_digest for n, r in synced.items()}
        client_runtimes = {str(n): r.runtime or "torch" for n, r in synced.items()}
        # What each holder's own privacy ledger recorded (over every run on that data), next to this server's.
        holder_epsilon = {r.holder: r.metrics["epsilon"] for r in synced.values() if "epsilon" in r.metrics}
        server_epsilon = {h: self.epsilon(h) for h in sorted(self.steps)}
        test_accuracy = self.test_accuracy()
        rows = self.report.rows
        summary = {
            "model": self.replica.task.name, "task": self.config.data.task, "rounds": self.ledger.last_round,
            "resumed_from_round": first - 1, "ledger_entries": len(self.ledger),
            "noise": self.noise.describe() if self.noise else None,
            "noise_std": self.noise.std if self.noise else 0.0,
            "epsilon_max": max((r["epsilon_max"] for r in rows if r.get("epsilon_max") is not None), default=None),
            "epsilon_holders": holder_epsilon,
            "epsilon_agree": all(abs(holder_epsilon.get(h, math.inf) - e) <= 1e-6 * max(1.0, e)
                                 for h, e in server_epsilon.items() if e is not None),
            "delta": self.config.privacy.delta if self.config.privacy.enabled else None,
            "dev_accuracy_first": next((r["dev_accuracy"] for r in rows if "dev_accuracy" in r), None),
            "dev_accuracy_last": next((r["dev_accuracy"] for r in reversed(rows) if "dev_accuracy" in r), None),
            "zero_shot_test_accuracy": next((r.get("test_accuracy") for r in rows if r["round"] == 0), None),
            "test_accuracy": test_accuracy, "model_digest": self.replica.digest(), "state_digest": server_digest,
            "client_digests": client_digests, "client_runtimes": client_runtimes,
            # Every live node answered the final sync, and every answer matches: a silent or refusing node is
            # not agreement.
            "clients_agree": bool(client_digests) and len(client_digests) == len(self.grid.get_node_ids())
                             and all(d == server_digest for d in client_digests.values()),
            "ledger": str(self.ledger.path), "wall_s": round(time.time() - start, 2),
        }
        self.report.finish(summary)
        log.info("federated run done: %s", json.dumps(summary))
        return summary
