"""The Flower ClientApp: a node's side of the seed/scalar protocol.

The node's replica position (ledger version, trainable values at that position) lives in ``context.state``,
which Flower keeps for the node across rounds; what the node has released from its data lives in its data
holder's privacy ledger on disk (client.privacy_ledger), which outlives the process, the run and the node id. The
base model is cached per process and, for SmolLM2, de-quantised once to disk. Node config keys:
``partition-id`` and ``num-partitions`` (set by the simulation, or by hand in a deployment);
``epsilon-budget`` and ``delta`` (the data holder's own limit: required on a deployed node; a simulated node
without them takes the federation's target); ``holder`` (the stable name the server accounts this holder by;
default ``partition-I-of-N``), charged for all its training data whatever an instruction selects;
``budget-scope`` (optional: a separate budget, for a separate data set of the same holder); ``privacy-ledger``
(its file; default client.privacy_ledger.default_path(); a deployed node refuses to run without it);
``simulated`` (true for simulated nodes; ``$SEEDTUNE_SIMULATION=1`` says the same for a whole process);
``runtime`` (``torch``, the default, or ``onnx``: forward passes on ONNX Runtime, no torch imported),
``onnx-model`` (the model written by ``seedtune export-onnx``, for ``runtime=onnx``), ``onnx-providers``
(its ONNX Runtime execution providers, comma-separated, in order of preference; default
``CPUExecutionProvider``), ``device`` and ``dtype`` (where a torch node runs its forward passes: ``auto``,
``cpu``, ``cuda``, ``cuda:N``, ``mps``; ``float32``, ``bfloat16``, ``float16``; default the ledger header's)
``data-path`` and ``test-path`` (the institution's own training and held-out files, or folders with
train/test files; they never leave the node) and ``node-key`` (the
node's private key, OpenSSH or PEM: it signs the node's identity and replies; required to join a federation
that pins its nodes, see shared.protocol.identity) and ``server-key`` (the server's public key, a ``.pub`` file: the
node then follows only ledger positions that server signed, and only one ledger header from it; a simulated
node takes ``$SEEDTUNE_SERVER_KEY`` when its config names none, as scripts/simulate.sh sets it) and
``trust-secure-aggregation`` (true: in a secure-aggregation federation, charge the holder's budget at the central
noise of the sum, which holds only while the server follows the protocol; false, a deployed node's default: at
the node's own share of the noise, the guarantee it keeps against any server; client.secure_round).

Five message types: ``query.identify`` (which holder this node serves, signed; nothing of the ledger comes
with it), ``train`` (catch up, private steps; with secure aggregation, the round's first SecAgg+ stage),
``train.secure`` (the later SecAgg+ stages, client.secure_round), ``query`` (catch up, report the state digest)
and ``evaluate`` (catch up, release the noised label counts of the node's held-out data, when the ledger header
enables federation.node_evaluation).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from seedtune.client.privacy_ledger import Budget, open_privacy_ledger
from seedtune.client.node import DataSource, Holder, NodeState, Runtime, handle_instruction, identify as identity_of
from seedtune.client.node import config_refusal, evaluate as evaluate_heldout, secure_step, sync
from seedtune.client.partition import load_own_data, load_partition
from seedtune.shared.protocol.identity import SigningKey, load_public
from seedtune.shared.task.onnx_task import DEFAULT_PROVIDERS
from seedtune.shared.protocol.proto import PROTOCOL_VERSION, Challenge, Identity, Instruction, Reply
from seedtune.shared.engine.follower import LedgerFollower
from seedtune.shared.protocol.wire import EVALUATE, IDENTIFY, SECURE, SYNC, TRAIN, from_content, to_content

log = logging.getLogger(__name__)
STATE = "seedtune-node"
SIMULATION_ENV = "SEEDTUNE_SIMULATION"  # "1": this process runs simulated nodes (scripts/simulate.sh sets it)
SERVER_KEY_ENV = "SEEDTUNE_SERVER_KEY"  # simulated nodes: the server's public key file (scripts/simulate.sh)
VALUES = "seedtune-values"

app = ClientApp()


def load_state(context: Context) -> NodeState:
    record = context.state.config_records.get(STATE)
    if record is None:
        return NodeState()
    values = context.state.array_records.get(VALUES)
    return NodeState(header=cast(bytes, record["header"]), version=cast(int, record["version"]),
                     head=cast(bytes, record["head"]),
                     values=values["values"].numpy() if values is not None else None,
                     secure=cast(bytes, record.get("secure", b"")))


def save_state(context: Context, state: NodeState) -> None:
    context.state[STATE] = ConfigRecord({"header": state.header, "version": state.version, "head": state.head,
                                         "secure": state.secure})
    if state.values is not None:
        context.state[VALUES] = ArrayRecord({"values": Array(np.ascontiguousarray(state.values))})


class NodeConfigError(ValueError):
    """The node config is missing a value this node needs, or has a bad one."""


def simulated(context: Context) -> bool:
    """A node of a simulation (``flwr run`` on one machine, or the in-process grid): its data holders are
    simulated too, so their budget may default to the federation's target."""
    return bool(context.node_config.get("simulated")) or os.environ.get(SIMULATION_ENV) == "1"


def _holder(context: Context) -> Holder:
    """The data holder this node serves, from the node config: ``holder`` (its stable name; default the
    partition), ``budget-scope`` (a separate budget for a separate data set of the same holder),
    ``epsilon-budget`` and ``delta`` (required on a deployed node), ``privacy-ledger`` (a deployed node's must
    exist: ``seedtune holder init``; a simulated holder's is created on first use), ``node-key``,
    ``server-key``."""
    cfg = context.node_config
    name = str(cfg.get("holder") or f"partition-{cfg.get('partition-id')}-of-{cfg.get('num-partitions')}")
    scope = str(cfg.get("budget-scope", "") or "")
    if "#" in name or "#" in scope or "/" in scope:
        raise NodeConfigError(f"node config holder={name!r} budget-scope={scope!r}: '#' (and '/' in a scope) are "
                              f"reserved for the privacy ledger's budget names")
    ledger = open_privacy_ledger(str(cfg.get("privacy-ledger", "")) or None, create=simulated(context))
    budget = None
    if "epsilon-budget" in cfg or "delta" in cfg:
        try:
            budget = Budget(float(cfg["epsilon-budget"]), float(cfg["delta"]))
        except KeyError as exc:
            raise NodeConfigError(f"node config sets one of epsilon-budget and delta but not {exc}: set both")
        except ValueError as exc:
            raise NodeConfigError(f"node config: {exc}") from exc
    key = SigningKey.load(str(cfg["node-key"])) if cfg.get("node-key") else None  # IdentityError names the file
    server = str(cfg.get("server-key", "") or (os.environ.get(SERVER_KEY_ENV, "") if simulated(context) else ""))
    server_key = load_public(server, "node config server-key") if server else ""
    trust = cfg.get("trust-secure-aggregation", simulated(context))
    if str(trust).lower() not in ("true", "false", "1", "0"):
        raise NodeConfigError(f"node config trust-secure-aggregation={trust!r}: true or false")
    return Holder(name, budget, ledger, simulated(context), key, scope, server_key,
                  trusts_secure_sum=str(trust).lower() in ("true", "1"))


def _data_source(context: Context):
    """The node's training data: its own file (``data-path``, read as the ledger's task reads it; it never
    leaves the node), else its partition of the task's training split (``partition-id``, ``num-partitions``)."""
    cfg = context.node_config
    own = str(cfg.get("data-path", "") or "")
    if own:
        if not cfg.get("holder"):
            raise NodeConfigError("node config sets data-path but no holder: name the data holder whose budget "
                                  "this data spends (holder=...)")
        return lambda replica: load_own_data(replica.config, replica.task, own)
    if "partition-id" not in cfg or "num-partitions" not in cfg:
        raise ValueError("node config needs data-path (this institution's own training file) or partition-id and "
                         "num-partitions (flower-supernode --node-config \"partition-id=0 num-partitions=2\")")

    def source(replica: LedgerFollower):
        return load_partition(replica.config, replica.task, int(cfg["partition-id"]), int(cfg["num-partitions"]))

    return source


def _heldout_source(context: Context) -> DataSource:
    """The node's held-out data for the evaluate message: its own test file (``test-path``: a file, or a
    folder's test file; by default the test file of a ``data-path`` folder), else a simulated node's partition of
    the task's test split."""
    cfg = context.node_config
    own, train = str(cfg.get("test-path", "") or ""), str(cfg.get("data-path", "") or "")
    if not own and train and Path(train).is_dir():
        own = train
    if own:
        if not cfg.get("holder"):
            raise NodeConfigError("node config sets test-path but no holder: name the data holder whose budget "
                                  "this data spends (holder=...)")
        return lambda replica: load_own_data(replica.config, replica.task, own, "test")
    if cfg.get("data-path") or "partition-id" not in cfg or "num-partitions" not in cfg:
        raise NodeConfigError("this node has no held-out data to evaluate on: set test-path (its own test file)")
    return lambda replica: load_partition(replica.config, replica.task, int(cfg["partition-id"]),
                                          int(cfg["num-partitions"]), "test")


def _runtime(context: Context) -> Runtime:
    cfg = context.node_config
    providers = str(cfg.get("onnx-providers", "") or ",".join(DEFAULT_PROVIDERS))
    return Runtime(str(cfg.get("runtime", "torch")), str(cfg.get("onnx-model", "")), str(cfg.get("device", "")),
                   str(cfg.get("dtype", "")), tuple(p.strip() for p in providers.split(",") if p.strip()))


def _node(context: Context) -> tuple[Holder, Runtime, DataSource]:
    """What the node config says this node is: its data holder, runtime and data (ValueError if unusable)."""
    return _holder(context), _runtime(context), _data_source(context)


def _answer(msg: Message, context: Context, work: Callable[[Instruction, NodeState, Holder, Runtime, DataSource], Reply],
            heldout: bool = False) -> Message:
    """The reply to an instruction-carrying message: ``work`` on this node's holder, runtime, data (its held-out
    data with ``heldout``) and saved state, kept for the next message; or a refusal naming what is wrong with the
    node's own config, before any work."""
    ins = from_content(msg.content, Instruction)
    try:
        holder, runtime, data = _node(context)
        if heldout:
            data = _heldout_source(context)
    except ValueError as exc:  # NodeConfigError included: refuse by name rather than fail the ClientApp
        return Message(to_content(config_refusal(ins, context.node_id, str(exc))), reply_to=msg)
    state = load_state(context)
    reply = work(ins, state, holder, runtime, data)
    save_state(context, state)
    return Message(to_content(reply), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _answer(msg, context, lambda ins, state, holder, runtime, data: handle_instruction(
        ins, context.node_id, state, data, holder, runtime=runtime))


@app.train("secure")
def train_secure(msg: Message, context: Context) -> Message:
    """Stages 2 to 4 of a secure-aggregation round (client.secure_round); its state stays in the node's context."""
    return _answer(msg, context, lambda ins, state, holder, runtime, data: secure_step(
        ins, context.node_id, state, holder, runtime))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _answer(msg, context, lambda ins, state, holder, runtime, heldout: evaluate_heldout(
        ins, context.node_id, state, heldout, holder, runtime=runtime), heldout=True)


@app.query("identify")
def identify(msg: Message, context: Context) -> Message:
    challenge = from_content(msg.content, Challenge)
    try:
        holder, _, _ = _node(context)
    except ValueError as exc:  # a node that cannot work says so now, before it is sent the ledger
        log.error("node %d will not identify: %s", context.node_id, exc)
        identity = Identity(protocol_version=PROTOCOL_VERSION, run_id=challenge.run_id, node=context.node_id,
                            refusal=str(exc))
        return Message(to_content(identity), reply_to=msg)
    return Message(to_content(identity_of(challenge, context.node_id, holder)), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    return _answer(msg, context, lambda ins, state, holder, runtime, data: sync(
        ins, context.node_id, state, data, holder, runtime))


HANDLERS = {TRAIN: train, SECURE: train_secure, SYNC: query, IDENTIFY: identify, EVALUATE: evaluate}  # message type -> handler


def handler_for(message_type: str):
    """The handler Flower's ClientApp routes ``message_type`` to, for transports that call it directly
    (simulations.inprocess, simulations.process_grid, simulations.soak)."""
    return HANDLERS[message_type]
