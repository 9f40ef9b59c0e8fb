"""The server's side of a secure-aggregation round (``federation.secure_aggregation = "secagg+"``).

It replaces a plain round's send-and-validate step (:meth:`server.federation.FederatedServer.collect`) with
SecAgg+'s four (shared.protocol.secagg): the train instruction carries the round's ring (the instructed nodes in
an order the server's CSPRNG shuffles) and each node answers with its public keys; the server forwards each node
its neighbours' keys and collects the encrypted shares; it forwards each node the shares addressed to it and
collects the masked vectors; it asks each node that sent one for the seed shares of its surviving neighbours and
the key shares of those that dropped, and removes every mask. It learns each seed's sum over the surviving nodes
and nothing else; each stage's replies pass the same envelope checks as a plain reply (server.round.envelope).

A round with fewer than ``federation.min_replies`` masked vectors, or whose masks cannot all be removed, commits
nothing. Otherwise the per-seed aggregate is the sum in scalar units divided by the survivors and the public
``federation.secure_batch`` (for the holder unit, by ``privacy.holder_rate``: a node's vector is its round's,
clipped whole, behind its coin); it is the round's one ``secure_sum`` provenance row, and each node in the sum has a
``masked`` row without scalars: the ledger's verifier recomputes the coefficients from the aggregate, and no
node's scalars are stored because none were seen.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import Counter
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from seedtune.server.courier import Courier
from seedtune.server.round import BELOW_MIN_REPLIES, Collected, Rejected, RoundPlan, envelope
from seedtune.shared.privacy.noise import Skellam
from seedtune.shared.protocol.aggregation import MASKED, SECURE_SUM
from seedtune.shared.protocol.identity import AllowedNodes
from seedtune.shared.protocol.ledger import Provenance
from seedtune.shared.protocol.proto import PROTOCOL_VERSION, Instruction, PeerKeys, Reply, SecureStep
from seedtune.shared.protocol.secagg import (PublicKeys, RoundGraph, SecAggError, ServerSession, default_degree,
                                             round_context)
from seedtune.shared.protocol.wire import SECURE
from seedtune.shared.task.config import RunConfig

log = logging.getLogger(__name__)
# Records one node may sample in one step, for the range check of an unmasked sum: far above any real batch, and
# a sum with a mask left in lands below it with probability about 2^-30 per coordinate.
MAX_BATCH = 10**7
DROPPED = "dropped"  # a node that answered an earlier stage of the round and not a later one
UNMASK_FAILED = "unmask_failed"  # survivors whose sum could not be unmasked (too few shares): nothing committed


class SecureRound:
    def __init__(self, config: RunConfig, noise: Skellam, courier: Courier, pins: AllowedNodes | None,
                 header_digest: str) -> None:
        self.config, self.noise, self.courier, self.pins, self.header_digest = config, noise, courier, pins, header_digest
        self.shuffle = random.SystemRandom().shuffle

    def collect(self, plan: RoundPlan, instruction: Callable[[int], Instruction],
                holders: Mapping[int, str]) -> Collected:
        """Run SecAgg+'s four stages with the plan's nodes; every node's provenance and the aggregate row."""
        fed, start = self.config.federation, time.perf_counter()
        out = Collected([], Counter(), 0, Counter(), Counter(), {})
        if len(plan.nodes) < max(fed.min_replies, 2):
            log.warning("round %d: %d nodes, fewer than the %d survivors a secure round needs; nothing sent",
                        plan.round, len(plan.nodes), fed.min_replies)
            return out
        ring = list(plan.nodes)
        self.shuffle(ring)
        degree = fed.secure_degree or default_degree(len(ring))
        size = min(degree, len(ring))
        graph = RoundGraph(tuple(ring), degree, size // 2 + 1, len(plan.seeds),
                           round_context(self.header_digest, plan.round, plan.version))
        server = ServerSession(graph)
        fate: dict[int, str] = {}  # node -> rejection kind or DROPPED; absent: in the round so far

        def opening(at: int) -> Instruction:
            ins = instruction(at)
            ins.secure.CopyFrom(SecureStep(stage=1, ring=graph.ring, degree=graph.degree, threshold=graph.threshold))
            return ins

        delivery = self.courier.send(plan, opening)
        for node, reply in self._judge(plan, 1, delivery, out, holders, fate, plan.nodes):
            keys = PublicKeys(reply.secure.keys.encryption, reply.secure.keys.masking)
            try:
                keys.check()
            except SecAggError as exc:  # refused here, so that its neighbours never fail on it
                self._reject(plan, node, fate, out, Rejected("malformed", f"node {node}'s keys: {exc}"), 1)
                continue
            server.keys[node] = keys
        for node, reply in self._stage(plan, 2, lambda n: SecureStep(stage=2, peers={
                j: PeerKeys(encryption=k.encryption, masking=k.masking) for j, k in server.peers_of(n).items()}),
                server.keys, out, holders, fate):
            if set(reply.secure.shares) != set(server.peers_of(node)):
                self._reject(plan, node, fate, out, Rejected("malformed", f"node {node} sent shares for "
                             f"{sorted(reply.secure.shares)}, not for the neighbours it was sent keys of"), 2)
                continue
            server.shared[node] = dict(reply.secure.shares)
        masked: dict[int, np.ndarray] = {}
        for node, reply in self._stage(plan, 3, lambda n: SecureStep(stage=3, inbox=server.inbox(n)), server.shared,
                                       out, holders, fate):
            if len(reply.secure.masked) != 8 * len(plan.seeds):
                self._reject(plan, node, fate, out, Rejected("wrong_count", f"node {node}: "
                             f"{len(reply.secure.masked)} bytes of masked vector for {len(plan.seeds)} seeds"), 3)
                continue
            masked[node] = np.frombuffer(reply.secure.masked, dtype="<u8").astype(np.uint64)
        answers: dict[int, dict[int, tuple[str, bytes]]] = {}
        if len(masked) >= fed.min_replies:
            requests = {n: server.unmask_request(n, masked) for n in masked}
            for node, reply in self._stage(plan, 4, lambda n: SecureStep(stage=4, survivors=sorted(requests[n][0]),
                                                                         dropped=sorted(requests[n][1])),
                                           masked, out, holders, fate):
                answers[node] = {int(j): (a.kind, a.share) for j, a in reply.secure.answers.items()}
        out = self._settle(plan, masked, answers, server, holders, fate, out)
        waited = sum(v for k, v in out.timings.items() if k.endswith("_transport"))
        out.timings["secure"] = time.perf_counter() - start - waited  # the server's own protocol work
        return out

    def _stage(self, plan: RoundPlan, stage: int, step: Callable[[int], SecureStep], nodes: Iterable[int],
               out: Collected, holders: Mapping[int, str], fate: dict[int, str]):
        """Send stage ``stage`` to ``nodes`` still in the round; the valid replies."""
        asked = [n for n in nodes if n not in fate]
        instructions = {n: Instruction(protocol_version=PROTOCOL_VERSION, run_id=self.courier.run_id, round=plan.round,
                                       model_version=plan.version, header_digest=self.header_digest,
                                       secure=step(n)) for n in asked}
        delivery = self.courier.send_each(plan.round, instructions, SECURE)
        return self._judge(plan, stage, delivery, out, holders, fate, asked)

    def _judge(self, plan: RoundPlan, stage: int, delivery: Any, out: Collected, holders: Mapping[int, str],
               fate: dict[int, str], asked: Iterable[int]) -> list[tuple[int, Reply]]:
        """Each reply of one stage through the plain round's envelope checks; the nodes that sent none drop."""
        limit = 64 * 1024 + 8 * len(plan.seeds) + 2048 * (self.config.federation.secure_degree or 64)
        valid: list[tuple[int, Reply]] = []
        seen: set[int] = set()
        for msg in delivery.replies:
            src = msg.metadata.src_node_id
            try:
                reply = envelope(msg, plan, self.courier.run_id, holders.get(src), seen, self.pins, limit)
            except Rejected as exc:
                if exc.kind == "duplicate":  # its first answer stands
                    out.rejected[exc.kind] += 1
                    log.warning("round %d: secure stage %d: %s", plan.round, stage, exc)
                else:
                    self._reject(plan, src, fate, out, exc, stage)
                continue
            seen.add(src)
            valid.append((src, reply))
        out.replies += len(delivery.replies) if stage == 1 else 0
        out.up.update(self.courier.uplink(delivery.replies, limit))
        out.down.update(delivery.down)
        out.timings.update({f"secure{stage}_{k}": v for k, v in delivery.timings.items()})
        for node in set(asked) - seen - set(fate):
            fate[node] = DROPPED
            log.warning("round %d: node %d sent no valid answer to secure stage %d; it drops out", plan.round, node,
                        stage)
        return valid

    @staticmethod
    def _reject(plan: RoundPlan, node: int, fate: dict[int, str], out: Collected, exc: Rejected, stage: int) -> None:
        fate[node] = exc.kind
        out.rejected[exc.kind] += 1
        log.warning("round %d: secure stage %d: rejected (%s) %s", plan.round, stage, exc.kind, exc)

    def _settle(self, plan: RoundPlan, masked: dict[int, np.ndarray], answers: dict[int, dict[int, tuple[str, bytes]]],
                server: ServerSession, holders: Mapping[int, str], fate: dict[int, str], out: Collected) -> Collected:
        """The round's provenance: the aggregate row and each node's fate, or nothing to commit."""
        fed = self.config.federation
        total = None
        if len(masked) >= fed.min_replies:
            try:
                total = server.total(masked, answers)
                bound = len(masked) * self.noise.sensitivity * MAX_BATCH + 40 * math.sqrt(
                    self.noise.variance * len(masked) / fed.min_replies)
                if np.abs(total.astype(np.float64)).max(initial=0.0) > bound:
                    raise SecAggError(f"the unmasked sum reaches {np.abs(total.astype(np.float64)).max():.3g}, past "
                                      f"any honest sum ({bound:.3g}): a mask was left in (a node that masked with "
                                      f"another view of the round, or a wrong share)")
            except SecAggError as exc:
                total = None
                log.warning("round %d: the sum cannot be unmasked (%s); committing no update", plan.round, exc)
        in_sum = MASKED if total is not None else (BELOW_MIN_REPLIES if len(masked) < fed.min_replies else UNMASK_FAILED)
        if total is None and len(masked) < fed.min_replies:
            log.warning("round %d: %d masked vectors < min_replies %d; committing no update", plan.round, len(masked),
                        fed.min_replies)
        out.provenance = [Provenance(n, holders.get(n, ""), in_sum if n in masked else fate.get(n, DROPPED))
                          for n in plan.nodes if n in masked or n in fate]
        if total is not None:
            # a node's vector is its sample's clipped sum (divided by its public expected batch), or, when the
            # holder is the privacy unit, its round's clipped vector behind a coin (divided by the coin's rate)
            per_node = self.config.privacy.holder_rate if self.config.privacy.unit == "holder" else fed.secure_batch
            scale = self.config.privacy.clip / (self.noise.sensitivity * per_node * len(masked))
            aggregate = (total.astype(np.float64) * scale).astype("<f4")
            out.provenance.append(Provenance(0, "", SECURE_SUM, aggregate.tobytes()))
        return out
