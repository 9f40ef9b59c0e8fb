"""The protocol: what the server and every node must agree on byte for byte (the wire, the ledger and its
hash chain, identities and signatures, the aggregation rule, digests, anchors)."""
