"""The server's courier: sends the protocol's messages over Flower's Grid, meters their bytes, and keeps how far
each node holds the ledger, so that a node is sent only the tail it lacks.

Each distinct ledger position's instruction is serialized and measured once, and its bytes are shared by every
node at that position: the cost of a round grows with the number of distinct positions, not of nodes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from flwr.app import Message

from seedtune.shared.protocol.aggregation import ACCEPTED, MASKED
from seedtune.shared.protocol.identity import AllowedNodes
from seedtune.shared.protocol.ledger import Provenance
from seedtune.shared.protocol.proto import REFUSAL_HISTORY, Instruction, Reply
from seedtune.shared.protocol.wire import IDENTIFY, SYNC, TRAIN, WireError, content_of, from_content, payload_length, \
    wire_bytes
from seedtune.server.round import BELOW_MIN_REPLIES, REFUSED_HISTORY, RoundPlan, signed

log = logging.getLogger(__name__)


@dataclass
class Delivery:
    """What one send brought back: the replies, the downlink bytes per node, and the seconds spent building
    the instructions (``tail``) and waiting for the replies (``transport``)."""

    replies: list[Any]
    down: dict[int, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


class Courier:
    def __init__(self, grid: Any, timeout_s: float) -> None:
        self.grid, self.timeout_s = grid, timeout_s
        self.known_version: dict[int, int] = {}  # how far each node holds the ledger, as far as the server knows

    @property
    def run_id(self) -> int:
        return self.grid.run.run_id

    def live(self) -> list[int]:
        return list(self.grid.get_node_ids())

    def _exchange(self, messages: list[Message]) -> list[Any]:
        return list(self.grid.send_and_receive(messages, timeout=self.timeout_s))

    def challenge(self, nodes: Iterable[int], payload: bytes, rnd: int) -> list[Any]:
        """Send a serialized identity challenge to ``nodes``; their answers."""
        return self._exchange([Message(content_of(payload), dst_node_id=n, message_type=IDENTIFY,
                                       group_id=str(rnd)) for n in nodes])

    def send(self, plan: RoundPlan, instruction: Callable[[int], Instruction], message_type: str = "") -> Delivery:
        """Send each of the plan's nodes ``instruction(start)``, ``start`` being where its ledger stops."""
        t0 = time.perf_counter()
        payloads: dict[int, bytes] = {}  # ledger position -> the serialized instruction
        sizes: dict[int, int] = {}  # ledger position -> its wire bytes (messages differ only in their ids)
        delivery = Delivery([])
        messages = []
        for node in plan.nodes:
            start = min(self.known_version.get(node, 0), plan.version)
            if start not in payloads:
                payloads[start] = instruction(start).SerializeToString(deterministic=True)
            msg = Message(content_of(payloads[start]), dst_node_id=node,
                          message_type=message_type or (TRAIN if plan.hyper is not None else SYNC),
                          group_id=str(plan.round))
            if start not in sizes:
                sizes[start] = wire_bytes(msg)
            delivery.down[node] = sizes[start]
            messages.append(msg)
        t1 = time.perf_counter()
        delivery.replies = self._exchange(messages)
        delivery.timings = {"tail": t1 - t0, "transport": time.perf_counter() - t1}
        return delivery

    def send_each(self, rnd: int, instructions: Mapping[int, Instruction], message_type: str) -> Delivery:
        """Send each node its own instruction (a secure round's later stages: each node's keys, shares or
        unmasking request differ); their replies and downlink bytes."""
        t0 = time.perf_counter()
        messages = [Message(content_of(ins.SerializeToString(deterministic=True)), dst_node_id=node,
                            message_type=message_type, group_id=str(rnd)) for node, ins in instructions.items()]
        delivery = Delivery([], {m.metadata.dst_node_id: wire_bytes(m) for m in messages})
        t1 = time.perf_counter()
        delivery.replies = self._exchange(messages)
        delivery.timings = {"tail": t1 - t0, "transport": time.perf_counter() - t1}
        return delivery

    @staticmethod
    def uplink(replies: list[Any], max_bytes: int) -> dict[int, int]:
        """The wire bytes of each node's reply. One too long or of the wrong shape counts its payload only (it
        is refused unparsed); replies of one payload length differ only in their ids, so each length is
        measured once."""
        up: dict[int, int] = {}
        sizes: dict[int, int] = {}
        for msg in replies:
            length = payload_length(msg)
            if length > max_bytes or (length < 0 and not msg.has_error()):
                up[msg.metadata.src_node_id] = max(length, 0)
                continue
            if length not in sizes:
                sizes[length] = wire_bytes(msg)
            up[msg.metadata.src_node_id] = sizes[length]
        return up

    def settle(self, provenance: list[Provenance], version: int) -> None:
        """After a round: a node whose reply was valid holds the ledger at ``version``; one that refused is
        resent it from the start, header included (it skips what it already has)."""
        for p in provenance:
            if p.status in (ACCEPTED, MASKED, BELOW_MIN_REPLIES):
                self.known_version[p.node] = version
            elif p.status in ("refused", REFUSED_HISTORY):
                self.known_version[p.node] = 0

    def query(self, plan: RoundPlan, instruction: Callable[[int], Instruction], message_type: str,
              holders: Mapping[int, str], pins: AllowedNodes | None) -> tuple[dict[int, Reply], int]:
        """Send the plan's nodes a query or an evaluate message (catch up, no training): their valid,
        non-refusing replies by node, and how many replies refused this server's ledger itself."""
        history = 0  # replies refusing this server's ledger itself (Reply.refusal_code "history")
        out = {}
        for msg in self.send(plan, instruction, message_type).replies:
            src = msg.metadata.src_node_id
            try:
                reply = from_content(msg.content, Reply) if not msg.has_error() else None
            except WireError:
                reply = None
            if reply is not None and reply.refusal:
                log.warning("node %d refused the %s: %s", src, message_type, reply.refusal)
                history += reply.refusal_code == REFUSAL_HISTORY
            elif reply is not None and not signed(reply, holders.get(src), pins):
                log.warning("node %d: the query reply is not signed by its pinned key; ignored", src)
            elif reply is not None and reply.node == src and reply.model_version == plan.version:
                out[src] = reply
                self.known_version[src] = plan.version
        return out, history
