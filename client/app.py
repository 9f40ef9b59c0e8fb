"""The Flower ClientApp: a node's side of the seed/scalar protocol.

The node's state (ledger position, trainable values at that position, privacy ledger) lives in
``context.state``, which Flower keeps for the node across rounds, in simulation and deployment; the base
model is cached per process and, for SmolLM2, de-quantised once to disk. Node config keys:
``partition-id`` and ``num-partitions`` (set by the simulation, or by hand in a deployment),
``epsilon-budget`` and ``delta`` (the institution's own limit; default: the federation's target);
``runtime`` (``torch``, the default, or ``onnx``: forward passes on ONNX Runtime, no torch imported) and
``onnx-model`` (the model written by ``seedtune export-onnx``, for ``runtime=onnx``).
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from client.node import Budget, NodeState, Runtime, handle_instruction, sync
from client.partition import load_partition
from shared.proto import Instruction
from shared.follower import LedgerFollower
from shared.wire import from_content, to_content

log = logging.getLogger(__name__)
STATE = "seedtune-node"
VALUES = "seedtune-values"

app = ClientApp()


def load_state(context: Context) -> NodeState:
    record = context.state.config_records.get(STATE)
    if record is None:
        return NodeState()
    values = context.state.array_records.get(VALUES)
    return NodeState(header=record["header"], version=int(record["version"]), head=record["head"],
                     values=values["values"].numpy() if values is not None else None,
                     runs=NodeState.runs_from_json(record["runs"]))


def save_state(context: Context, state: NodeState) -> None:
    context.state[STATE] = ConfigRecord({"header": state.header, "version": state.version, "head": state.head,
                                         "runs": state.runs_json()})
    if state.values is not None:
        context.state[VALUES] = ArrayRecord({"values": Array(np.ascontiguousarray(state.values))})


def _budget(context: Context) -> Budget:
    cfg = context.node_config
    return Budget(float(cfg["epsilon-budget"]) if "epsilon-budget" in cfg else None,
                  float(cfg["delta"]) if "delta" in cfg else None)


def _data_source(context: Context):
    cfg = context.node_config
    if "partition-id" not in cfg or "num-partitions" not in cfg:
        raise ValueError("node config needs partition-id and num-partitions (flower-supernode --node-config "
                         "\"partition-id=0 num-partitions=2\")")

    def source(replica: LedgerFollower):
        return load_partition(replica.config, replica.task, int(cfg["partition-id"]), int(cfg["num-partitions"]))

    return source


def _runtime(context: Context) -> Runtime:
    cfg = context.node_config
    return Runtime(str(cfg.get("runtime", "torch")), str(cfg.get("onnx-model", "")))


@app.train()
def train(msg: Message, context: Context) -> Message:
    ins = from_content(msg.content, Instruction)
    state = load_state(context)
    reply = handle_instruction(ins, context.node_id, state, _data_source(context), _budget(context),
                               runtime=_runtime(context))
    save_state(context, state)
    return Message(to_content(reply), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    ins = from_content(msg.content, Instruction)
    state = load_state(context)
    reply = sync(ins, context.node_id, state, _runtime(context))
    save_state(context, state)
    return Message(to_content(reply), reply_to=msg)
