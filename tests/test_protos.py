"""The wire/ledger protobufs: generated code in sync with protos/, and messages that round-trip."""

from __future__ import annotations

import numpy as np
import pytest

from seedtune.shared.protocol.proto import Instruction, LedgerHeader, Reply
from seedtune.shared.protocol.proto.generate import stale_files
from seedtune.shared.protocol.wire import WireError, from_content, to_content


def test_generated_code_matches_the_proto_files():
    assert stale_files() == [], "run: python -m seedtune.shared.protocol.proto.generate"


def test_instruction_and_reply_round_trip_with_uint64_ids():
    ins = Instruction(protocol_version=1, run_id=2**64 - 1, round=7, model_version=123, header_digest="ab" * 32,
                      seeds=[0, 2**64 - 1, 12345])
    ins.hyper.lr, ins.hyper.clip, ins.hyper.sample_rate = 1e-3, 0.4512345678901, 0.0012
    ins.tail.seeds.extend([5, 6])
    ins.tail.coeffs.extend([np.float32(0.1), np.float32(-3e-7)])
    back = Instruction.FromString(ins.SerializeToString())
    assert back == ins
    assert back.hyper.clip == 0.4512345678901  # double: the client checks the exact values the header pinned
    assert back.tail.coeffs[0] == np.float32(0.1)


def test_reply_costs_four_bytes_per_step():
    def size(k: int) -> int:
        return len(Reply(protocol_version=1, run_id=9, round=3, node=2**63 + 5, model_version=400,
                         scalars=np.ones(k, "<f4").tobytes(), holder="partition-3-of-10").SerializeToString())

    assert size(200) - size(100) == 4 * 100


def test_from_content_names_what_is_wrong():
    from flwr.app import ConfigRecord, RecordDict

    assert from_content(to_content(LedgerHeader(noise="gaussian")), LedgerHeader).noise == "gaussian"
    with pytest.raises(WireError, match=r"must hold the 'seedtune' config record alone; it holds \[\]"):
        from_content(RecordDict(), Reply)
    with pytest.raises(WireError, match=r"alone; it holds \['extra', 'seedtune'\]"):  # nothing rides along
        from_content(RecordDict({"seedtune": ConfigRecord({"payload": b""}), "extra": ConfigRecord({"b": b"x"})}),
                     Reply)
    with pytest.raises(WireError, match=r"'payload' alone; it holds \['more', 'payload'\]"):
        from_content(RecordDict({"seedtune": ConfigRecord({"payload": b"", "more": b"x"})}), Reply)
    with pytest.raises(WireError, match="not a valid seedtune.v1.Reply"):
        from_content(RecordDict({"seedtune": ConfigRecord({"payload": b"\xff\xff\xff"})}), Reply)
    with pytest.raises(WireError, match="exceeds the limit"):
        from_content(RecordDict({"seedtune": ConfigRecord({"payload": b"x" * 100})}), Reply, max_bytes=10)
