"""SecAgg+ over uint64 (shared.protocol.secagg): the server learns the sum of the survivors' vectors, nothing else."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from seedtune.shared.privacy.noise import SecureRandom, Skellam
from seedtune.shared.privacy.skellam import quantize
from seedtune.shared.protocol.secagg import NodeSession, PublicKeys, RoundGraph, SecAggError, ServerSession, mask


def _round(ring, degree, threshold, vectors, drop_after_sharing=(), drop_before_sharing=()):
    """One round in process: what the server receives at each step, and the sum it rebuilds."""
    graph = RoundGraph(tuple(ring), degree, threshold, len(next(iter(vectors.values()))), b"ledger-digest/round-3")
    nodes = {n: NodeSession(n, graph) for n in ring}
    server = ServerSession(graph)
    server.keys = {n: s.advertise() for n, s in nodes.items() if n not in drop_before_sharing}
    server.shared = {n: nodes[n].share(server.peers_of(n)) for n in server.keys}
    masked = {n: nodes[n].masked(vectors[n], server.inbox(n)) for n in server.shared if n not in drop_after_sharing}
    answers = {n: nodes[n].unmask(*server.unmask_request(n, masked)) for n in masked}
    return masked, answers, server.total(masked, answers)


def _masked(vectors: dict[int, np.ndarray], graph: RoundGraph, view=None):
    """Stages 1 to 3 of a round in process (``view``: the graph a node is shown, default the round's): the
    nodes' sessions, the server's session and the masked vectors."""
    nodes = {n: NodeSession(n, (view or {}).get(n, graph)) for n in vectors}
    server = ServerSession(graph)
    server.keys = {n: s.advertise() for n, s in nodes.items()}
    server.shared = {n: s.share(server.peers_of(n)) for n, s in nodes.items()}
    return nodes, server, {n: s.masked(vectors[n], server.inbox(n)) for n, s in nodes.items()}


def _noised(m: int, length: int) -> dict[int, np.ndarray]:
    """What nodes mask in a secure-aggregation round: clipped examples' sums, rounded, plus Skellam shares."""
    rng = SecureRandom()
    return {100 + i: quantize(rng.uniform(length)[None, :] - 0.5, 3200.0, rng)[0]
            + Skellam.integers(rng, length, 4e6 / m) for i in range(m)}


@pytest.mark.parametrize("m, degree, threshold", [(2, 2, 2), (5, 5, 3), (12, 5, 3), (12, 7, 5)])
def test_the_unmasked_sum_is_the_sum_of_the_quantised_noised_vectors(m, degree, threshold):
    vectors = _noised(m, 16)
    _, _, total = _round(vectors, degree, threshold, vectors)
    assert total.dtype == np.int64
    assert np.array_equal(total, sum(vectors.values()))


def test_every_masked_vector_the_server_receives_is_uniform_over_the_field():
    """However small or structured a node's input (here the same noised integers for every node, and zeros), the
    words the server receives are uniform over Z_2^64: chi-square of their top and bottom bytes, and no
    correlation with the input."""
    m, length = 8, 4096
    vectors = _noised(m, length)
    vectors[100] = np.zeros(length, dtype=np.int64)
    masked, _, total = _round(vectors, 5, 3, vectors)
    for node, y in masked.items():
        assert y.dtype == np.uint64 and y.shape == (length,)
        for byte in (y >> np.uint64(56), y & np.uint64(255)):
            counts = np.bincount(byte.astype(np.int64), minlength=256)
            assert stats.chisquare(counts).pvalue > 1e-4, node
        if vectors[node].any():  # (a constant input has no correlation to measure)
            signed = y.view(np.int64).astype(np.float64)
            assert abs(np.corrcoef(signed, vectors[node].astype(np.float64))[0, 1]) < 0.1
    assert np.array_equal(total, sum(vectors.values()))


def test_a_node_that_drops_after_sharing_is_unmasked_from_the_survivors():
    vectors = _noised(9, 8)
    masked, answers, total = _round(vectors, 9, 5, vectors, drop_after_sharing={104, 107})
    assert set(masked) == set(vectors) - {104, 107}
    assert np.array_equal(total, sum(v for n, v in vectors.items() if n not in {104, 107}))
    # the survivors gave the dropped nodes' key shares and the survivors' seed shares, never both for one node
    kinds = {(j, kind) for replies in answers.values() for j, (kind, _) in replies.items()}
    assert {j for j, kind in kinds if kind == "key"} == {104, 107}
    assert not {j for j, kind in kinds if kind == "seed"} & {104, 107}


def test_a_node_that_drops_before_sharing_is_left_out():
    vectors = _noised(6, 8)
    _, _, total = _round(vectors, 6, 4, vectors, drop_before_sharing={102})
    assert np.array_equal(total, sum(v for n, v in vectors.items() if n != 102))


def test_fewer_survivors_than_the_threshold_cannot_be_unmasked():
    vectors = _noised(5, 4)
    with pytest.raises(SecAggError, match="below the threshold"):
        _round(vectors, 5, 4, vectors, drop_after_sharing={100, 101})


def test_a_node_never_gives_both_shares_of_one_neighbour():
    """A server that says a node survived, then that it dropped, would hold both its seed and its masking key and
    could remove every mask from its vector: the second request is refused."""
    vectors = _noised(5, 4)
    nodes, _, _ = _masked(vectors, RoundGraph(tuple(vectors), 5, 3, 4, b"ctx"))
    everyone = set(vectors)
    nodes[100].unmask(everyone, set())
    with pytest.raises(SecAggError, match="given already"):
        nodes[100].unmask(everyone - {103}, {103})
    with pytest.raises(SecAggError, match="both surviving and dropped"):
        nodes[101].unmask(everyone, {103})


def test_a_forged_own_key_or_stray_peer_is_refused():
    graph = RoundGraph((1, 2, 3, 4, 5, 6, 7), 3, 2, 4, b"ctx")
    nodes = {n: NodeSession(n, graph) for n in graph.ring}
    keys = {n: s.advertise() for n, s in nodes.items()}
    with pytest.raises(SecAggError, match="outside its neighbourhood"):
        nodes[1].share({j: keys[j] for j in (7, 1, 2, 4)})
    with pytest.raises(SecAggError, match="another key as this node's own"):
        nodes[1].share({7: keys[7], 1: keys[2], 2: keys[2]})


@pytest.mark.parametrize("ring, degree, threshold, message", [
    ((1,), 1, 1, "at least two"), ((1, 1, 2), 3, 2, "at least two distinct"),
    ((1, 2, 3, 4, 5), 4, 3, "odd number"), ((1, 2, 3, 4, 5), 5, 2, "above half"),
    ((1, 2, 3), 3, 4, "above half")])
def test_a_bad_round_graph_is_refused_by_name(ring, degree, threshold, message):
    with pytest.raises(SecAggError, match=message):
        RoundGraph(ring, degree, threshold, 4, b"ctx")


def test_masks_are_the_keyed_chacha20_stream_and_differ_by_round():
    key = bytes(range(32))
    first, again, other = mask(key, b"round-1", 64), mask(key, b"round-1", 64), mask(key, b"round-2", 64)
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    with pytest.raises(SecAggError, match="32 bytes"):
        mask(b"short", b"round-1", 4)


def test_a_share_that_rebuilds_nothing_is_a_named_refusal_not_a_crash():
    vectors = _noised(5, 4)
    nodes, server, masked = _masked(vectors, RoundGraph(tuple(vectors), 5, 3, 4, b"ctx"))
    answers = {n: nodes[n].unmask(*server.unmask_request(n, masked)) for n in masked}
    answers[100] = {j: (kind, b"\x01\x00\x00\x00" + bytes(48)) for j, (kind, _) in answers[100].items()}
    answers[101] = {j: (kind, b"garbage") for j, (kind, _) in answers[101].items()}
    answers[102] = {j: ("key", share) for j, (_, share) in answers[102].items()}  # not what it was asked: ignored
    with pytest.raises(SecAggError):
        server.total(masked, answers)


def test_a_node_shown_another_round_masks_with_streams_that_do_not_cancel():
    """The graph is hashed into every mask: a node given another ring than its neighbours (a server isolating it)
    leaves masks in the sum instead of revealing its vector."""
    vectors = _noised(5, 8)
    ring = tuple(vectors)
    graph = RoundGraph(ring, 5, 3, 8, b"ctx")
    other = RoundGraph(ring[::-1], 5, 3, 8, b"ctx")  # same nodes, another order
    nodes, server, masked = _masked(vectors, graph, view={100: other})
    answers = {n: nodes[n].unmask(*server.unmask_request(n, masked)) for n in masked}
    total = server.total(masked, answers)
    assert np.abs(total.astype(np.float64)).max() > 1e15  # garbage the server's range check refuses


def test_a_malformed_advertised_key_is_refused_by_the_node_that_receives_it():
    graph = RoundGraph((1, 2, 3), 3, 2, 4, b"ctx")
    nodes = {n: NodeSession(n, graph) for n in graph.ring}
    keys = {n: s.advertise() for n, s in nodes.items()}
    keys[2] = PublicKeys(b"junk", keys[2].masking)
    with pytest.raises(SecAggError, match="node 2's advertised key"):
        nodes[1].share(keys)
