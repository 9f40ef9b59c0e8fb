"""A transport whose nodes are separate OS processes, with node ids drawn afresh at every launch.

This is what a relaunched simulation or a restarted deployment looks like to the server: the same data
holders behind new Flower node ids, with nothing of the previous processes' memory (no ``context.state``), only
what each holder keeps on disk (its privacy ledger). The crash tests run the server in one process and the
nodes in their own, so a SIGKILL of the server ends the nodes too and a restart meets new ones.

Each node process runs the real ``client.app`` handlers on messages framed over its stdin/stdout (a JSON
header and the payload bytes, each length-prefixed); the parent implements the part of Flower's Grid that
:class:`server.federation.FederatedServer` uses. Run as ``python -m seedtune.simulations.process_grid NODE_ID
NODE_CONFIG_JSON`` for one node.
"""

from __future__ import annotations

import json
import os
import selectors
import struct
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import BinaryIO, Iterable, cast

from flwr.app import ConfigRecord, Context, Message, RecordDict

from seedtune.shared.protocol.wire import RECORD

ROOT = Path(__file__).resolve().parents[1]


def _write(stream: BinaryIO, header: dict, payload: bytes) -> None:
    raw = json.dumps(header).encode()
    stream.write(struct.pack("<II", len(raw), len(payload)) + raw + payload)
    stream.flush()


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = stream.read(n - len(data))
        if not chunk:
            raise EOFError("the other side closed the pipe")
        data += chunk
    return data


def _read(stream: BinaryIO) -> tuple[dict, bytes]:
    head, size = struct.unpack("<II", _read_exact(stream, 8))
    return json.loads(_read_exact(stream, head)), _read_exact(stream, size)


class ProcessGrid:
    def __init__(self, num_nodes: int, node_configs: dict[int, dict] | None = None, run_id: int = 7) -> None:
        self.run = SimpleNamespace(run_id=run_id)
        self.nodes: dict[int, subprocess.Popen] = {}
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        for i in range(num_nodes):
            node_id = int.from_bytes(os.urandom(8), "little") >> 1 or 1  # new at every launch, as Flower's
            config = {"partition-id": i, "num-partitions": num_nodes, "simulated": True,
                      **(node_configs or {}).get(i, {})}
            self.nodes[node_id] = subprocess.Popen(
                [sys.executable, "-m", "seedtune.simulations.process_grid", str(node_id), json.dumps(config)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT, env=env)

    def get_node_ids(self) -> list[int]:
        return sorted(self.nodes)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Deliver every message, then collect the replies that arrive before the timeout (nodes work in
        parallel); a node that dies or stays silent simply sends no reply."""
        pending: dict[int, Message] = {}
        for msg in messages:
            node = self.nodes.get(msg.metadata.dst_node_id)
            if node is None or node.poll() is not None:
                continue
            payload = cast(bytes, msg.content.config_records[RECORD]["payload"])
            try:
                _write(cast(BinaryIO, node.stdin), {"type": msg.metadata.message_type, "run_id": self.run.run_id}, payload)
            except BrokenPipeError:
                continue
            pending[msg.metadata.dst_node_id] = msg
        deadline = time.monotonic() + (timeout if timeout is not None else 600.0)
        replies = []
        with selectors.DefaultSelector() as sel:
            for node_id in pending:
                sel.register(cast(BinaryIO, self.nodes[node_id].stdout), selectors.EVENT_READ, node_id)
            while pending and time.monotonic() < deadline:
                for key, _ in sel.select(timeout=max(0.0, deadline - time.monotonic())):
                    node_id = key.data
                    sel.unregister(key.fileobj)
                    msg = pending.pop(node_id)
                    try:
                        _, payload = _read(cast(BinaryIO, self.nodes[node_id].stdout))
                    except EOFError:
                        continue
                    content = RecordDict({RECORD: ConfigRecord({"payload": payload})})
                    replies.append(Message(content, reply_to=msg))
        return replies

    def close(self) -> None:
        for node in self.nodes.values():
            if node.stdin:
                node.stdin.close()
        for node in self.nodes.values():
            try:
                node.wait(timeout=30)
            except subprocess.TimeoutExpired:
                node.kill()


def _serve(node_id: int, node_config: dict) -> None:
    """One node: answer framed messages with the ClientApp's handlers until the parent goes away."""
    import seedtune.client.app as client_app
    from seedtune.simulations.inprocess import outside_flower

    outside_flower()

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # anything printed must not corrupt the frames
    context = None
    while True:
        try:
            header, payload = _read(stdin)
        except EOFError:
            return
        if context is None:
            context = Context(header["run_id"], node_id, node_config, RecordDict(), {})
        msg = Message(RecordDict({RECORD: ConfigRecord({"payload": payload})}), dst_node_id=node_id,
                      message_type=header["type"], group_id="0")
        handler = client_app.handler_for(header["type"])
        reply = handler(msg, context)
        _write(stdout, {}, reply.content.config_records[RECORD]["payload"])


if __name__ == "__main__":
    _serve(int(sys.argv[1]), json.loads(sys.argv[2]))
