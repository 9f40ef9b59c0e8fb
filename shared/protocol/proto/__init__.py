"""Python classes generated from protos/seedtune.proto (regenerate with
``python -m seedtune.shared.protocol.proto.generate``).

The generated modules are committed so that neither a client nor the server needs the protobuf compiler;
``tests/test_protos.py`` fails when they fall out of sync with the .proto file.
"""

from seedtune.shared.protocol.proto.seedtune_pb2 import (  # noqa: F401  (re-exported)
    Challenge,
    Hyperparameters,
    Identity,
    Instruction,
    LedgerHeader,
    LedgerTail,
    PeerKeys,
    Reply,
    SecureReply,
    SecureStep,
    ShareAnswer,
)

# Instruction/Reply semantics; a receiver refuses any other (2: Reply.holder; 3: tails of aggregated entries
# without nodes, Reply.state_digest, no noise_multiplier; 4: a node is identified by Challenge/Identity before it
# is sent anything of the ledger, and a node with a key signs its replies; 5: the evaluate message, a node's
# noised label counts on its own held-out data in Reply.counts; 6: Instruction.server_signature, signed ledger
# positions a node pinning the server's key requires, and Reply.refusal_code)
PROTOCOL_VERSION = 6
# Reply.refusal_code of a node that refuses the server's ledger itself (not signed by the key it pins, behind or
# beside the position it followed, or another header from that server): a server all of whose nodes say so stops.
REFUSAL_HISTORY = "history"
# LedgerHeader.format_version written and accepted (2: instructions by holder; 3: one entry per seed per round,
# entries hashed without a node, per-reply provenance table, rounds record their rule and learning rate;
# 4: Gaussian directions are the 16-bit quantised normal of shared.engine.directions, not Box-Muller; 5: the round
# chain: each round's rounds row, replies and instructions hashed into its record, chained from the header)
LEDGER_FORMAT_VERSION = 5
# Older formats still read, with the direction kinds whose stream has not changed since
LEDGER_FORMATS_READ = {3: ("rademacher",), 4: ("rademacher", "gaussian"), 5: ("rademacher", "gaussian", "hadamard")}
