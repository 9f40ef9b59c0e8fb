"""An in-process transport for fast tests of the server loop and the ClientApp's handlers.

It implements the part of Flower's Grid that :class:`server.federation.FederatedServer` uses and delivers
each message to the real ``client.app`` handlers with a per-node :class:`flwr.app.Context`, exactly as a
SuperNode would, minus the network. ``tamper`` lets a test rewrite or drop replies in flight. The real
Flower paths (simulation, deployment) are covered by tests/test_flower.py; simulations/soak.py uses this
transport to run hundreds of rounds with injected faults in minutes.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Callable, Iterable

from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import seedtune.client.app as client_app



def outside_flower() -> None:
    """Give Flower the task identity it stamps on messages, for messages made outside a Flower runtime (this
    transport, simulations.process_grid's nodes, bench_scale's load generator)."""
    TaskIdentity.run_id = TaskIdentity.run_id if TaskIdentity._run_id is not None else 7
    TaskIdentity.node_id = TaskIdentity.node_id if TaskIdentity._node_id is not None else 1
    TaskIdentity.task_id = TaskIdentity.task_id if TaskIdentity._task_id is not None else 1


outside_flower()


class InProcessGrid:
    def __init__(self, num_nodes: int, run_config: dict | None = None, node_configs: dict[int, dict] | None = None,
                 run_id: int = 7, first_id: int = (1 << 63) + 1000, privacy_ledger: str = "") -> None:
        """``first_id``: node ids are first_id + partition (above 2^63 by default, as real Flower ids can be);
        another value is what a relaunched simulation looks like: same partitions, new node ids.
        ``privacy_ledger``: the simulated holders' privacy ledger (default: client.privacy_ledger's location); a
        benchmark that simulates fresh holders every run points it into its run folder."""
        self.run = SimpleNamespace(run_id=run_id)
        ids = [first_id + i for i in range(num_nodes)]
        self.contexts = {
            nid: Context(run_id, nid, {"partition-id": i, "num-partitions": num_nodes, "simulated": True,
                                       **({"privacy-ledger": privacy_ledger} if privacy_ledger else {}),
                                       **(node_configs or {}).get(i, {})},
                         RecordDict(), run_config or {})
            for i, nid in enumerate(ids)
        }
        self.tamper: Callable[[Message], Message | None] | None = None
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            self.sent.append(msg)
            handler = client_app.handler_for(msg.metadata.message_type)
            reply = handler(msg, self.contexts[msg.metadata.dst_node_id])
            if self.tamper is not None:
                reply = self.tamper(reply)
            if reply is not None:
                replies.append(reply)
        return replies
