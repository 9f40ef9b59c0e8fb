"""The federated DP-ZO server loop, over Flower's low-level Grid API.

A round reads like the protocol (:meth:`FederatedServer.run_round`):

1. **configure**: learn the data-holder identity of any node not seen yet (a signed answer to a challenge,
   checked against the pinned keys when the run pins its nodes: a node that fails is sent nothing of the
   ledger), sample one node per holder still within its privacy budget, draw the round's seeds from the server's CSPRNG, durably record
   the instructed holders, and build each distinct instruction once (every node at the same ledger position
   gets the same bytes);
2. **send** them and collect the replies;
3. **validate** each reply (:func:`server.round.validate`, pure: a named rejection or the scalars; in a
   pinned federation the reply must carry its node's signature);
4. **aggregate** the accepted scalars per seed under the round's rule (:mod:`shared.aggregation`, pure): K
   coefficients, whatever the number of replies;
5. **commit** the K entries and every reply's provenance in one transaction, and apply the K entries to the
   server's replica;
6. **evaluate** on the public dev split and write the round's metrics.

After the last round every node is synced (its state digest checked against the server's) and, with
``federation.node_evaluation``, asked to evaluate the final model on its own held-out data (Flower's evaluate
message): it releases noised per-label counts, accounted in its holder's privacy ledger, which the server sums.

Privacy is accounted per data holder (:mod:`server.holders`). The ledger is the source of truth: a restarted
server replays it, recovers each holder's step count from the instructions it recorded before sending
(including rounds that never committed), and continues with the next round.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from flwr.app import Message

from seedtune.shared.accounting import PrivacyAccountant, StepRun
from seedtune.shared.aggregation import ACCEPTED, RoundRule, update_scale
from seedtune.shared.config import ConfigError, RunConfig, directions_per_step, flatten
from seedtune.shared.directions import step_seeds
from seedtune.shared.identity import NONCE_BYTES, AllowedNodes, IdentityError, SigningKey, position_bytes
from seedtune.shared.ledger import Anchor, Ledger, LedgerError, Provenance
from seedtune.shared.proto import PROTOCOL_VERSION, REFUSAL_HISTORY, Challenge, Hyperparameters, Instruction, Reply
from seedtune.shared.replica import Replica, config_json
from seedtune.shared.run_folder import (LEDGER_FILE, METRICS_FILE, anchors_of, check_anchor_home,
                                        write_home_anchor)
from seedtune.shared.tasks import counts_metrics, load_split, with_labels
from seedtune.shared.tracking import check_backend, open_tracker
from seedtune.shared.noise import Noise, SecureRandom
from seedtune.shared.noise_search import COUNT_SENSITIVITY, count_noise, plan_noise
from seedtune.shared.wire import WireError, content_of, from_content, payload_length, wire_bytes
from seedtune.server.holders import Holders
from seedtune.server.report import RunReport
from seedtune.server.round import REFUSED_HISTORY, Rejected, RoundPlan, scalar_bound, signed, validate

log = logging.getLogger(__name__)

TRAIN, SYNC, IDENTIFY, EVALUATE = "train", "query", "query.identify", "evaluate"


class FederationHalted(RuntimeError):
    """Every node that answered refuses this server's ledger itself (Reply.refusal_code "history": unsigned by
    the key they pin, behind, forked, or another header): it stops, writing no round and no summary, rather
    than run on a ledger nobody follows."""


BELOW_MIN_REPLIES = "below_min_replies"  # provenance status of valid replies in a round with too few of them


class FederatedServer:
    def __init__(self, config: RunConfig, grid: Any, run_dir: str | Path, replica: Replica | None = None) -> None:
        # Every input is loaded and checked before anything is written: a bad data folder leaves no run folder.
        # The labels, when the config leaves them to the data, come from the server's public test split.
        check_backend(config.tracking)
        config = with_labels(config, "test")
        self.config = config
        self.grid = grid
        self.pins = self._load_pins(config.federation.allowed_nodes)
        self.key = self._load_key(config.federation.server_key)
        dev = load_split(config, "dev", config.eval.dev_size)
        test = load_split(config, "test")
        self.replica = replica or Replica(config)
        # the periodic dev evaluation (public-split monitoring) is a classifier's accuracy
        self.dev = (self.replica.task.encode(dev.records), dev.labels) if not self.replica.task.generation \
            else ([], dev.labels[:0])
        self.test = self.replica.task.eval_set(test)
        check_anchor_home()
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.rng = SecureRandom()
        self.sampler = random.SystemRandom()
        self.report = RunReport(self.run_dir)
        anchor = self.report.anchor()  # the ledger head this run folder recorded, outside the ledger file
        if anchor is not None and not (self.run_dir / LEDGER_FILE).exists():
            raise LedgerError(f"{self.run_dir / LEDGER_FILE} is missing, but {anchor.source} records round "
                              f"{anchor.round} of it: restore the ledger, or choose a new run folder (out_dir)")
        self.ledger = Ledger.open_or_create(self.run_dir / LEDGER_FILE, self._new_header,
                                            config_json=config_json(config),
                                            base_model_digest=self.replica.base_digest,
                                            trainable_digest=self.replica.trainable_digest,
                                            allowed_nodes=self.pins.digest if self.pins else "")
        self.replica.attach(self.ledger.header)
        params = self.ledger.header.noise_params
        self.noise: Noise | None = Noise.from_json(params) if params else None  # as pinned in the header
        # K directions per local step (a Hadamard head frame: the power of two covering the head); the wire
        # carries one scalar per instructed seed, K seeds per step
        self.directions = directions_per_step(config.zo.directions, self.replica.selection.size)
        self.rule = RoundRule(config.federation.aggregation, update_scale(config.zo.lr, self.directions),
                              config.federation.trim)
        self.bound = scalar_bound(config.privacy.clip, self.noise)
        self.known_version: dict[int, int] = {}  # what each node holds, as far as the server knows
        self.holders = Holders(config.privacy, config.federation.sample_rate, self.noise)
        self._resume(anchor)

    # -------------------------------------------------------------------------------------- setup
    @staticmethod
    def _load_pins(path: str) -> AllowedNodes | None:
        if not path:
            return None
        try:
            pins = AllowedNodes.load(path)
        except IdentityError as exc:
            raise ConfigError(str(exc)) from exc
        log.info("pinned nodes: %d holders from %s (digest %s)", len(pins.keys), path, pins.digest[:16])
        return pins

    @staticmethod
    def _load_key(path: str) -> SigningKey | None:
        if not path:
            return None
        try:
            key = SigningKey.load(path, "federation.server_key")
        except IdentityError as exc:
            raise ConfigError(str(exc)) from exc
        log.info("signing ledger positions with %s (%s)", path, key.public)
        return key

    def sign(self, version: int, head: bytes) -> bytes:
        """The server's signature over this ledger at ``version`` with chain hash ``head`` (b"": unsigned)."""
        return self.key.sign(position_bytes(self.ledger.genesis.hex(), version, head)) if self.key else b""

    def _new_header(self):
        """The header of a new ledger: calibrates the noise for the whole run (only when no ledger exists)."""
        fed, privacy = self.config.federation, self.config.privacy
        noise = None
        if privacy.enabled:
            noise = plan_noise(privacy, fed.sample_rate, fed.rounds * fed.local_steps, nodes_stop_at_budget=True)
            log.info("noise %s for epsilon %.3g, delta %.1e over %d steps per node at rate %.4g",
                     noise.describe(), privacy.epsilon, privacy.delta, fed.rounds * fed.local_steps, fed.sample_rate)
        header = self.replica.make_header(noise)
        header.allowed_nodes = self.pins.digest if self.pins else ""
        return header

    def _resume(self, anchor: Anchor | None) -> None:
        n = len(self.ledger)
        anchors = anchors_of(self.ledger.path, self.ledger.genesis, anchor)  # the run folder's, and outside it
        if not anchors and self.ledger.last_round:
            raise LedgerError(f"{self.ledger.path} holds {self.ledger.last_round} rounds, but {self.report.path} "
                              f"anchors none of them (deleted or emptied?) and this machine keeps none outside the "
                              f"run folder: a ledger that lost rounds cannot be told from a whole one, and its "
                              f"holders would be instructed again for them. Restore {METRICS_FILE}, or start a new "
                              f"run folder (out_dir)")
        if n or anchors:
            log.info("resuming from %s: %d committed rounds, %d entries; replaying", self.ledger.path,
                     self.ledger.last_round, n)
            self.ledger.verify(anchors)  # a ledger behind or beside any of its anchors is refused
            if self.key is not None:  # a ledger rewritten by anyone without the key is refused
                self.ledger.check_signatures(self.key.public, f"federation.server_key {self.key.path!r}")
            self.replica.apply(list(self.ledger.entries()), self.ledger.hash_at(n))
        for holder, steps in self.ledger.instructed_steps().items():
            self.holders.record(holder, steps)

    def identify(self, nodes: Iterable[int], rnd: int) -> None:
        """Ask the nodes the server has not identified which data holder they serve, with a challenge that
        carries nothing of the ledger. A node that does not answer is not instructed (its spending could not be
        keyed) and is asked again next round; one the pinned list refuses is never asked again."""
        unknown = self.holders.unknown(nodes)
        if not unknown:
            return
        challenge = Challenge(protocol_version=PROTOCOL_VERSION, run_id=self.grid.run.run_id,
                              header_digest=self.ledger.genesis.hex(), nonce=os.urandom(NONCE_BYTES))
        payload = challenge.SerializeToString(deterministic=True)
        messages = [Message(content_of(payload), dst_node_id=n, message_type=IDENTIFY, group_id=str(rnd))
                    for n in unknown]
        for msg in self.grid.send_and_receive(messages, timeout=self.config.federation.round_timeout_s):
            self.holders.learn(msg, challenge, unknown, self.pins, rnd)
        missing = [n for n in unknown if n not in self.holders.of]
        if missing:
            log.warning("round %d: %d node(s) not identified; not instructed: %s", rnd, len(missing), missing)

    # ------------------------------------------------------------------------------------- one round
    def configure(self, rnd: int) -> RoundPlan:
        """Eligibility (one node per holder within budget, sampled), the round's seeds and hyperparameters;
        the instructed holders' steps are durably recorded before anything is sent."""
        fed, privacy = self.config.federation, self.config.privacy
        live = self.grid.get_node_ids()
        self.identify(live, rnd)
        nodes = self.holders.eligible(live, fed.local_steps)
        if fed.clients_per_round and len(nodes) > fed.clients_per_round:
            nodes = sorted(self.sampler.sample(nodes, fed.clients_per_round))
        hyper = Hyperparameters(lr=self.config.zo.lr, mu=self.config.zo.mu, clip=privacy.clip,
                                sample_rate=fed.sample_rate, private=privacy.enabled,
                                noise=self.noise.to_json() if self.noise else "")
        draws = iter(self.rng.seed64, None)
        seeds = [seed for _ in range(fed.local_steps) for seed in step_seeds(self.config.zo.direction, draws,
                                                                             self.directions)]
        plan = RoundPlan(rnd, len(self.ledger), nodes, seeds, hyper)
        if nodes:  # steps, not seeds: a step of K directions is one privacy event
            holders = [self.holders.of[n] for n in nodes]
            self.ledger.record_instructions(rnd, holders, fed.local_steps)
            for holder in holders:
                self.holders.record(holder, fed.local_steps)
        return plan

    def instruction(self, plan: RoundPlan, start: int) -> Instruction:
        """What every node at ledger position ``start`` gets this round: nothing in it names the node."""
        ins = Instruction(protocol_version=PROTOCOL_VERSION, run_id=self.grid.run.run_id, round=plan.round,
                          model_version=plan.version, header_digest=self.ledger.genesis.hex(),
                          tail=self.ledger.tail(start), seeds=plan.seeds)
        if plan.hyper is not None:
            ins.hyper.CopyFrom(plan.hyper)
        if start == 0:
            ins.header.CopyFrom(self.ledger.header)
        ins.server_signature = self.sign(plan.version, ins.tail.head_hash)
        return ins

    def send(self, plan: RoundPlan, message_type: str = "") -> tuple[list[Any], dict[int, int], dict[str, float]]:
        """Send the plan's instructions; returns the replies, the downlink bytes per node, and the time spent
        building instructions (``tail``) and waiting for replies (``transport``).

        Each distinct ledger position's instruction is serialized and measured once, and its bytes are shared
        by every node at that position: the cost grows with the number of distinct positions, not of nodes."""
        t0 = time.perf_counter()
        payloads: dict[int, bytes] = {}  # ledger position -> the serialized instruction
        sizes: dict[int, int] = {}  # ledger position -> its wire bytes (messages differ only in their ids)
        messages, down = [], {}
        message_type = message_type or (TRAIN if plan.hyper is not None else SYNC)
        for node in plan.nodes:
            start = min(self.known_version.get(node, 0), plan.version)
            if start not in payloads:
                payloads[start] = self.instruction(plan, start).SerializeToString(deterministic=True)
            msg = Message(content_of(payloads[start]), dst_node_id=node, message_type=message_type,
                          group_id=str(plan.round))
            if start not in sizes:
                sizes[start] = wire_bytes(msg)
            down[node] = sizes[start]
            messages.append(msg)
        t1 = time.perf_counter()
        replies = list(self.grid.send_and_receive(messages, timeout=self.config.federation.round_timeout_s))
        return replies, down, {"tail": t1 - t0, "transport": time.perf_counter() - t1}

    def judge(self, plan: RoundPlan, replies: list[Any]) -> tuple[list[Provenance], Counter[str], dict[int, int]]:
        """Validate every reply: its provenance row (accepted, or the rejection kind), the rejections by kind,
        and the uplink bytes per node."""
        provenance, rejected, up = [], Counter(), {}
        accepted: set[int] = set()
        run_id = self.grid.run.run_id
        sizes: dict[int, int] = {}  # payload length -> wire bytes, measured on the first reply of that length
        for msg in replies:
            src = msg.metadata.src_node_id
            length = payload_length(msg)
            if length > plan.max_reply_bytes or (length < 0 and not msg.has_error()):
                up[src] = max(length, 0)  # refused below by its length or shape: never deflated
            else:
                if length not in sizes:  # replies of one payload length differ only in their ids
                    sizes[length] = wire_bytes(msg)
                up[src] = sizes[length]
            holder = self.holders.of.get(src)
            try:
                _, scalars = validate(msg, plan, run_id, holder, accepted, self.bound, self.pins)
            except Rejected as exc:
                rejected[exc.kind] += 1
                log.warning("round %d: rejected (%s) %s", plan.round, exc.kind, exc)
                if exc.kind in ("refused", REFUSED_HISTORY):
                    self.known_version[src] = 0  # resend from the start with the header; the node skips what it has
                provenance.append(Provenance(src, holder or "", exc.kind))
                continue
            accepted.add(src)
            self.known_version[src] = plan.version
            provenance.append(Provenance(src, holder, ACCEPTED, scalars.tobytes()))
        min_replies = self.config.federation.min_replies
        if 0 < len(accepted) < min_replies:
            log.warning("round %d: %d valid replies < min_replies %d; committing no update", plan.round,
                        len(accepted), min_replies)
            provenance = [Provenance(p.node, p.holder, BELOW_MIN_REPLIES, p.scalars) if p.status == ACCEPTED else p
                          for p in provenance]
        return provenance, rejected, up

    def aggregate(self, plan: RoundPlan, provenance: list[Provenance]) -> np.ndarray:
        """The round's K coefficients: the rule over the accepted scalars, per seed (none if nothing accepted)."""
        accepted = [p.values() for p in provenance if p.status == ACCEPTED]
        if not accepted:
            return np.zeros(0, dtype=np.float32)
        return self.rule.coefficients(np.stack(accepted))

    def commit(self, plan: RoundPlan, coeffs: np.ndarray, provenance: list[Provenance],
               metrics: dict[str, Any]) -> list:
        """The round's entries and provenance in one ledger transaction (the ledger checks the coefficients
        follow from the accepted scalars and refuses the round, unwritten, if they do not)."""
        return self.ledger.commit_round(plan.round, plan.seeds, coeffs, provenance, self.rule, metrics,
                                        self.key.sign if self.key else None)

    def run_round(self, rnd: int) -> dict[str, Any]:
        start = time.time()
        phase: dict[str, float] = {}

        def timed(name: str, t0: float) -> float:
            now = time.perf_counter()
            phase[name] = round(now - t0, 6)
            return now

        t = time.perf_counter()
        plan = self.configure(rnd)
        t = timed("configure", t)
        if not plan.nodes:
            log.warning("round %d: no node is within its privacy budget; committing an empty round", rnd)
            replies, down = [], {}
        else:
            replies, down, sent = self.send(plan)
            phase.update({k: round(v, 6) for k, v in sent.items()})
        t = time.perf_counter()
        provenance, rejected, up = self.judge(plan, replies)
        if replies and rejected[REFUSED_HISTORY] == len(replies):
            raise FederationHalted(f"round {rnd}: every node that answered ({len(replies)}) refused this server's "
                                   f"ledger {self.ledger.path} itself: not signed by the server key they pin, or "
                                   f"behind, forked from or another header than the history they followed (a "
                                   f"restored copy, a lost WAL, a rewrite, or the wrong federation.server_key); "
                                   f"stopping with nothing committed. Restore the ledger they followed, or start a "
                                   f"new federation their operators accept")
        t = timed("validate", t)
        coeffs = self.aggregate(plan, provenance)
        t = timed("aggregate", t)
        accepted = sum(p.status == ACCEPTED for p in provenance)
        entries = self.commit(plan, coeffs, provenance, {"instructed": len(plan.nodes), "accepted": accepted,
                                                         "rejected": dict(rejected), "seeds": len(plan.seeds)})
        t = timed("commit", t)
        self.replica.apply(entries, self.ledger.hash_at(len(self.ledger)))
        record = self.ledger.record_at(rnd)
        write_home_anchor(self.ledger.path, self.ledger.genesis, rnd, record)  # the metrics row is the other
        t = timed("apply", t)
        row = {
            "round": rnd, "nodes": len(plan.nodes), "replies": len(replies), "accepted": accepted,
            "rejected": sum(rejected.values()), "rejected_by_kind": dict(rejected), "entries": len(entries),
            "ledger_entries": len(self.ledger), "ledger_record": record.hex(),
            "bytes_up_max": max(up.values(), default=0), "bytes_up_total": sum(up.values()),
            "bytes_up_per_step": max(up.values()) / self.config.federation.local_steps if up else None,
            "bytes_down_max": max(down.values(), default=0), "bytes_down_total": sum(down.values()),
            "epsilon": self.holders.epsilons(),
        }
        row["epsilon_max"] = max((e for e in row["epsilon"].values() if e is not None), default=None)
        every = self.config.eval.every
        if every and rnd % every == 0:
            row["dev_accuracy"] = self.evaluate()
        timed("evaluate", t)
        row["phase_s"] = phase
        row["wall_s"] = round(time.time() - start, 3)
        log.info("round %d: %d/%d replies accepted, %d entries, dev accuracy %s, max epsilon %s", rnd,
                 accepted, len(plan.nodes), len(entries), row.get("dev_accuracy"), row["epsilon_max"])
        self.report.add(row)
        return row

    def evaluate(self) -> float:
        ids, labels = self.dev
        return self.replica.task.accuracy(ids, labels, self.config.model.microbatch) if len(ids) else math.nan

    def test_metrics(self) -> dict:
        return self.replica.task.evaluate(self.test, self.config.model.microbatch)

    # ------------------------------------------------------------------------------------------- run
    def _query(self, plan: RoundPlan, message_type: str = SYNC) -> tuple[dict[int, Reply], int]:
        """Send the plan's nodes a query or an evaluate message (catch up, no training); their valid,
        non-refusing replies by node, and how many replies refused this server's ledger itself."""
        replies, _, _ = self.send(plan, message_type)
        history = 0  # replies refusing this server's ledger itself (Reply.refusal_code "history")
        out = {}
        for msg in replies:
            src = msg.metadata.src_node_id
            try:
                reply = from_content(msg.content, Reply) if not msg.has_error() else None
            except WireError:
                reply = None
            if reply is not None and reply.refusal:
                log.warning("node %d refused the %s: %s", src, message_type, reply.refusal)
                history += reply.refusal_code == REFUSAL_HISTORY
            elif reply is not None and not signed(reply, self.holders.of.get(src), self.pins):
                log.warning("node %d: the query reply is not signed by its pinned key; ignored", src)
            elif reply is not None and reply.node == src and reply.model_version == plan.version:
                out[src] = reply
                self.known_version[src] = plan.version
        return out, history

    def sync(self) -> tuple[list[int], dict[int, Reply], int]:
        """Send the final tail to every live node (only the identified ones when the run pins its nodes: the
        others get nothing of the ledger); returns the nodes asked and their replies, which carry their
        replicas' state digests, runtimes and the epsilon each holder's own ledger recorded, and how many
        refused this server's ledger itself."""
        live = self.grid.get_node_ids()
        nodes = sorted(n for n in live if n in self.holders.of) if self.pins else sorted(live)
        return nodes, *self._query(RoundPlan(self.ledger.last_round + 1, len(self.ledger), nodes, [], None))

    def evaluate_nodes(self) -> dict[str, Any]:
        """Flower's evaluate path: one node per identified holder scores the final model on its own held-out
        data and releases its per-label counts under Gaussian noise (its holder's privacy ledger accounts the
        release); the server sums the counts into a DP-noised accuracy and macro-F1 over the holders' data."""
        fed, labels = self.config.federation, self.config.task.labels
        nodes = sorted(self.holders.one_per_holder(self.grid.get_node_ids()).values())
        plan = RoundPlan(self.ledger.last_round + 1, len(self.ledger), nodes, [], None)
        counts, epsilon = [], {}
        for src, reply in self._query(plan, EVALUATE)[0].items():
            values = np.asarray(reply.counts, dtype=np.float64)
            if values.shape != (3 * len(labels),) or not np.isfinite(values).all():
                log.warning("node %d: evaluation counts of shape %s (expected %d finite values); ignored", src,
                            values.shape, 3 * len(labels))
                continue
            counts.append(values.reshape(len(labels), 3))
            epsilon[reply.holder] = reply.metrics.get("epsilon")
        noise = count_noise(self.config.privacy, fed.node_eval_epsilon)
        out: dict[str, Any] = {
            "node_eval_holders": len(counts), "node_eval_asked": len(plan.nodes),
            "node_eval_noise_std": noise.std * COUNT_SENSITIVITY,  # per released count
            # each holder's epsilon on its held-out data, from its own ledger (this release and any before)
            "node_eval_epsilon_holders": epsilon,
            "node_eval_epsilon_per_release": PrivacyAccountant([StepRun(noise, 1.0, 1)]).epsilon(
                self.config.privacy.delta),
        }
        if counts:
            metrics = counts_metrics(np.sum(counts, axis=0), labels)
            out.update({f"node_test_{k}": v for k, v in metrics.items()})
        log.info("node evaluation: %d of %d holders reported; DP-noised accuracy %s, macro-F1 %s", len(counts),
                 len(plan.nodes), out.get("node_test_accuracy"), out.get("node_test_macro_f1"))
        return out

    def run(self) -> dict[str, Any]:
        # the run checked out (ledger, anchor, pins): from here its rows also go to the tracker, if one is set
        self.report.tracker = open_tracker(self.config.tracking, self.run_dir, flatten(self.config.to_dict()))
        try:
            return self._run()
        except BaseException:
            if self.report.tracker is not None:
                self.report.tracker.close(failed=True)
                self.report.tracker = None
            raise

    def _run(self) -> dict[str, Any]:
        start = time.time()
        fed = self.config.federation
        first = self.ledger.last_round + 1
        if first == 1:  # the base model's accuracy, before any private step
            zero_shot = self.test_metrics()
            self.report.add({"round": 0, "dev_accuracy": self.evaluate(), "ledger_entries": 0,
                             **{f"test_{k}": v for k, v in zero_shot.items() if isinstance(v, float)}})
        for rnd in range(first, fed.rounds + 1):
            self.run_round(rnd)
        server_digest = self.replica.state_digest()
        asked, synced, history = self.sync()
        if asked and history == len(asked):
            raise FederationHalted(f"every node asked in the final sync ({len(asked)}) refused this server's ledger "
                                   f"{self.ledger.path} itself (see the warnings above); no summary is written")
        client_digests = {str(n): r.state_digest for n, r in synced.items()}
        client_runtimes = {str(n): r.runtime or "torch" for n, r in synced.items()}
        # What each holder's own privacy ledger recorded (over every run on that data), next to this server's.
        holder_epsilon = {r.holder: r.metrics["epsilon"] for r in synced.values() if "epsilon" in r.metrics}
        server_epsilon = self.holders.epsilons()
        nodes_eval = self.evaluate_nodes() if fed.node_evaluation else {}
        test = self.test_metrics()
        rows = self.report.rows
        summary = {
            "model": self.replica.task.name, "task": self.config.task.name, "labels": self.config.task.labels,
            "rounds": self.ledger.last_round,
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
            **{f"zero_shot_{k}": v for r in rows if r["round"] == 0 for k, v in r.items() if k.startswith("test_")},
            **{f"test_{k}": v for k, v in test.items()},
            **nodes_eval,
            "model_digest": self.replica.digest(), "state_digest": server_digest,
            "client_digests": client_digests, "client_runtimes": client_runtimes,
            # Every node asked in the final sync (every live node; only the identified ones when the run pins
            # its nodes) answered, and every answer matches: a silent or refusing node is not agreement.
            "clients_agree": bool(client_digests) and len(client_digests) == len(asked)
                             and all(d == server_digest for d in client_digests.values()),
            "pinned_nodes": len(self.pins.keys) if self.pins else None,
            "refused_identities": sorted(self.holders.strangers),
            "ledger": str(self.ledger.path), "wall_s": round(time.time() - start, 2),
        }
        self.report.finish(summary)
        log.info("federated run done: %s", json.dumps(summary))
        return summary
