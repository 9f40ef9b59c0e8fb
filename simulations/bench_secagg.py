"""What SecAgg+ costs a round, by the number of nodes M: ``python -m seedtune.simulations.bench_secagg --json``.

One round of shared.protocol.secagg in process, for each M: every node advertises its keys, shares its seed and
masking key among its neighbours, masks a vector of ``--length`` words (the round's quantised, Skellam-noised
scalars: 10 for the DP-ZO recipe's 10 local steps of one direction, 10,240 for ten head-stage steps over
SST-2's 1,024-direction frame), and the survivors answer the unmasking; ``--drop`` of the nodes drop after
sharing, so the server also rebuilds their masking keys and removes their pairwise masks. Reported per M:

- ``server_s``: the server's own work (forwarding keys and shares, rebuilding every seed and dropped key from
  its shares, regenerating and removing the masks), timed apart from the nodes';
- ``node_s``: one node's work (keys, Shamir shares, encryption, masks, decryption), the median over nodes;
- ``up_bytes`` and ``down_bytes`` per node: what the protocol's four steps carry (PEM keys, Fernet ciphertexts,
  the 8-byte masked words, the shares it returns; the survivors' lists), against ``plain_up_bytes``, the float32
  scalars a node sends today;
- whether the unmasked sum equals the sum of the survivors' vectors.

The neighbourhood is SecAgg+'s sparse graph: ``--degree`` nodes (itself included; default the smallest odd
number >= 2 log2 M + 1: 2 ceil(log2 M) + 1, and all M when that covers them), rebuilt from ``threshold`` = just over half its shares
(Bell et al. 2020). Run it alone: the machine has two cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import numpy as np

from seedtune.shared.privacy.noise import SecureRandom
from seedtune.shared.protocol.secagg import NodeSession, RoundGraph, ServerSession, default_degree


def one_round(m: int, length: int, drop: float, degree: int | None = None) -> dict[str, Any]:
    rng = SecureRandom()
    ring = tuple(int(n) for n in np.argsort(rng.uniform(m)) + 1)  # the server's shuffled order
    degree = degree or default_degree(m)
    size = min(degree, m)
    graph = RoundGraph(ring, degree, size // 2 + 1, length, b"bench-round")
    vectors = {n: (rng.uniform(length) * 2**20).astype(np.int64) - 2**19 for n in ring}
    dropped = set(ring[:: max(1, round(1 / drop))][: int(drop * m)]) if drop > 0 else set()
    node_s = {n: 0.0 for n in ring}
    up = {n: 0 for n in ring}
    down = {n: 0 for n in ring}

    def timed(n: int, work):
        start = time.process_time()
        out = work()
        node_s[n] += time.process_time() - start
        return out

    server_s = 0.0
    nodes = {n: timed(n, lambda n=n: NodeSession(n, graph)) for n in ring}
    server = ServerSession(graph)
    for n, s in nodes.items():
        keys = timed(n, s.advertise)
        server.keys[n] = keys
        up[n] += len(keys.encryption) + len(keys.masking)
    for n, s in nodes.items():
        start = time.process_time()
        peers = server.peers_of(n)
        server_s += time.process_time() - start
        down[n] += sum(len(k.encryption) + len(k.masking) for k in peers.values())
        server.shared[n] = timed(n, lambda s=s, peers=peers: s.share(peers))
        up[n] += sum(len(c) for c in server.shared[n].values())
    masked = {}
    for n, s in nodes.items():
        start = time.process_time()
        inbox = server.inbox(n)
        server_s += time.process_time() - start
        down[n] += sum(len(c) for c in inbox.values())
        y = timed(n, lambda s=s, n=n, inbox=inbox: s.masked(vectors[n], inbox))
        if n not in dropped:
            masked[n] = y
            up[n] += y.nbytes
    answers = {}
    for n in masked:
        start = time.process_time()
        survivors, gone = server.unmask_request(n, masked)
        server_s += time.process_time() - start
        down[n] += 8 * (len(survivors) + len(gone))
        answers[n] = timed(n, lambda n=n, survivors=survivors, gone=gone: nodes[n].unmask(survivors, gone))
        up[n] += sum(len(share) for _, share in answers[n].values())
    start = time.process_time()
    total = server.total(masked, answers)
    server_s += time.process_time() - start
    live = [n for n in ring if n not in dropped]
    return {"nodes": m, "degree": size, "threshold": graph.threshold, "length": length, "dropped": len(dropped),
            "server_s": round(server_s, 4), "node_s": round(statistics.median(node_s[n] for n in live), 4),
            "up_bytes": int(statistics.median(up[n] for n in live)),
            "down_bytes": int(statistics.median(down[n] for n in live)), "plain_up_bytes": 4 * length,
            "sum_ok": bool(np.array_equal(total, sum(vectors[n] for n in live)))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--length", type=int, nargs="+", default=[10, 10240])
    parser.add_argument("--drop", type=float, default=0.1, help="share of the nodes that drop after sharing")
    parser.add_argument("--degree", type=int, default=None, help="neighbourhood size (default: O(log M))")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args(argv)
    if not 0 <= args.drop < 0.5 or any(m < 2 for m in args.nodes) or any(n < 1 for n in args.length):
        print(f"bench_secagg: --drop must be in [0, 0.5), --nodes >= 2, --length >= 1 (got {args.drop}, "
              f"{args.nodes}, {args.length})", file=sys.stderr)
        return 2
    for m in args.nodes:
        for length in args.length:
            row = one_round(m, length, args.drop, args.degree)
            print(json.dumps(row) if args.json else "  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
