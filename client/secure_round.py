"""A node's side of a secure-aggregation round (``federation.secure_aggregation = "secagg+"``).

The train instruction opens the round (SecAgg+ stage 1): the node catches up and checks the instruction as for
any round (client.node), then computes its vector: per step of K seeds (one direction, or the head stage's frame),
its Poisson sample's clipped K-vectors in integer units, rounded at random per example, summed, plus
``1 / min_replies`` of the Skellam variance the ledger header pins (client.zo_step.integer_release); a header
whose noise record is accounted for another K is refused. It keeps the vector and a fresh SecAgg+ session in its
own state and replies with its public keys only. Three ``train.secure`` messages follow: it shares its secrets among its
neighbours (stage 2), sends its masked vector (stage 3: the release, written to its holder's privacy ledger
before the reply leaves) and answers the unmasking (stage 4). A re-delivered stage gets the same reply bytes.

No local progress within the round: every step is computed at the round's model version. Under secure
aggregation the server sees only sums, so a node's own noised value is not a release, and moving its local
copy by it (as a plain round does with its released scalars) would make its later steps depend on a value that
carries only a share of the noise, outside the central accounting. (When the data holder is the privacy unit,
the whole round is one release, so its local steps move by their plain means, as in a plain holder round.)

What the node's holder is charged: each step (for the holder unit, each round) is one subsampled Skellam
release, seen two ways: at the header's
central variance (the central guarantee, given at least ``min_replies`` survivors and a server that follows the
protocol) and at the node's own share of it (the local guarantee, against any server). Its budget is checked
against the local one unless its operator trusts the server's protocol (node config
``trust-secure-aggregation``; simulated nodes do): a server cannot buy a deployed holder less noise by choosing
secure aggregation. The other view is recorded beside it (``HOLDER#local`` or ``HOLDER#central``), and ``seedtune
holder status`` shows both.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from seedtune.client.privacy_ledger import Budget, Run, request_key
from seedtune.client.zo_step import estimates, holder_integer_release, integer_release
from seedtune.shared.engine.follower import LedgerFollower
from seedtune.shared.privacy.noise import Noise, SecureRandom, Skellam
from seedtune.shared.protocol.identity import sign_reply
from seedtune.shared.protocol.proto import Instruction, Reply, ShareAnswer
from seedtune.shared.protocol.secagg import NodeSession, PublicKeys, RoundGraph, SecAggError, round_context

if TYPE_CHECKING:
    from seedtune.client.node import Holder

STAGES = (1, 2, 3, 4)  # keys, share, mask, unmask


def local_budget(budget: str) -> str:
    """Where a trusting holder's local guarantee is recorded, beside its (central) training budget."""
    return f"{budget}#local"


def central_budget(budget: str) -> str:
    """Where a holder that does not trust the server's protocol records the central guarantee, beside its training
    budget (charged at its local noise)."""
    return f"{budget}#central"


def charged(holder: Holder, noise: Skellam, shares: int, rate: float, steps: int) -> tuple[Run, tuple[str, Run]]:
    """The run the holder's budget is charged and checked with, and the other view of the same release with the
    budget it is recorded under: central and local noise, by whether the node trusts the server's protocol."""
    central = (noise, rate, steps)
    local = (noise.share(shares), rate, steps)
    if holder.trusts_secure_sum:
        return central, (local_budget(holder.spends), local)
    return local, (central_budget(holder.spends), central)


class SecureRefusal(RuntimeError):
    """A secure round's step this node will not take; client.node turns it into a refusal reply."""


@dataclass
class Pending:
    """What a node keeps between a secure round's messages, in its own state only: the round it is in, its
    vector (already noised with its share) and session, and each stage's reply bytes."""

    round: int
    header_digest: str
    version: int
    request: str  # the privacy ledger's key of the train instruction
    steps: int
    sample_rate: float
    shares: int  # min_replies: the node added 1/shares of the central variance
    vector: list[int]
    session: str  # NodeSession.dump(), private keys included
    replies: dict[int, str] = field(default_factory=dict)  # stage -> the signed reply, hex

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Pending:
        d = json.loads(data)
        d["replies"] = {int(k): v for k, v in d["replies"].items()}
        return cls(**d)

    def seal(self, reply: Reply, stage: int, session: NodeSession, holder: Holder) -> tuple[Reply, bytes]:
        """Sign ``reply``, keep its bytes for a re-delivery and the session as it now stands."""
        sign_reply(reply, holder.key)
        self.replies[stage] = reply.SerializeToString(deterministic=True).hex()
        self.session = session.dump().decode()
        return reply, self.to_bytes()  # kept after stage 4 too: a re-delivered stage 4 gets the same bytes


def begin(ins: Instruction, node_id: int, replica: LedgerFollower, ids: Sequence[Sequence[int]], labels: np.ndarray,
          holder: Holder, budget: Budget | None, noise: Noise | None, rng: SecureRandom,
          reply: Reply, k: int, local_round: Callable[[], list[float]]) -> tuple[Reply, bytes]:
    """Stage 1: compute this node's vector for the round and open its SecAgg+ session; the reply carries its
    public keys and nothing derived from its data. Returns the signed reply and the pending state to keep. ``k``:
    the header's directions per step (client.node checked the seeds are whole steps of it).

    When the data holder is the privacy unit (privacy.unit = "holder"), ``local_round`` gives the round's plain
    mean estimates (local steps with local progress, nothing released), and the release is that whole vector,
    clipped, let in by the holder's secret coin and rounded (client.zo_step.holder_integer_release): one
    Skellam release of the round's length per round, at privacy.holder_rate."""
    h, shares = ins.hyper, replica.config.federation.min_replies
    if not ins.HasField("secure") or ins.secure.stage != 1:
        raise SecureRefusal("this federation's ledger header asks for secure aggregation: a train instruction must "
                            "open a SecAgg+ round (stage 1)")
    if not isinstance(noise, Skellam):
        raise SecureRefusal(f"secure aggregation needs the header's Skellam noise, not "
                            f"{noise.describe() if noise else 'none'}")
    step = ins.secure
    if len(step.ring) < shares:
        raise SecureRefusal(f"a secure round of {len(step.ring)} nodes, fewer than the {shares} survivors (federation."
                            f"min_replies) each node's share of the noise assumes")
    try:
        session = NodeSession(node_id, RoundGraph(tuple(step.ring), step.degree, step.threshold, len(ins.seeds),
                                                  round_context(ins.header_digest, ins.round, ins.model_version)))
    except SecAggError as exc:
        raise SecureRefusal(str(exc)) from exc
    request = request_key(ins.header_digest, ins.round, ins.model_version, list(ins.seeds))
    if holder.ledger.reply_for(holder.spends, request) is not None:
        raise SecureRefusal(f"round {ins.round} was already released by this holder: a secure round is not rerun")
    per_holder = replica.config.privacy.unit == "holder"
    width = len(ins.seeds) if per_holder else k  # the coordinates of one release: the round's, or one step's
    if noise.directions != width:  # its accounting would be for another release than the one this node makes
        raise SecureRefusal(f"the header's Skellam noise is accounted for releases of {noise.directions} "
                            f"coordinates, this node's have {width}")
    steps, rate = replica.config.privacy_events() if per_holder else (len(ins.seeds) // k, h.sample_rate)
    holder.ledger.check(holder.spends, charged(holder, noise, shares, rate, steps)[0], budget)
    prepare = getattr(replica.view, "prepare", None)  # a torch view: each record's frozen part, once
    if prepare is not None:
        prepare(ids, len(ins.seeds) // k * h.sample_rate)
    if per_holder:
        vector = holder_integer_release(np.asarray(local_round()), h.clip, rate, noise, shares, rng)
    else:
        vector = np.concatenate([
            integer_release(estimates(replica.view, ids, labels, tuple(ins.seeds[first:first + k]), h.mu,
                                      h.sample_rate, replica.config.model.microbatch, rng)[0], h.clip, noise, shares,
                            rng)
            for first in range(0, len(ins.seeds), k)])
    limit = (1 << 63) // len(step.ring) - 1  # no sum of the ring's vectors can wrap around 2^64
    if np.abs(vector).max(initial=0) > limit:  # (the value itself is private: not in the message)
        raise SecureRefusal(f"this node's vector passes the field's limit {limit} for {len(step.ring)} nodes")
    keys = session.advertise()
    reply.model_version = replica.version
    reply.secure.keys.encryption, reply.secure.keys.masking = keys.encryption, keys.masking
    pending = Pending(ins.round, ins.header_digest, ins.model_version, request, steps, rate, shares,
                      [int(v) for v in vector], session.dump().decode())
    return pending.seal(reply, 1, session, holder)


def advance(ins: Instruction, stored: bytes, holder: Holder, budget: Budget | None, noise: Noise | None,
            reply: Reply) -> tuple[Reply, bytes]:
    """Stages 2 to 4 of the round the node's ``stored`` pending state holds. Returns the signed reply and the
    state to keep (until the next round's stage 1 replaces it)."""
    if not stored:
        raise SecureRefusal("no secure round is open at this node (it restarted, or was never sent stage 1)")
    pending = Pending.from_bytes(stored)
    stage = ins.secure.stage
    if (ins.round, ins.header_digest, ins.model_version) != (pending.round, pending.header_digest, pending.version):
        raise SecureRefusal(f"a step of round {ins.round} at version {ins.model_version}; this node's open secure "
                            f"round is round {pending.round} at version {pending.version}")
    if stage in pending.replies:  # a re-delivery: the same bytes, no second share or release
        return Reply.FromString(bytes.fromhex(pending.replies[stage])), stored
    if stage != max(pending.replies) + 1 or stage not in STAGES:
        raise SecureRefusal(f"secure stage {stage} after stage {max(pending.replies)}: stages run 1 to 4 in order")
    if not isinstance(noise, Skellam):
        raise SecureRefusal("secure aggregation needs the header's Skellam noise")
    session = NodeSession.load(pending.session.encode())
    reply.model_version = pending.version
    try:
        if stage == 2:
            peers = {int(j): PublicKeys(k.encryption, k.masking) for j, k in ins.secure.peers.items()}
            for j, ciphertext in session.share(peers).items():
                reply.secure.shares[j] = ciphertext
        elif stage == 3:
            released = holder.ledger.reply_for(holder.spends, pending.request)
            if released is not None:  # recorded, then the node stopped before keeping its state: the same bytes
                pending.replies[3] = released.hex()
                return Reply.FromString(released), pending.to_bytes()
            masked = session.masked(np.array(pending.vector, dtype=np.int64), dict(ins.secure.inbox))
            reply.secure.masked = masked.astype("<u8").tobytes()
            return _release(reply, pending, session, holder, budget, noise)
        else:
            for j, (kind, share) in session.unmask(set(ins.secure.survivors), set(ins.secure.dropped)).items():
                reply.secure.answers[j].CopyFrom(ShareAnswer(kind=kind, share=share))
    except SecAggError as exc:
        raise SecureRefusal(str(exc)) from exc
    return pending.seal(reply, stage, session, holder)


def _release(reply: Reply, pending: Pending, session: NodeSession, holder: Holder, budget: Budget | None,
             noise: Skellam) -> tuple[Reply, bytes]:
    """Stage 3: the masked vector is the release. It is written to the holder's privacy ledger before it leaves:
    against its budget at the noise the node trusts (:func:`charged`), and the other view beside it."""
    run, (other_key, other) = charged(holder, noise, pending.shares, pending.sample_rate, pending.steps)
    reply.metrics["epsilon"] = holder.ledger.check(holder.spends, run, budget)
    if budget is not None:
        view = "epsilon_local" if other_key == local_budget(holder.spends) else "epsilon_central"
        reply.metrics[view] = holder.ledger.epsilon(other_key, budget.delta, other)
    signed, state = pending.seal(reply, 3, session, holder)
    raw = bytes.fromhex(pending.replies[3])
    holder.ledger.record(holder.spends, pending.request, run, budget, raw, beside=[(other_key, other)])
    return signed, state
