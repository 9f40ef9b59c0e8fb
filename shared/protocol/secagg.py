"""SecAgg+ (Bell et al., CCS 2020) over integer vectors modulo 2^64: the server learns only the sum.

Each node masks its vector ``x_i`` (the quantised, Skellam-noised scalars of shared.privacy.skellam) as

    y_i = x_i + PRG(b_i) + sum_{j neighbour of i} sign(i, j) PRG(s_ij)   (mod 2^64)

with ``b_i`` a fresh secret seed, ``s_ij`` the key i and j agree by ECDH (sign +1 for i before j in the round's
ring, -1 after, so the pairwise masks cancel in the sum) and every PRG output uniform over Z_2^64. Each node
Shamir-shares ``b_i`` and its ECDH masking key among its neighbours, encrypted to each, through the server. After
the masked vectors, each surviving node gives the server, per neighbour, either the share of ``b_j`` (j sent a
vector) or the share of j's masking key (j dropped), never both: the server removes the survivors' self masks and
the dropped nodes' pairwise masks, and learns the sum of the survivors' vectors, nothing else, as long as at
least ``threshold`` neighbours answer for each.

The cryptography is Flower's SecAgg+ primitives: EC key pairs (flwr.supercore.primitives.asymmetric), ECDH with
HKDF and Fernet (flwr.common.secure_aggregation.crypto.symmetric_encryption), Shamir's sharing
(flwr.common.secure_aggregation.crypto.shamir, PyCryptodome). The mask generator is not Flower's
``pseudo_rand_gen``, which XORs the seed down to 32 bits, draws from numpy's Mersenne Twister and never draws the
top value of the range: the masks here are the ChaCha20 keystream keyed by the 32-byte secret (the
``cryptography`` package, as shared.privacy.noise's CSPRNG), read as uint64 words, exactly uniform modulo 2^64.

The round's neighbour graph is Flower's: the sampled nodes in an order the server shuffles, each node with the
``degree // 2`` nodes on either side of it and itself. A node checks what it is asked (its place in the ring, a
threshold above half its neighbourhood, no neighbour both dropped and surviving) and refuses otherwise; it is
pure of Flower's messages, so the same code runs in simulation, deployment and the tests.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.supercore.primitives.asymmetric import (bytes_to_private_key, bytes_to_public_key, generate_key_pairs,
                                                  private_key_to_bytes, public_key_to_bytes)

SEED_BYTES = 32


class SecAggError(ValueError):
    """A step of the protocol a party will not take (a bad configuration, a share or key that does not check,
    a request that would reveal a node's input); the message names what."""


@dataclass(frozen=True)
class RoundGraph:
    """Who masks with whom in one round: ``ring`` is the sampled nodes in the server's shuffled order; each node's
    neighbourhood is itself and the ``degree // 2`` nodes each side (all of them when ``degree`` covers the
    ring); a secret is rebuilt from ``threshold`` of its neighbourhood's shares."""

    ring: tuple[int, ...]
    degree: int
    threshold: int
    length: int  # uint64 words per vector
    context: bytes  # binds masks and shares to this federation and round (the ledger's header digest and round)

    @functools.cached_property
    def binding(self) -> bytes:
        """The round's context with the whole graph hashed in: a node given another view of the round than its
        neighbours (another ring, degree or threshold) masks with streams theirs do not cancel, and the sum is
        garbage the server's range check refuses, instead of an unmasked vector."""
        graph = json.dumps([list(self.ring), self.degree, self.threshold, self.length]).encode()
        return self.context + b"/" + hashlib.sha256(graph).digest()

    def __post_init__(self) -> None:
        if len(set(self.ring)) != len(self.ring) or len(self.ring) < 2:
            raise SecAggError(f"a round needs at least two distinct nodes, got {list(self.ring)}")
        if self.degree < 2 or self.degree % 2 == 0 and self.degree < len(self.ring):
            raise SecAggError(f"degree {self.degree}: an odd number of neighbours (itself included) of at least 3, "
                              f"or the whole ring")
        size = min(self.degree, len(self.ring))
        if not size // 2 < self.threshold <= size:
            raise SecAggError(f"threshold {self.threshold} must be above half the {size} nodes of a neighbourhood "
                              f"(else two disjoint halves could rebuild both secrets of one node) and at most all")
        if self.length < 1:
            raise SecAggError(f"vector length must be >= 1, got {self.length}")

    @functools.cached_property
    def _position(self) -> dict[int, int]:
        return {node: at for at, node in enumerate(self.ring)}

    def neighbours(self, node: int) -> tuple[int, ...]:
        """``node``'s neighbourhood, itself included, in ring order."""
        n = len(self.ring)
        if self.degree >= n:
            return self.ring
        at, half = self._position[node], self.degree // 2
        return tuple(self.ring[(at + offset) % n] for offset in range(-half, half + 1))

    def before(self, a: int, b: int) -> bool:
        return self._position[a] < self._position[b]


def round_context(header_digest: str, rnd: int, version: int) -> bytes:
    """What binds a round's masks to its federation, round and ledger position (server and node alike)."""
    return f"{header_digest}/{rnd}/{version}".encode()


def default_degree(nodes: int) -> int:
    """SecAgg+'s O(log M) neighbourhood: 2 ceil(log2 M) + 1 nodes (odd, itself included), or all M when that
    covers them (Bell et al. 2020)."""
    degree = 2 * math.ceil(math.log2(max(nodes, 2))) + 1
    return nodes if degree >= nodes else degree


def mask(secret: bytes, context: bytes, length: int) -> np.ndarray:
    """``length`` uint64 words of the ChaCha20 keystream keyed by ``secret`` (32 bytes), its nonce from a hash of
    ``context`` (the federation and round): uniform over Z_2^64, the same on every machine."""
    if len(secret) != SEED_BYTES:
        raise SecAggError(f"a mask key has {SEED_BYTES} bytes, got {len(secret)}")
    nonce = bytes(4) + hashlib.sha256(context).digest()[:12]  # block counter 0; the round's context as the nonce
    stream = Cipher(algorithms.ChaCha20(secret, nonce), mode=None).encryptor()
    return np.frombuffer(stream.update(bytes(8 * length)), dtype="<u8").astype(np.uint64)


def _pair_key(private: ec.EllipticCurvePrivateKey, public_pem: bytes) -> bytes:
    """The 32 bytes two nodes agree on by ECDH (Flower's HKDF-SHA256 derivation, urlsafe-base64 for Fernet)."""
    return generate_shared_key(private, public_key(public_pem))


def public_key(pem: bytes) -> ec.EllipticCurvePublicKey:
    """An advertised public key, or :class:`SecAggError` if it is not one (a party never fails on another's
    malformed key: it refuses by name)."""
    try:
        key = bytes_to_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise SecAggError(f"not a PEM EC public key ({exc})") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise SecAggError(f"not an EC public key: {type(key).__name__}")
    return key


@dataclass(frozen=True)
class PublicKeys:
    """What a node advertises: its key for encrypting shares to it, and its key for agreeing pairwise masks."""

    encryption: bytes
    masking: bytes

    def check(self) -> None:
        """Both keys parse as public keys, or a :class:`SecAggError`."""
        public_key(self.encryption), public_key(self.masking)


def _pack(src: int, dst: int, seed_share: bytes, key_share: bytes) -> bytes:
    return b"".join([src.to_bytes(8, "little"), dst.to_bytes(8, "little"), len(seed_share).to_bytes(4, "little"),
                     seed_share, key_share])


def _unpack(plain: bytes) -> tuple[int, int, bytes, bytes]:
    cut = 20 + int.from_bytes(plain[16:20], "little")
    return int.from_bytes(plain[:8], "little"), int.from_bytes(plain[8:16], "little"), plain[20:cut], plain[cut:]


@dataclass
class NodeSession:
    """One node's side of one round: advertise keys, share its secrets, mask its vector, answer the unmasking.
    Its keys and seed are fresh for the round and never leave it except as shares."""

    node: int
    graph: RoundGraph
    _encryption: ec.EllipticCurvePrivateKey = field(init=False, repr=False)
    _masking: ec.EllipticCurvePrivateKey = field(init=False, repr=False)
    _seed: bytes = field(default_factory=lambda: os.urandom(SEED_BYTES), repr=False)
    _peers: dict[int, PublicKeys] = field(default_factory=dict, repr=False)
    _channels: dict[int, bytes] = field(default_factory=dict, repr=False)  # peer -> Fernet key of the pair
    _received: dict[int, bytes] = field(default_factory=dict, repr=False)
    _answered: dict[int, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.node not in self.graph.ring:
            raise SecAggError(f"node {self.node} is not in this round's ring")
        self._encryption, self._masking = generate_key_pairs()[0], generate_key_pairs()[0]
        self._keys = PublicKeys(public_key_to_bytes(self._encryption.public_key()),
                                public_key_to_bytes(self._masking.public_key()))

    def advertise(self) -> PublicKeys:
        return self._keys

    def dump(self) -> bytes:
        """The session's whole state, private keys and seed included, for the node's own storage between the
        round's messages (Flower's context state): never sent."""
        return json.dumps({
            "node": self.node, "ring": list(self.graph.ring), "degree": self.graph.degree,
            "threshold": self.graph.threshold, "length": self.graph.length, "context": self.graph.context.hex(),
            "encryption": private_key_to_bytes(self._encryption).decode(),
            "masking": private_key_to_bytes(self._masking).decode(), "seed": self._seed.hex(),
            "peers": {str(j): [k.encryption.decode(), k.masking.decode()] for j, k in self._peers.items()},
            "received": {str(j): c.hex() for j, c in self._received.items()},
            "answered": {str(j): kind for j, kind in self._answered.items()}}, sort_keys=True).encode()

    @classmethod
    def load(cls, data: bytes) -> NodeSession:
        d = json.loads(data)
        graph = RoundGraph(tuple(d["ring"]), d["degree"], d["threshold"], d["length"], bytes.fromhex(d["context"]))
        session = cls(int(d["node"]), graph, _seed=bytes.fromhex(d["seed"]))
        session._encryption = bytes_to_private_key(d["encryption"].encode())
        session._masking = bytes_to_private_key(d["masking"].encode())
        session._keys = PublicKeys(public_key_to_bytes(session._encryption.public_key()),
                                   public_key_to_bytes(session._masking.public_key()))
        session._peers = {int(j): PublicKeys(e.encode(), m.encode()) for j, (e, m) in d["peers"].items()}
        session._received = {int(j): bytes.fromhex(c) for j, c in d["received"].items()}
        session._answered = {int(j): str(kind) for j, kind in d["answered"].items()}
        return session

    def _channel(self, peer: int) -> bytes:
        if peer not in self._channels:
            self._channels[peer] = _pair_key(self._encryption, self._peers[peer].encryption)
        return self._channels[peer]

    def share(self, peers: dict[int, PublicKeys]) -> dict[int, bytes]:
        """Given the neighbours' advertised keys (the server forwards those it got): this node's seed and masking
        key, Shamir-shared among them, each share encrypted to its holder. Fewer than ``threshold`` neighbours
        (itself included) would leave nothing to rebuild from: refused."""
        hood = self.graph.neighbours(self.node)
        stray = set(peers) - set(hood)
        if stray:
            raise SecAggError(f"node {self.node} was sent keys of nodes outside its neighbourhood: {sorted(stray)}")
        if peers.get(self.node) != self._keys:
            raise SecAggError(f"node {self.node}: the server forwarded another key as this node's own")
        if len(peers) < self.graph.threshold:
            raise SecAggError(f"node {self.node}: {len(peers)} neighbours advertised keys, fewer than the "
                              f"threshold {self.graph.threshold}")
        for j, keys in peers.items():
            try:
                keys.check()
            except SecAggError as exc:
                raise SecAggError(f"node {self.node}: node {j}'s advertised key: {exc}") from exc
        self._peers = dict(peers)
        order = [j for j in hood if j in peers]
        seed_shares = create_shares(self._seed, self.graph.threshold, len(order))
        key_shares = create_shares(private_key_to_bytes(self._masking), self.graph.threshold, len(order))
        return {j: encrypt(self._channel(j), _pack(self.node, j, s, k))
                for j, s, k in zip(order, seed_shares, key_shares)}

    def masked(self, vector: np.ndarray, received: dict[int, bytes]) -> np.ndarray:
        """``vector`` (int64 or uint64, ``length`` words) under the self mask and the pairwise masks with every
        neighbour whose shares reached this node (``received``: sender -> ciphertext); the ciphertexts are kept
        for the unmasking."""
        values = np.asarray(vector)
        if values.shape != (self.graph.length,) or values.dtype.kind not in "iu":
            raise SecAggError(f"node {self.node}: a vector of {self.graph.length} integers, got {values.dtype} "
                              f"{values.shape}")
        if self.node not in received or set(received) - set(self._peers):
            raise SecAggError(f"node {self.node}: shares from {sorted(received)}, which must include its own and "
                              f"come from nodes that advertised keys")
        if len(received) < self.graph.threshold:
            raise SecAggError(f"node {self.node}: shares from {len(received)} neighbours, below the threshold "
                              f"{self.graph.threshold}")
        self._received = dict(received)
        out = values.astype(np.int64).view(np.uint64) + mask(self._seed, self.graph.binding, self.graph.length)
        for j in received:
            if j != self.node:
                out = _add_pairwise(out, self._masking, self._peers[j].masking, self.graph,
                                    1 if self.graph.before(self.node, j) else -1)
        return out

    def unmask(self, survivors: set[int], dropped: set[int]) -> dict[int, tuple[str, bytes]]:
        """Per neighbour, the share the server needs: of its seed if it sent a masked vector (``survivors``), of its
        masking key if it dropped after sharing (``dropped``). A neighbour named in both, or asked the other way
        than before, would let the server remove both masks from one vector: refused."""
        if survivors & dropped:
            raise SecAggError(f"node {self.node}: nodes {sorted(survivors & dropped)} are named both surviving and "
                              f"dropped")
        if self.node not in survivors:
            raise SecAggError(f"node {self.node} sent its masked vector but is not among the survivors")
        live = survivors & set(self._received)
        if len(live) < self.graph.threshold:
            raise SecAggError(f"node {self.node}: {len(live)} surviving neighbours, below the threshold "
                              f"{self.graph.threshold}: the sum would be of too few nodes")
        answers: dict[int, tuple[str, bytes]] = {}
        for j, ciphertext in self._received.items():
            kind = "seed" if j in survivors else "key" if j in dropped else ""
            if not kind:
                continue
            if self._answered.setdefault(j, kind) != kind:
                raise SecAggError(f"node {self.node}: node {j}'s {self._answered[j]} share was given already; "
                                  f"refusing its {kind} share")
            src, dst, seed_share, key_share = _unpack(decrypt(self._channel(j), ciphertext))
            if (src, dst) != (j, self.node):
                raise SecAggError(f"node {self.node}: a share addressed {src} -> {dst} arrived as {j} -> {self.node}")
            answers[j] = (kind, seed_share if kind == "seed" else key_share)
        return answers


def _add_pairwise(total: np.ndarray, private: ec.EllipticCurvePrivateKey, public_pem: bytes, graph: RoundGraph,
                  sign: int) -> np.ndarray:
    """``total`` plus (``sign`` = 1) or minus the pairwise mask of the key pair (private, public)."""
    pairwise = mask(base64.urlsafe_b64decode(_pair_key(private, public_pem)), graph.binding, graph.length)
    return total + pairwise if sign > 0 else total - pairwise


@dataclass
class ServerSession:
    """The server's side of one round: route keys and shares, then rebuild the masks and return the sum."""

    graph: RoundGraph
    keys: dict[int, PublicKeys] = field(default_factory=dict)
    shared: dict[int, dict[int, bytes]] = field(default_factory=dict)  # sender -> receiver -> ciphertext

    def peers_of(self, node: int) -> dict[int, PublicKeys]:
        """The advertised keys of ``node``'s neighbourhood, for the sharing step."""
        return {j: self.keys[j] for j in self.graph.neighbours(node) if j in self.keys}

    def inbox(self, node: int) -> dict[int, bytes]:
        """The ciphertexts addressed to ``node``, by sender, for the masking step."""
        return {src: out[node] for src, out in self.shared.items() if node in out}

    def unmask_request(self, node: int, masked: dict[int, np.ndarray]) -> tuple[set[int], set[int]]:
        """Whom ``node`` is asked about: its neighbours that sent a masked vector, and those that shared but did
        not."""
        hood = [j for j in self.graph.neighbours(node) if j in self.shared]
        return {j for j in hood if j in masked}, {j for j in hood if j not in masked}

    def total(self, masked: dict[int, np.ndarray], answers: dict[int, dict[int, tuple[str, bytes]]]) -> np.ndarray:
        """The sum (int64, two's complement of the uint64 sum) of the survivors' vectors: every survivor's seed
        and every dropped node's masking key rebuilt from at least ``threshold`` shares, their masks removed.
        Only the shares each node was asked for count (:meth:`unmask_request`); a share that rebuilds nothing
        is a :class:`SecAggError`, never a crash."""
        context, length = self.graph.binding, self.graph.length
        total = np.zeros(length, dtype=np.uint64)
        for y in masked.values():
            total = total + np.asarray(y, dtype=np.uint64)
        shares: dict[tuple[int, str], list[bytes]] = {}
        for node, replies in answers.items():
            survivors, dropped_ones = self.unmask_request(node, masked)
            for j, (kind, share) in replies.items():
                if (kind == "seed" and j in survivors) or (kind == "key" and j in dropped_ones):
                    shares.setdefault((j, kind), []).append(share)
        dropped = set(self.shared) - set(masked)
        for node in masked:
            total = total - mask(self._rebuild(shares, node, "seed"), context, length)
        for node in dropped:
            try:
                key = bytes_to_private_key(self._rebuild(shares, node, "key"))
            except (ValueError, TypeError) as exc:
                raise SecAggError(f"node {node}'s rebuilt masking key is not a key ({exc})") from exc
            for j in self.graph.neighbours(node):
                if j in masked and j in self.shared[node]:  # j masked with node's key: undo j's sign
                    total = _add_pairwise(total, key, self.keys[j].masking, self.graph,
                                          -1 if self.graph.before(j, node) else 1)
        return total.view(np.int64)

    def _rebuild(self, shares: dict[tuple[int, str], list[bytes]], node: int, kind: str) -> bytes:
        found = shares.get((node, kind), [])
        if len(found) < self.graph.threshold:
            raise SecAggError(f"node {node}'s {kind}: {len(found)} shares, below the threshold "
                              f"{self.graph.threshold}; the round cannot be unmasked")
        try:
            return combine_shares(found[: self.graph.threshold])
        except (ValueError, TypeError, IndexError) as exc:  # a share that is not one: the round is not unmasked
            raise SecAggError(f"node {node}'s {kind} cannot be rebuilt from the shares given ({exc})") from exc
