"""What a federated client does with one server instruction, independent of the transport.

A node keeps, between messages, only its replica's position (version, chain head), its trainable values
at that position, the ledger header it joined, and its own privacy ledger of steps run. Per instruction it
checks the instruction is for this federation, catches up by replaying the ledger tail, refuses work that
would take its own accountant past its budget (it does not have to trust the server's bookkeeping), runs
one private ZO step per seed (each step moves its local copy, as in local SGD), and replies with the
scalars only. The local moves are then undone: the node's model changes only through the ledger.

The same protocol code serves both runtimes (:class:`Runtime`): a torch replica, or an ONNX Runtime replica
that keeps its trainable entries in numpy; this module imports neither torch nor onnxruntime itself.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from client.zo_step import zo_step
from shared.accounting import noise_epsilon
from shared.chain import ChainError, header_digest
from shared.config import cache_root
from shared.follower import LedgerFollower, ReplicaError
from shared.noise import Noise, SecureRandom
from shared.proto import PROTOCOL_VERSION, Instruction, LedgerHeader, Reply

log = logging.getLogger(__name__)


class Refusal(RuntimeError):
    """The node will not do the work asked; the message goes back to the server as Reply.refusal."""


@dataclass
class NodeState:
    header: bytes = b""  # serialized LedgerHeader of the federation this node joined
    version: int = 0
    head: bytes = b""
    values: np.ndarray | None = None  # trainable values at `version` (None: the base model's)
    runs: list[tuple[Noise, float, int]] = field(default_factory=list)  # (noise, sampling rate, steps) runs

    def record(self, noise: Noise, rate: float, count: int) -> None:
        if self.runs and self.runs[-1][:2] == (noise, rate):
            self.runs[-1] = (noise, rate, self.runs[-1][2] + count)
        else:
            self.runs.append((noise, rate, count))

    def runs_json(self) -> str:
        return json.dumps([[n.to_json(), q, c] for n, q, c in self.runs])

    @staticmethod
    def runs_from_json(text: str) -> list[tuple[Noise, float, int]]:
        return [(Noise.from_json(n), float(q), int(c)) for n, q, c in json.loads(text)]


@dataclass(frozen=True)
class Budget:
    """The node's own privacy budget (node config); None: the federation's target from the ledger header."""

    epsilon: float | None = None
    delta: float | None = None


@dataclass
class Partition:
    ids: list[list[int]]
    labels: np.ndarray


RUNTIMES = ("torch", "onnx")


@dataclass(frozen=True)
class Runtime:
    """The engine that runs this node's forward passes (node config ``runtime``): ``torch``, or ``onnx`` for
    ONNX Runtime with numpy only (no torch in the process), from the model ``seedtune export-onnx`` wrote."""

    kind: str = "torch"
    onnx_model: str = ""

    def __post_init__(self) -> None:
        if self.kind not in RUNTIMES:
            raise ValueError(f"node config runtime={self.kind!r}; choose one of {RUNTIMES}")
        if self.kind == "onnx" and not self.onnx_model:
            raise ValueError("node config runtime='onnx' needs onnx-model=PATH (a model from seedtune export-onnx)")

    def load(self, header: LedgerHeader) -> LedgerFollower:
        """The base replica for this ledger on this runtime (its digests checked against the header)."""
        if self.kind == "onnx":
            from client.onnx_runtime import OnnxReplica

            return OnnxReplica.from_header(header, self.onnx_model)
        import torch

        from shared.replica import Replica

        replica = Replica.from_header(header, cache_root() / "replicas")
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


def _catch_up(ins: Instruction, state: NodeState, runtime: Runtime) -> LedgerFollower:
    """The shared replica, moved to this node's position and then along the instruction's ledger tail."""
    replica = replica_for(_adopt_header(ins, state), runtime)
    _bind(replica, state)
    replica.catch_up(ins.tail)
    state.version, state.head, state.values = replica.version, replica.head, replica.values()
    return replica


DataSource = Callable[[LedgerFollower], Partition]  # the node's training partition, tokenized for the replica's model


def handle_instruction(ins: Instruction, node_id: int, state: NodeState, data: DataSource, budget: Budget,
                       rng: SecureRandom | None = None, runtime: Runtime = Runtime()) -> Reply:
    """Run the instruction and return the reply (a refusal reply if the node declines); updates ``state``."""
    reply = Reply(protocol_version=PROTOCOL_VERSION, run_id=ins.run_id, round=ins.round, node=node_id,
                  runtime=runtime.kind)
    try:
        _run(ins, node_id, state, data, budget, rng or SecureRandom(), runtime, reply)
    except (Refusal, ReplicaError, ChainError) as exc:
        log.warning("node %d refuses round %d: %s", node_id, ins.round, exc)
        reply.refusal = str(exc)
        reply.model_version = state.version
        reply.ClearField("scalars")
    return reply


def _run(ins: Instruction, node_id: int, state: NodeState, source: DataSource, budget: Budget,
         rng: SecureRandom, runtime: Runtime, reply: Reply) -> None:
    if ins.protocol_version != PROTOCOL_VERSION:
        raise Refusal(f"protocol version {ins.protocol_version}; this node speaks {PROTOCOL_VERSION}")
    replica = _catch_up(ins, state, runtime)
    if replica.version != ins.model_version:
        raise Refusal(f"after the tail the replica is at version {replica.version}, the instruction says "
                      f"{ins.model_version}")

    h = ins.hyper
    steps = len(ins.seeds)
    privacy = replica.config.privacy
    epsilon_budget = privacy.epsilon if budget.epsilon is None else budget.epsilon
    delta = privacy.delta if budget.delta is None else budget.delta
    noise = None
    if h.private:
        try:
            noise = Noise.from_json(h.noise)
        except (ValueError, KeyError, TypeError) as exc:
            raise Refusal(f"invalid noise description {h.noise[:200]!r}: {exc}") from exc
        if not (noise.std > 0 and 0 < h.sample_rate <= 1 and h.clip > 0):
            raise Refusal(f"invalid privacy parameters: noise {noise.describe()}, sample rate {h.sample_rate}, "
                          f"clip {h.clip}")
        after = noise_epsilon(tuple(state.runs) + ((noise, h.sample_rate, steps),), delta)
        if after > epsilon_budget:
            raise Refusal(f"{steps} more steps would bring this node to epsilon {after:.3f} > its budget "
                          f"{epsilon_budget} (delta {delta})")
    if not (math.isfinite(h.lr) and math.isfinite(h.mu) and h.lr > 0 and h.mu > 0):
        raise Refusal(f"invalid step parameters: lr {h.lr}, mu {h.mu}")

    data = source(replica)
    reply.num_examples = len(data.labels)
    microbatch = replica.config.model.microbatch
    scalars, losses, batch = [], [], 0
    try:
        for seed in ins.seeds:
            result = zo_step(replica.view, data.ids, data.labels, seeds=(seed,), mu=h.mu,
                             sample_rate=h.sample_rate, microbatch=microbatch, rng=rng,
                             clip=h.clip if h.private else None, noise=noise)
            (scalar,) = result.scalars
            scalars.append(scalar)
            losses.append(result.loss)
            batch += result.batch_size
            replica.view.apply(seed, float(np.float32(-h.lr * scalar)))  # local progress only
    finally:
        replica.load_values(state.values, state.version, state.head)  # the model moves only by the ledger
    if noise is not None:
        state.record(noise, h.sample_rate, steps)
    reply.model_version = replica.version
    reply.scalars = np.asarray(scalars, dtype="<f4").tobytes()
    reply.metrics["loss"] = float(np.nanmean(losses)) if losses else float("nan")
    reply.metrics["examples_used"] = float(batch)
    reply.metrics["epsilon"] = noise_epsilon(tuple(state.runs), delta)


def sync(ins: Instruction, node_id: int, state: NodeState, runtime: Runtime = Runtime()) -> Reply:
    """Catch up without training and report the replica's state digest (the end-of-run consistency check)."""
    reply = Reply(protocol_version=PROTOCOL_VERSION, run_id=ins.run_id, round=ins.round, node=node_id,
                  runtime=runtime.kind)
    try:
        replica = _catch_up(ins, state, runtime)
        reply.model_version = replica.version
        reply.model_digest = replica.state_digest()
    except (Refusal, ReplicaError, ChainError) as exc:
        reply.refusal = str(exc)
        reply.model_version = state.version
    return reply
