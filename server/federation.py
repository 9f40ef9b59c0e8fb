"""The federated DP-ZO server loop, over Flower's low-level Grid API, made of parts.

A round reads like the protocol (:meth:`FederatedServer.run_round`):

1. **configure**: identify the nodes not seen yet and sample one node per holder within its budget
   (:mod:`server.holders`), draw the round's seeds from the server's CSPRNG, and durably record the instructed
   holders' steps before anything is sent;
2. **send** each distinct instruction once and collect the replies (:mod:`server.courier`, which meters bytes
   and keeps how far each node holds the ledger);
3. **validate** each reply (:func:`server.round.judge`, pure: a named rejection or the scalars);
4. **aggregate** the accepted scalars per seed under the round's rule (:mod:`shared.protocol.aggregation`, pure);
5. **commit** the K entries and every reply's provenance in one ledger transaction, and apply them to the
   server's replica;
6. **evaluate** on the public dev split and write the round's metrics (:mod:`server.summary`,
   :mod:`server.report`).

After the last round every node is synced (its state digest checked against the server's) and, with
``federation.node_evaluation``, asked to score the final model on its own held-out data (noised per-label
counts, accounted in its holder's ledger, summed by the server). A restarted server reopens its run folder
through :mod:`server.resume`: the ledger is checked against its anchors and replayed, and each holder's
spending recovered from the instructions recorded before sending.
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
from typing import Any

import numpy as np

from seedtune.shared.protocol.aggregation import ACCEPTED, FEEDS, MASKED, RoundRule, update_scale
from seedtune.shared.task.config import RunConfig, directions_per_step, flatten
from seedtune.shared.engine.directions import step_seeds
from seedtune.shared.protocol.identity import position_bytes
from seedtune.shared.protocol.ledger import Provenance
from seedtune.shared.protocol.proto import PROTOCOL_VERSION, Hyperparameters, Instruction, Reply
from seedtune.shared.engine.replica import Replica
from seedtune.shared.protocol.run_folder import check_anchor_home, write_home_anchor
from seedtune.shared.task.tasks import load_split, with_labels
from seedtune.shared.task.tracking import check_backend, open_tracker
from seedtune.shared.privacy.noise import Noise, SecureRandom, Skellam
from seedtune.shared.privacy.skellam import calibrate as calibrate_skellam, gaussian_ratio
from seedtune.shared.privacy.noise_search import count_noise, plan_noise
from seedtune.shared.protocol.wire import EVALUATE, SYNC
from seedtune.server.courier import Courier
from seedtune.server.holders import Holders, load_key, load_pins
from seedtune.server.resume import open_run
from seedtune.server.round import REFUSED_HISTORY, Collected, RoundPlan, judge, scalar_bound
from seedtune.server.secure import SecureRound
from seedtune.server.summary import Clock, node_evaluation, round_row, run_summary

log = logging.getLogger(__name__)


class FederationHalted(RuntimeError):
    """Every node that answered refuses this server's ledger itself (Reply.refusal_code "history": unsigned by
    the key they pin, behind, forked, or another header): it stops, writing no round and no summary, rather
    than run on a ledger nobody follows."""

    @classmethod
    def in_round(cls, rnd: int, replies: int, ledger: Path) -> FederationHalted:
        return cls(f"round {rnd}: every node that answered ({replies}) refused this server's ledger {ledger} "
                   f"itself: not signed by the server key they pin, or behind, forked from or another header than "
                   f"the history they followed (a restored copy, a lost WAL, a rewrite, or the wrong "
                   f"federation.server_key); stopping with nothing committed. Restore the ledger they followed, or "
                   f"start a new federation their operators accept")


class FederatedServer:
    def __init__(self, config: RunConfig, grid: Any, run_dir: str | Path, replica: Replica | None = None) -> None:
        # Every input is loaded and checked before anything is written: a bad data folder leaves no run folder.
        # The labels, when the config leaves them to the data, come from the server's public test split.
        check_backend(config.tracking)
        self.config = config = with_labels(config, "test")
        self.courier = Courier(grid, config.federation.round_timeout_s)
        self.pins, self.key = load_pins(config.federation.allowed_nodes), load_key(config.federation.server_key)
        dev, test = load_split(config, "dev", config.eval.dev_size), load_split(config, "test")
        self.replica = replica or Replica(config)
        task = self.replica.task  # the periodic dev evaluation (public-split monitoring) is a classifier's
        self.dev = (task.encode(dev.records), dev.labels) if not task.generation else ([], dev.labels[:0])
        self.test = task.eval_set(test)
        check_anchor_home()
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.rng, self.sampler = SecureRandom(), random.SystemRandom()
        # K directions per local step (a Hadamard head frame: the power of two covering the head), one scalar
        # per instructed seed on the wire
        self.directions = directions_per_step(config.zo.directions, self.replica.selection.size)
        self.ledger, self.report = open_run(self.run_dir, config, self.replica, self._new_header,
                                            self.pins.digest if self.pins else "", self.key)
        params = self.ledger.header.noise_params
        self.noise: Noise | None = Noise.from_json(params) if params else None  # as pinned in the header
        self.rule = RoundRule(config.federation.aggregation, update_scale(config.zo.lr, self.directions),
                              config.federation.trim)
        self.events, rate = config.privacy_events()  # privacy events per instructed holder per round, their rate
        self.holders = Holders(config.privacy, rate, self.noise, self.pins)
        # a holder-unit node divides its release by its coin's rate (client.zo_step.holder_release)
        self.bound = scalar_bound(config.privacy.clip, self.noise) / (rate if config.privacy.unit == "holder" else 1)
        self.secure = SecureRound(config, self.noise, self.courier, self.pins, self.ledger.genesis.hex()) \
            if config.federation.secure_aggregation != "none" and isinstance(self.noise, Skellam) else None
        for holder, steps in self.ledger.instructed_steps().items():  # sent = spent, committed or not
            self.holders.record(holder, steps)

    @property
    def grid(self) -> Any:
        return self.courier.grid

    def _new_header(self):
        """The header of a new ledger: calibrates the noise for the whole run (only when no ledger exists)."""
        fed, privacy = self.config.federation, self.config.privacy
        noise: Noise | None = None
        per_round, rate = self.config.privacy_events()
        events = fed.rounds * per_round
        if privacy.enabled and fed.secure_aggregation != "none":  # the central noise the survivors' shares sum to
            # one release: a step's K directions, or a holder-unit node's whole round (client.secure_round)
            width = self.directions * (fed.local_steps if privacy.unit == "holder" else 1)
            plan = calibrate_skellam(privacy.epsilon, privacy.delta, rate, events, privacy.clip, width,
                                     fed.min_replies)
            noise = plan.noise()
            if width > 1:  # the K-coordinate RDP bound is loose at high sampling rates: say what it costs
                ratio = gaussian_ratio(plan, privacy.epsilon, privacy.delta, rate, events)
                (log.warning if ratio > 1.5 else log.info)(
                    "secure aggregation of releases of %d coordinates: the RDP bound costs %.2fx the Gaussian's "
                    "noise at sampling rate %.4g over %d releases%s", width, ratio, rate, events,
                    f"; a lower {'privacy.holder_rate' if privacy.unit == 'holder' else 'federation.sample_rate'} "
                    "costs less (configs/federated_head_secure.toml samples at 0.05)" if ratio > 1.5 else "")
        elif privacy.enabled:
            noise = plan_noise(privacy, rate, events, nodes_stop_at_budget=True)
        if noise is not None:
            log.info("noise %s for epsilon %.3g, delta %.1e over %d releases per %s at rate %.4g", noise.describe(),
                     privacy.epsilon, privacy.delta, events, privacy.unit, rate)
        header = self.replica.make_header(noise)
        header.allowed_nodes = self.pins.digest if self.pins else ""
        return header

    # ------------------------------------------------------------------------------------- one round
    def configure(self, rnd: int) -> RoundPlan:
        """Eligibility (one node per holder within budget, sampled), the round's seeds and hyperparameters;
        the instructed holders' steps are durably recorded before anything is sent."""
        fed, privacy = self.config.federation, self.config.privacy
        live = self.courier.live()
        self.holders.identify(live, self.courier, self.ledger.genesis.hex(), rnd)
        nodes = self.holders.eligible(live, self.events)
        if fed.clients_per_round and len(nodes) > fed.clients_per_round:
            nodes = sorted(self.sampler.sample(nodes, fed.clients_per_round))
        hyper = Hyperparameters(lr=self.config.zo.lr, mu=self.config.zo.mu, clip=privacy.clip,
                                sample_rate=fed.sample_rate, private=privacy.enabled,
                                noise=self.noise.to_json() if self.noise else "")
        draws = iter(self.rng.seed64, None)
        seeds = [seed for _ in range(fed.local_steps) for seed in step_seeds(self.config.zo.direction, draws,
                                                                             self.directions)]
        plan = RoundPlan(rnd, len(self.ledger), nodes, seeds, hyper)
        if nodes:  # events, not seeds: a step of K directions is one, a holder's whole round (unit "holder") one
            holders = [self.holders.of[n] for n in nodes]
            self.ledger.record_instructions(rnd, holders, self.events)
            for holder in holders:
                self.holders.record(holder, self.events)
        return plan

    def instruction(self, plan: RoundPlan, start: int) -> Instruction:
        """What every node at ledger position ``start`` gets this round: nothing in it names the node."""
        ins = Instruction(protocol_version=PROTOCOL_VERSION, run_id=self.courier.run_id, round=plan.round,
                          model_version=plan.version, header_digest=self.ledger.genesis.hex(),
                          tail=self.ledger.tail(start), seeds=plan.seeds)
        if plan.hyper is not None:
            ins.hyper.CopyFrom(plan.hyper)
        if start == 0:
            ins.header.CopyFrom(self.ledger.header)
        head = ins.tail.head_hash  # the server's signature over this ledger position (b"": unsigned)
        ins.server_signature = self.key.sign(position_bytes(self.ledger.genesis.hex(), plan.version, head)) \
            if self.key else b""
        return ins

    def collect(self, plan: RoundPlan) -> Collected:
        """send -> validate: each instructed node's reply judged (server.round.judge). Secure aggregation replaces
        this step with SecAgg+'s four (server.secure), which yield one aggregate row instead of the replies'
        scalars."""
        if self.secure is not None:
            return self.secure.collect(plan, lambda at: self.instruction(plan, at), self.holders.of)
        if not plan.nodes:
            return Collected([], Counter(), 0, Counter(), Counter(), {})
        delivery = self.courier.send(plan, lambda at: self.instruction(plan, at))
        provenance, rejected = judge(plan, delivery.replies, self.courier.run_id, self.holders.of, self.bound,
                                     self.pins, self.config.federation.min_replies)
        return Collected(provenance, rejected, len(delivery.replies),
                         Counter(self.courier.uplink(delivery.replies, plan.max_reply_bytes)), Counter(delivery.down),
                         delivery.timings)

    def aggregate(self, plan: RoundPlan, provenance: list[Provenance]) -> np.ndarray:
        """The round's K coefficients: the rule over the accepted scalars (or a secure round's aggregate row), per
        seed (none if nothing accepted)."""
        accepted = [p.values() for p in provenance if p.status in FEEDS]
        return self.rule.coefficients(np.stack(accepted)) if accepted else np.zeros(0, dtype=np.float32)

    def run_round(self, rnd: int) -> dict[str, Any]:
        """configure -> send -> validate -> aggregate -> commit (the ledger checks the coefficients follow from
        the accepted scalars, and refuses the round unwritten if not) -> apply -> evaluate."""
        start, clock = time.time(), Clock()
        plan = self.configure(rnd)
        clock.lap("configure")
        if not plan.nodes:
            log.warning("round %d: no node is within its privacy budget; committing an empty round", rnd)
        got = self.collect(plan)
        clock.add(got.timings)
        fed, provenance, rejected = self.config.federation, got.provenance, got.rejected
        self.courier.settle(provenance, plan.version)
        if got.replies and rejected[REFUSED_HISTORY] == got.replies:
            raise FederationHalted.in_round(rnd, got.replies, self.ledger.path)
        clock.lap("validate")
        coeffs = self.aggregate(plan, provenance)
        clock.lap("aggregate")
        accepted = sum(p.status in (ACCEPTED, MASKED) for p in provenance)
        entries = self.ledger.commit_round(plan.round, plan.seeds, coeffs, provenance, self.rule,
                                           {"instructed": len(plan.nodes), "accepted": accepted,
                                            "rejected": dict(rejected), "seeds": len(plan.seeds)},
                                           self.key.sign if self.key else None)
        clock.lap("commit")
        self.replica.apply(entries, self.ledger.hash_at(len(self.ledger)))
        record = self.ledger.record_at(rnd)
        write_home_anchor(self.ledger.path, self.ledger.genesis, rnd, record)  # the metrics row is the other
        clock.lap("apply")
        row = round_row(rnd, len(plan.nodes), got.replies, accepted, rejected, len(entries), len(self.ledger),
                        record, got.up, got.down, fed.local_steps, self.holders.epsilons())
        if self.config.eval.every and rnd % self.config.eval.every == 0:
            row["dev_accuracy"] = self.evaluate()
        clock.lap("evaluate")
        row.update(phase_s=clock.phases, wall_s=round(time.time() - start, 3))
        log.info("round %d: %d/%d replies accepted, %d entries, dev accuracy %s, max epsilon %s", rnd,
                 accepted, len(plan.nodes), len(entries), row.get("dev_accuracy"), row["epsilon_max"])
        self.report.add(row)
        return row

    def evaluate(self) -> float:
        ids, labels = self.dev
        return self.replica.task.accuracy(ids, labels, self.config.model.microbatch) if len(ids) else math.nan

    # ------------------------------------------------------------------------------------------- run
    def _query(self, nodes: list[int], message_type: str = SYNC) -> tuple[dict[int, Reply], int]:
        plan = RoundPlan(self.ledger.last_round + 1, len(self.ledger), nodes, [], None)
        return self.courier.query(plan, lambda at: self.instruction(plan, at), message_type, self.holders.of,
                                  self.pins)

    def sync(self) -> tuple[list[int], dict[int, Reply], int]:
        """Send the final tail to every live node (only the identified ones when the run pins its nodes: the
        others get nothing of the ledger): the nodes asked, their replies (state digests, runtimes, each
        holder's own epsilon), and how many refused this server's ledger itself."""
        live = self.courier.live()
        nodes = sorted(n for n in live if n in self.holders.of) if self.pins else sorted(live)
        return nodes, *self._query(nodes)

    def evaluate_nodes(self) -> dict[str, Any]:
        """Flower's evaluate path: one node per identified holder scores the final model on its own held-out
        data and releases noised per-label counts (accounted in its holder's ledger), which the server sums."""
        nodes = sorted(self.holders.one_per_holder(self.courier.live()).values())
        out = node_evaluation(self._query(nodes, EVALUATE)[0], len(nodes), self.config.task.labels,
                              count_noise(self.config.privacy, self.config.federation.node_eval_epsilon),
                              self.config.privacy.delta)
        log.info("node evaluation: %d of %d holders reported; DP-noised accuracy %s, macro-F1 %s",
                 out["node_eval_holders"], len(nodes), out.get("node_test_accuracy"), out.get("node_test_macro_f1"))
        return out

    def run(self) -> dict[str, Any]:
        # the run checked out (ledger, anchor, pins): from here its rows also go to the tracker, if one is set
        with self.report.tracking(open_tracker(self.config.tracking, self.run_dir, flatten(self.config.to_dict()))):
            return self._run()

    def _run(self) -> dict[str, Any]:
        start, fed, first = time.time(), self.config.federation, self.ledger.last_round + 1
        if first == 1:  # the base model's accuracy, before any private step
            zero_shot = self.replica.task.evaluate(self.test, self.config.model.microbatch)
            self.report.add({"round": 0, "dev_accuracy": self.evaluate(), "ledger_entries": 0,
                             **{f"test_{k}": v for k, v in zero_shot.items() if isinstance(v, float)}})
        for rnd in range(first, fed.rounds + 1):
            self.run_round(rnd)
        server_digest = self.replica.state_digest()
        asked, synced, history = self.sync()
        if asked and history == len(asked):
            raise FederationHalted(f"every node asked in the final sync ({len(asked)}) refused this server's ledger "
                                   f"{self.ledger.path} itself (see the warnings above); no summary is written")
        nodes_eval = self.evaluate_nodes() if fed.node_evaluation else {}
        summary = run_summary(
            self.report.rows, synced, asked, server_digest, self.holders.epsilons(),
            self.replica.task.evaluate(self.test, self.config.model.microbatch),
            model=self.replica.task.name, task=self.config.task.name, labels=self.config.task.labels,
            rounds=self.ledger.last_round, resumed_from_round=first - 1, ledger_entries=len(self.ledger),
            noise=self.noise.describe() if self.noise else None, noise_std=self.noise.std if self.noise else 0.0,
            delta=self.config.privacy.delta if self.config.privacy.enabled else None)
        summary.update(**nodes_eval, model_digest=self.replica.digest(),
                       pinned_nodes=len(self.pins.keys) if self.pins else None,
                       refused_identities=sorted(self.holders.strangers), ledger=str(self.ledger.path),
                       wall_s=round(time.time() - start, 2))
        self.report.finish(summary)
        log.info("federated run done: %s", json.dumps(summary))
        return summary
