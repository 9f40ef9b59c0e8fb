"""Python classes generated from protos/seedtune.proto (regenerate with ``python -m shared.proto.generate``).

The generated modules are committed so that neither a client nor the server needs the protobuf compiler;
``tests/test_protos.py`` fails when they fall out of sync with the .proto file.
"""

from shared.proto.seedtune_pb2 import (  # noqa: F401  (re-exported)
    Hyperparameters,
    Instruction,
    LedgerEntry,
    LedgerHeader,
    LedgerTail,
    Reply,
)

PROTOCOL_VERSION = 2  # Instruction/Reply semantics; a receiver refuses any other (2: Reply.holder)
LEDGER_FORMAT_VERSION = 2  # LedgerHeader.format_version written and accepted (2: instructions by holder)
