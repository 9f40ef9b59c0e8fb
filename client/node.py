"""What a federated client does with one server instruction, independent of the transport.

A node keeps, between messages, only its replica's position (version, chain head), its trainable values
at that position and the ledger header it joined; what it has released lives in its data holder's privacy
ledger on disk (client.privacy_ledger). Per instruction it checks the instruction is for this federation, catches up
by replaying the ledger tail, refuses anything that would weaken the privacy it was configured with or the
header pinned (non-private, another noise, clip or rate) or take its holder past its budget (it does not
have to trust the server), answers a re-delivered instruction with the stored reply, runs one private ZO step
per seed (each step moves its local copy, as in local SGD), records the release and replies with the
scalars, its holder identity and its epsilon only: no loss, batch size or data size leaves the node. The
local moves are then undone: the node's model changes only through the ledger.

The same protocol code serves both runtimes (:class:`Runtime`): a torch replica, or an ONNX Runtime replica
that keeps its trainable entries in numpy; this module imports neither torch nor onnxruntime itself.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, cast

import numpy as np

from seedtune.client import secure_round
from seedtune.client.privacy_ledger import Budget, BudgetExceeded, PrivacyLedger, heldout_budget, request_key
from seedtune.client.zo_step import holder_release, zo_step
from seedtune.shared.protocol.aggregation import coefficient, update_scale
from seedtune.shared.protocol.chain import ChainError, hash_along, header_digest
from seedtune.shared.task.config import ConfigError, RunConfig, cache_root, directions_per_step
from seedtune.shared.engine.follower import LedgerFollower, ReplicaError
from seedtune.shared.protocol.identity import SigningKey, identity_bytes, position_bytes, sign_reply, verify
from seedtune.shared.privacy.noise import Noise, SecureRandom, Skellam
from seedtune.shared.privacy.noise_search import COUNT_SENSITIVITY, count_noise
from seedtune.shared.task.onnx_task import DEFAULT_PROVIDERS
from seedtune.shared.protocol.proto import (PROTOCOL_VERSION, REFUSAL_HISTORY, Challenge, Identity, Instruction,
                                            LedgerHeader, Reply)
from seedtune.shared.task.tasks import DataError, label_counts

log = logging.getLogger(__name__)


class Refusal(RuntimeError):
    """The node will not do the work asked; the message goes back to the server as Reply.refusal, and ``code``
    as Reply.refusal_code (:data:`REFUSAL_HISTORY` when the server's ledger itself is refused)."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


@dataclass
class NodeState:
    """Where this node's replica stands (public: it moves only by the ledger); its spending is in its
    :class:`client.privacy_ledger.PrivacyLedger`, on disk, not here."""

    header: bytes = b""  # serialized LedgerHeader of the federation this node joined
    version: int = 0
    head: bytes = b""
    values: np.ndarray | None = None  # trainable values at `version` (None: the base model's)
    secure: bytes = b""  # the open secure-aggregation round (client.secure_round.Pending), private keys included


@dataclass
class Partition:
    ids: list[list[int]]
    labels: np.ndarray


_ANNOUNCED: set[str] = set()  # simulated holders whose default budget was logged


@dataclass(frozen=True)
class Holder:
    """The data holder this node serves: the identity it states to the server (so the server's accounting
    survives restarts and new node ids), its own budget and its privacy ledger on disk.

    A deployed node must set its own budget; a simulated node that sets none takes the federation's target
    from the ledger header (:meth:`budget_for`). With a ``key`` the node signs its identity and every reply
    (a federation that pins its nodes accepts nothing unsigned). With ``server_key`` (the server's public
    key, node config ``server-key``) it follows only positions that server signed, and only one ledger header
    from it (:func:`_check_server`). Every release from the holder's training data
    is charged to one budget, :attr:`spends` (its name, or ``name/scope`` for a holder that keeps separate
    budgets for separate data sets), whatever subset or order of its records an instruction selects."""

    name: str
    budget: Budget | None
    ledger: PrivacyLedger
    simulated: bool = False
    key: SigningKey | None = None
    scope: str = ""
    server_key: str = ""  # OpenSSH public key line of the server this node follows; "": any server
    # Secure aggregation: charge the budget at the central noise (the sum's, which holds only if the server follows
    # the protocol) rather than at this node's own share (node config trust-secure-aggregation; client.secure_round)
    trusts_secure_sum: bool = False

    @property
    def spends(self) -> str:
        """The privacy ledger's budget for this holder's training data."""
        return f"{self.name}/{self.scope}" if self.scope else self.name

    def budget_for(self, config: RunConfig) -> Budget | None:
        """The budget releases are checked against; None only for a simulated node of a non-private run."""
        if self.budget is not None:
            return self.budget
        if not self.simulated:
            raise Refusal("this deployed node has no privacy budget of its own: set epsilon-budget and delta in "
                          "its node config (the data holder's limit, never taken from the server)")
        if not config.privacy.enabled:
            return None
        if self.name not in _ANNOUNCED:
            _ANNOUNCED.add(self.name)
            log.info("simulated holder %s: no epsilon-budget/delta in its node config; its budget is the "
                     "federation's target (%g, %g)", self.name, config.privacy.epsilon, config.privacy.delta)
        return Budget(config.privacy.epsilon, config.privacy.delta)


RUNTIMES = ("torch", "onnx")


@dataclass(frozen=True)
class Runtime:
    """The engine that runs this node's forward passes (node config ``runtime``): ``torch``, or ``onnx`` for
    ONNX Runtime with numpy only (no torch in the process), from the model ``seedtune export-onnx`` wrote.
    A torch node places its forward passes itself (node config ``device``, ``dtype``; default the ledger
    header's ``model.device`` and ``model.dtype``): each institution picks its own hardware."""

    kind: str = "torch"
    onnx_model: str = ""
    device: str = ""
    dtype: str = ""
    onnx_providers: tuple[str, ...] = DEFAULT_PROVIDERS  # ONNX Runtime execution providers, in preference order

    def __post_init__(self) -> None:
        if self.kind not in RUNTIMES:
            raise ValueError(f"node config runtime={self.kind!r}; choose one of {RUNTIMES}")
        if self.kind == "onnx" and not self.onnx_model:
            raise ValueError("node config runtime='onnx' needs onnx-model=PATH (a model from seedtune export-onnx)")

    def load(self, header: LedgerHeader) -> LedgerFollower:
        """The base replica for this ledger on this runtime (its digests checked against the header)."""
        if self.kind == "onnx":
            from seedtune.client.onnx_runtime import OnnxReplica

            # (a provider this onnxruntime build lacks is an OnnxModelError, a ReplicaError: refused by name)
            return OnnxReplica.from_header(header, self.onnx_model, self.onnx_providers)
        import torch

        from seedtune.shared.engine.replica import Replica

        try:
            replica = Replica.from_header(header, cache_root() / "replicas", self.device or None, self.dtype or None)
        except ConfigError as exc:  # e.g. device=cuda on a node without CUDA: refused by name
            raise Refusal(f"node config: {exc}") from exc
        if replica.config.threads:
            torch.set_num_threads(replica.config.threads)
        return replica


# (runtime, header digest) -> replica: one base model per process, shared by the nodes it serves
_REPLICAS: dict[tuple[Runtime, str], LedgerFollower] = {}


def replica_for(header: LedgerHeader, runtime: Runtime) -> LedgerFollower:
    key = (runtime, header_digest(header))
    if key not in _REPLICAS:
        _REPLICAS.clear()  # one federation per process at a time: do not hold two models in memory
        _REPLICAS[key] = runtime.load(header)
    return _REPLICAS[key]


def _bind(replica: LedgerFollower, state: NodeState) -> None:
    """Point the shared replica at this node's saved position."""
    if state.values is None:
        replica.reset()
    else:
        replica.load_values(state.values, state.version, state.head)


def _adopt_header(ins: Instruction, state: NodeState) -> LedgerHeader:
    followed = LedgerHeader.FromString(state.header) if state.header else None
    if ins.HasField("header"):
        if header_digest(ins.header) != ins.header_digest:
            raise Refusal("the instruction's ledger header does not match its header digest")
        if followed is not None and header_digest(followed) != ins.header_digest:
            log.warning("the server started a new ledger %s; this node starts over from the base model",
                        ins.header_digest[:16])
            # A new ledger over the same private data: start from the base model, keep the privacy ledger.
            state.version, state.head, state.values = 0, b"", None
        state.header = ins.header.SerializeToString(deterministic=True)
        followed = ins.header
    if followed is None:
        raise Refusal("this node has not joined a ledger yet and the instruction carries no header")
    if header_digest(followed) != ins.header_digest:
        raise Refusal(f"instruction for ledger {ins.header_digest[:16]}, this node follows "
                      f"{header_digest(followed)[:16]}; resend with the header")
    return followed


def _check_server(ins: Instruction, holder: Holder) -> None:
    """With a pinned server key: the instruction's position must be signed by it, and its ledger must be the
    one this holder follows from that server (the first one signed by the key that it saw, pinned atomically). A server (or whoever holds its disk) that rewrote its ledger's
    header and recomputed every hash sends another header digest: a fork, refused until the node's operator
    unpins it (``seedtune holder forget-server``). Checked before anything of the instruction is adopted."""
    if not holder.server_key:
        return
    position = position_bytes(ins.header_digest, ins.model_version, ins.tail.head_hash)
    if not (ins.server_signature and verify(holder.server_key, position, ins.server_signature)):
        raise Refusal(f"the instruction for ledger {ins.header_digest[:16]} at version {ins.model_version} is not "
                      f"signed by the server key this node pins (node config server-key)", REFUSAL_HISTORY)
    pinned = holder.ledger.pin_server(holder.name, holder.server_key, ins.header_digest)  # the first one signed
    if pinned != ins.header_digest:
        raise Refusal(f"this node follows ledger {pinned[:16]} from this server; it now sends ledger "
                      f"{ins.header_digest[:16]}: another header from the same server is a fork (a rewritten "
                      f"ledger). Refusing it; the node's operator may accept it with seedtune holder "
                      f"forget-server", REFUSAL_HISTORY)


def _catch_up(ins: Instruction, state: NodeState, runtime: Runtime, holder: Holder) -> LedgerFollower:
    """The shared replica, moved to this node's position and then along the instruction's ledger tail, which
    must still pass through the furthest position this holder's node ever followed (its anchor on disk)."""
    _check_server(ins, holder)
    replica = replica_for(_adopt_header(ins, state), runtime)
    _bind(replica, state)
    before = (replica.version, replica.head)
    replica.catch_up(ins.tail)
    anchor = holder.ledger.followed(holder.name, ins.header_digest)
    if anchor is not None:
        _check_anchor(anchor, ins, before, replica)
    if anchor is None or replica.version > anchor[0]:
        holder.ledger.follow(holder.name, ins.header_digest, replica.version, replica.head)
    state.version, state.head, state.values = replica.version, replica.head, replica.values()
    return replica


def _check_anchor(anchor: tuple[int, bytes], ins: Instruction, before: tuple[int, bytes],
                  replica: LedgerFollower) -> None:
    """Refuse a server whose ledger no longer reaches the node's anchor, or reaches it by another history."""
    version, head = anchor
    if replica.version < version:
        raise Refusal(f"this node followed ledger {ins.header_digest[:16]} to version {version}, but the server's "
                      f"is at version {replica.version}: its ledger went backwards (a restored copy or a lost "
                      f"WAL); refusing to follow it", REFUSAL_HISTORY)
    if version == replica.version:
        seen = replica.head
    elif version == before[0]:
        seen = before[1]
    else:
        seen = hash_along(ins.tail, version)  # type: ignore[assignment]  # None: passed earlier in this process
    if seen is not None and seen != head:
        raise Refusal(f"the server's ledger {ins.header_digest[:16]} differs, up to version {version}, from the "
                      f"history this node followed: it forked or was rewritten; refusing to follow it", REFUSAL_HISTORY)


DataSource = Callable[[LedgerFollower], Partition]  # the node's training partition, tokenized for the replica's model


def identify(challenge: Challenge, node_id: int, holder: Holder) -> Identity:
    """The answer to the server's challenge: the holder this node serves and, with a key, the public key and a
    signature over this run, node, ledger and nonce. It needs neither the model nor the data."""
    identity = Identity(protocol_version=PROTOCOL_VERSION, run_id=challenge.run_id, node=node_id,
                        holder=holder.name)
    if challenge.protocol_version != PROTOCOL_VERSION:
        identity.refusal = f"protocol version {challenge.protocol_version}; this node speaks {PROTOCOL_VERSION}"
        log.warning("node %d will not identify: %s", node_id, identity.refusal)
    elif holder.key is not None:
        identity.public_key = holder.key.public
        identity.signature = holder.key.sign(identity_bytes(challenge.run_id, node_id, holder.name,
                                                            challenge.header_digest, challenge.nonce))
    return identity


def handle_instruction(ins: Instruction, node_id: int, state: NodeState, data: DataSource, holder: Holder,
                       rng: SecureRandom | None = None, runtime: Runtime = Runtime()) -> Reply:
    """Run the instruction and return the reply (a refusal reply if the node declines); updates ``state``.

    A reply that releases anything is in the holder's privacy ledger before this returns."""
    reply = _envelope(ins, node_id, holder, runtime)
    return _refusing_on_error(lambda: _run(ins, state, data, holder, rng or SecureRandom(), runtime, reply), reply,
                              state, holder, f"round {ins.round}")


def _refusing_on_error(work: Callable[[], Reply], reply: Reply, state: NodeState, holder: Holder,
                       what: str) -> Reply:
    """The reply ``work`` returns, or ``reply`` turned into a signed refusal that releases nothing."""
    try:
        return work()
    except (Refusal, ReplicaError, ChainError, BudgetExceeded, secure_round.SecureRefusal) as exc:
        log.warning("node %d refuses %s: %s", reply.node, what, exc)
        reply.refusal = str(exc)
        reply.refusal_code = getattr(exc, "code", "")
        reply.model_version = state.version
        for released in ("scalars", "counts", "metrics", "secure"):
            reply.ClearField(released)
    return sign_reply(reply, holder.key)


def _envelope(ins: Instruction, node_id: int, holder: Holder | None, runtime: Runtime) -> Reply:
    """A reply's envelope; ``runtime`` says the runtime kind until the replica is loaded, then its engine."""
    return Reply(protocol_version=PROTOCOL_VERSION, run_id=ins.run_id, round=ins.round, node=node_id,
                 runtime=runtime.kind, holder=holder.name if holder else "")


def config_refusal(ins: Instruction, node_id: int, reason: str, runtime: Runtime = Runtime()) -> Reply:
    """A reply that does no work, e.g. for a node whose own configuration is unusable."""
    log.error("node %d refuses round %d: %s", node_id, ins.round, reason)
    reply = _envelope(ins, node_id, None, runtime)
    reply.refusal = reason
    return reply


def _load(source: DataSource, replica: LedgerFollower) -> Partition:
    """The node's partition; a bad data file is refused without its details, which quote private records:
    they go to the node's own log only."""
    try:
        return source(replica)
    except DataError as exc:
        log.error("this node's data is unusable: %s", exc)
        raise Refusal("this node's data file is unusable (a bad header or row, or no examples); the details are "
                      "in the node's own log, never sent") from exc


def _privacy_of(ins: Instruction, replica: LedgerFollower, budget: Budget | None) -> Noise | None:
    """The noise the instruction asks for, after checking it keeps the privacy this node was configured with
    and the ledger header pinned: a node never releases more than both allow, whatever the server says."""
    h, config = ins.hyper, replica.config
    if budget is not None and not h.private:
        raise Refusal("a non-private instruction: this node releases only clipped, noised scalars")
    if h.private != config.privacy.enabled:
        raise Refusal(f"instruction private={h.private}, the ledger header says privacy.enabled="
                      f"{config.privacy.enabled}")
    if not h.private:
        return None
    try:
        noise = Noise.from_json(h.noise)
        pinned = Noise.from_json(replica.header.noise_params) if replica.header is not None else None
    except (ValueError, KeyError, TypeError) as exc:
        raise Refusal(f"invalid noise description {h.noise[:200]!r}: {exc}") from exc
    if noise != pinned:
        raise Refusal(f"noise {noise.describe()} differs from the ledger header's "
                      f"{pinned.describe() if pinned else 'none'}")
    # The header's record must be a noise this federation's mode releases: a lattice (Skellam) added to a real
    # sum in a plain round, or real noise under secure aggregation, would be accounted for another mechanism than
    # the one released; and a family other than the configured one is not the privacy the run was set up with.
    secure = config.federation.secure_aggregation != "none"
    if isinstance(noise, Skellam) != secure or (not secure and config.privacy.noise not in ("auto", noise.family)):
        raise Refusal(f"noise {noise.describe()} is not what this federation releases (secure aggregation "
                      f"{config.federation.secure_aggregation!r}, privacy.noise {config.privacy.noise!r})")
    if h.clip != config.privacy.clip or h.sample_rate != config.federation.sample_rate:
        raise Refusal(f"clip {h.clip} / sample rate {h.sample_rate} differ from the ledger header's "
                      f"{config.privacy.clip} / {config.federation.sample_rate}")
    if not (noise.std > 0 and 0 < h.sample_rate <= 1 and h.clip > 0):
        raise Refusal(f"invalid privacy parameters: noise {noise.describe()}, sample rate {h.sample_rate}, "
                      f"clip {h.clip}")
    return noise


def _at_instructed_version(ins: Instruction, state: NodeState, runtime: Runtime, holder: Holder,
                           reply: Reply) -> LedgerFollower:
    """The replica caught up along the instruction's tail, checked to stand where the instruction says."""
    if ins.protocol_version != PROTOCOL_VERSION:
        raise Refusal(f"protocol version {ins.protocol_version}; this node speaks {PROTOCOL_VERSION}")
    replica = _catch_up(ins, state, runtime, holder)
    reply.runtime = replica.engine
    if replica.version != ins.model_version:
        raise Refusal(f"after the tail the replica is at version {replica.version}, the instruction says "
                      f"{ins.model_version}")
    return replica


def _local_round(ins: Instruction, state: NodeState, replica: LedgerFollower, data: Partition, k: int,
                 noise: Noise | None, rng: SecureRandom) -> list[float]:
    """The round's local steps of k directions each, with local progress: every step's privatised scalars (with
    ``noise``), or, without it (the data holder is the privacy unit), every step's plain mean estimates, which the
    caller releases once as a whole. The model is back at the ledger's version afterwards."""
    h = ins.hyper
    microbatch = replica.config.model.microbatch
    scalars: list[float] = []
    losses: list[float] = []
    nonfinite = 0
    try:
        lr = update_scale(h.lr, k)
        for first in range(0, len(ins.seeds), k):
            seeds = tuple(ins.seeds[first : first + k])
            result = zo_step(replica.view, data.ids, data.labels, seeds=seeds, mu=h.mu,
                             sample_rate=h.sample_rate, microbatch=microbatch, rng=rng,
                             clip=h.clip if noise is not None else None, noise=noise)
            scalars.extend(result.scalars)
            losses.append(result.loss)
            nonfinite += result.nonfinite
            # local progress only, a step's entries in one call as every applier makes it (Hadamard frames)
            replica.view.apply_all([(seed, coefficient(lr, s)) for seed, s in zip(seeds, result.scalars)])
    finally:
        # the model moves only by the ledger (state.values: set by the catch-up above)
        replica.load_values(cast(np.ndarray, state.values), state.version, state.head)
    # Kept in the node's own log, never sent: the loss and the non-finite count depend on the private batch.
    log.info("round %d: mean batch loss %.4f, %d non-finite estimates zeroed (local only)", ins.round,
             float(np.nanmean(losses)) if losses else math.nan, nonfinite)
    return scalars


def _run(ins: Instruction, state: NodeState, source: DataSource, holder: Holder, rng: SecureRandom,
         runtime: Runtime, reply: Reply) -> Reply:
    replica = _at_instructed_version(ins, state, runtime, holder, reply)
    h = ins.hyper
    budget = holder.budget_for(replica.config)
    noise = _privacy_of(ins, replica, budget)
    if not (math.isfinite(h.lr) and math.isfinite(h.mu) and h.lr > 0 and h.mu > 0):
        raise Refusal(f"invalid step parameters: lr {h.lr}, mu {h.mu}")
    if not ins.seeds:
        raise Refusal("a train instruction without seeds")
    k = directions_per_step(replica.config.zo.directions, replica.size)  # seeds per local step
    if len(ins.seeds) % k:
        raise Refusal(f"{len(ins.seeds)} seeds are not whole steps of the header's {k} directions")

    data = _load(source, replica)
    if replica.config.federation.secure_aggregation != "none":  # the round is SecAgg+'s four steps
        reply, state.secure = secure_round.begin(ins, reply.node, replica, data.ids, data.labels, holder, budget,
                                                 noise, rng, reply, k,
                                                 lambda: _local_round(ins, state, replica, data, k, None, rng))
        return reply
    request = request_key(ins.header_digest, ins.round, ins.model_version, list(ins.seeds))
    stored = holder.ledger.reply_for(holder.spends, request)
    if stored is not None:  # answered before (a re-delivery): the same bytes, not a second release
        log.info("round %d: instruction already answered; resending the stored reply", ins.round)
        return Reply.FromString(stored)
    # One privacy event per step of k directions on a Poisson sample of the records, or, when the unit is the data
    # holder, one per round at the node's own coin (config.privacy_events)
    per_holder = replica.config.privacy.unit == "holder"
    events, rate = replica.config.privacy_events() if per_holder else (len(ins.seeds) // k, h.sample_rate)
    run = (noise, rate, events)
    epsilon = holder.ledger.check(holder.spends, run, budget)
    prepare = getattr(replica.view, "prepare", None)  # a torch view: each record's frozen part, once, where it pays
    if prepare is not None:
        prepare(data.ids, len(ins.seeds) // k * h.sample_rate)

    scalars = _local_round(ins, state, replica, data, k, None if per_holder else noise, rng)
    if per_holder:  # the round's vector is released once, clipped as a whole and noised (its steps' means are not)
        scalars = list(holder_release(np.asarray(scalars), h.clip, rate, cast(Noise, noise), rng))
    reply.model_version = replica.version
    reply.scalars = np.asarray(scalars, dtype="<f4").tobytes()
    reply.metrics["epsilon"] = epsilon
    sign_reply(reply, holder.key)  # before it is stored: a re-delivery gets the same signed bytes
    holder.ledger.record(holder.spends, request, run, budget, reply.SerializeToString(deterministic=True))
    return reply


def secure_step(ins: Instruction, node_id: int, state: NodeState, holder: Holder,
                runtime: Runtime = Runtime()) -> Reply:
    """Stages 2 to 4 of the secure round this node opened (message type ``train.secure``; client.secure_round):
    checked against the round it keeps, and nothing of the ledger moves."""
    reply = _envelope(ins, node_id, holder, runtime)

    def work() -> Reply:
        if ins.protocol_version != PROTOCOL_VERSION:
            raise Refusal(f"protocol version {ins.protocol_version}; this node speaks {PROTOCOL_VERSION}")
        replica = replica_for(_adopt_header(ins, state), runtime)
        budget = holder.budget_for(replica.config)
        header = replica.header
        noise = Noise.from_json(header.noise_params) if header is not None and header.noise_params else None
        out, state.secure = secure_round.advance(ins, state.secure, holder, budget, noise, reply)
        return out

    return _refusing_on_error(work, reply, state, holder, f"secure step {ins.secure.stage} of round {ins.round}")


def evaluate(ins: Instruction, node_id: int, state: NodeState, heldout: DataSource, holder: Holder,
             rng: SecureRandom | None = None, runtime: Runtime = Runtime()) -> Reply:
    """Catch up, score the final model on this holder's own held-out data and release its per-label counts
    (examples, predicted, correct) plus Gaussian noise of ``federation.node_eval_epsilon``: one release,
    recorded in the holder's privacy ledger under that data set's key before the reply leaves. A re-delivered
    instruction gets the stored reply; a release past the budget is refused."""
    reply = _envelope(ins, node_id, holder, runtime)
    return _refusing_on_error(lambda: _evaluate(ins, state, heldout, holder, rng or SecureRandom(), runtime, reply),
                              reply, state, holder, "the evaluation")


def _evaluate(ins: Instruction, state: NodeState, heldout: DataSource, holder: Holder, rng: SecureRandom,
              runtime: Runtime, reply: Reply) -> Reply:
    replica = _at_instructed_version(ins, state, runtime, holder, reply)
    config = replica.config
    if not config.federation.node_evaluation:
        raise Refusal("the ledger header does not enable federation.node_evaluation: nothing of the held-out "
                      "data is released")
    budget = holder.budget_for(config)
    data = _load(heldout, replica)
    request = request_key(ins.header_digest, ins.round, ins.model_version, [])  # (a train request has seeds)
    stored = holder.ledger.reply_for(heldout_budget(holder.spends), request)
    if stored is not None:
        log.info("evaluation already answered; resending the stored reply")
        return Reply.FromString(stored)
    noise = count_noise(config.privacy, config.federation.node_eval_epsilon)
    run = (noise, 1.0, 1)
    epsilon = holder.ledger.check(heldout_budget(holder.spends), run, budget)
    counts = label_counts(replica.predictions(data.ids), data.labels, len(config.task.labels))
    noised = counts + rng.noise(noise.scaled(COUNT_SENSITIVITY), counts.size).reshape(counts.shape)
    # The exact accuracy stays in the node's own log: only the noised counts leave.
    log.info("held-out evaluation: %d examples, accuracy %.4f (local only)", len(data.labels),
             counts[:, 2].sum() / max(counts[:, 0].sum(), 1))
    reply.model_version = replica.version
    reply.counts.extend(noised.ravel().tolist())
    reply.metrics["epsilon"] = epsilon
    sign_reply(reply, holder.key)
    holder.ledger.record(heldout_budget(holder.spends), request, run, budget,
                         reply.SerializeToString(deterministic=True))
    return reply


def sync(ins: Instruction, node_id: int, state: NodeState, data: DataSource, holder: Holder,
         runtime: Runtime = Runtime()) -> Reply:
    """Catch up without training; report the replica's state digest (the end-of-run consistency check), the
    holder's identity (how the server keys its accounting) and the epsilon its privacy ledger has recorded."""
    reply = _envelope(ins, node_id, holder, runtime)
    try:
        replica = _catch_up(ins, state, runtime, holder)
        reply.runtime = replica.engine
        reply.model_version = replica.version
        reply.state_digest = replica.state_digest()
        budget = holder.budget_for(replica.config)
        if budget is not None:
            reply.metrics["epsilon"] = holder.ledger.epsilon(holder.spends, budget.delta)
    except (Refusal, ReplicaError, ChainError) as exc:
        reply.refusal = str(exc)
        reply.refusal_code = getattr(exc, "code", "")
        reply.model_version = state.version
    return sign_reply(reply, holder.key)

