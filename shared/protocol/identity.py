"""Node identities: the list of keys a federation pins, and what a node signs with its own key.

Flower's SuperNode authentication says only that a node's key was registered with the SuperLink, and in Flower
1.41 anyone who can reach the SuperLink's Control API can register one (docs/deployment.md, "Threat model").
A federation that names its members therefore pins them itself: ``federation.allowed_nodes`` is a file of
``HOLDER PUBLIC-KEY`` lines whose digest goes into the ledger header. Before a node is sent anything of the
ledger it answers a :class:`~shared.protocol.proto.Identity` signed over the server's fresh nonce, and every reply it
sends afterwards is signed too, so a node that is not on the list gets no instruction and moves nothing, and a
listed node cannot speak for another holder. Keys are OpenSSH or PEM files: ECDSA on a NIST curve (the kind
Flower's node authentication also takes, so one key may serve both) or Ed25519.

The server signs too (``federation.server_key``): every instruction carries its signature over the ledger
position it brings the node to (:func:`position_bytes`), and every committed round's position is signed in the
ledger. A node configured with the server's public key (node config ``server-key``) follows only signed
positions and pins, per server key, the one ledger header it follows (client.node): a rewritten header from the
same server is a fork, refused until the node's operator says otherwise.

The signed bytes are domain-separated, so a signature over an identity never verifies as one over a reply or a
ledger position.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from seedtune.shared.protocol.proto import Reply

IDENTIFY_CONTEXT = b"seedtune identify v1\x00"
REPLY_CONTEXT = b"seedtune reply v1\x00"
POSITION_CONTEXT = b"seedtune position v1\x00"
ROUND_CONTEXT = b"seedtune round v1\x00"
NONCE_BYTES = 32
_HASHES: dict[int, Callable[[], hashes.HashAlgorithm]] = {256: hashes.SHA256, 384: hashes.SHA384, 521: hashes.SHA512}  # the hash OpenSSH pairs with each curve


class IdentityError(ValueError):
    """A key file, an allowed-nodes list or a node's identity that cannot be used; the message names it."""


def _check_kind(key: Any, where: str) -> None:
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        if key.curve.key_size not in _HASHES:
            raise IdentityError(f"{where}: ECDSA curve {key.curve.name} is not supported (use P-256, P-384 or P-521)")
    elif not isinstance(key, (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey)):
        raise IdentityError(f"{where}: a {type(key).__name__.lstrip('_')}; node keys are ECDSA (NIST curves) or Ed25519")


def public_line(key: Any) -> str:
    """The OpenSSH public key line of ``key`` (private or public), without a comment: how lists name keys."""
    public = key.public_key() if hasattr(key, "public_key") else key
    return public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def parse_public_line(text: str, where: str) -> str:
    """The canonical form (type and base64, no comment) of an OpenSSH public key line; IdentityError if it is
    not an ECDSA or Ed25519 key."""
    try:
        key = serialization.load_ssh_public_key(" ".join(text.split()[:2]).encode())
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise IdentityError(f"{where}: not an OpenSSH public key ({exc})") from exc
    _check_kind(key, where)
    return public_line(key)


def verify(public: str, data: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is the holder of ``public`` (an OpenSSH line) signing ``data``."""
    key = serialization.load_ssh_public_key(public.encode())
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, data, ec.ECDSA(_HASHES[key.curve.key_size]()))
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, data)
        else:  # a kind node keys cannot be (AllowedNodes refuses it on load)
            return False
    except InvalidSignature:
        return False
    return True


def load_public(path: str | Path, setting: str) -> str:
    """The canonical OpenSSH line of the public key in file ``path`` (a ``.pub`` file; ``setting`` names the
    option that gave it, for the error message)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise IdentityError(f"{setting} {str(path)!r}: cannot read it ({exc})") from exc
    return parse_public_line(text.strip(), f"{setting} {str(path)!r}")


@dataclass(frozen=True)
class SigningKey:
    """A private key that signs: a node's (node config ``node-key``) or the server's (``federation.server_key``);
    an OpenSSH or PEM file without a passphrase."""

    path: str
    key: Any

    @classmethod
    def load(cls, path: str | Path, setting: str = "node-key") -> "SigningKey":
        where = f"{setting} {str(path)!r}"
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise IdentityError(f"{where}: cannot read it ({exc.strerror})") from exc
        key = None
        for loader in (serialization.load_ssh_private_key, serialization.load_pem_private_key):
            try:
                key = loader(raw, password=None)
                break
            except (ValueError, TypeError, UnsupportedAlgorithm):
                continue
        if key is None:
            raise IdentityError(f"{where}: not an OpenSSH or PEM private key without a passphrase")
        _check_kind(key, where)
        return cls(str(path), key)

    @property
    def public(self) -> str:
        return public_line(self.key)

    def sign(self, data: bytes) -> bytes:
        if isinstance(self.key, ec.EllipticCurvePrivateKey):
            return self.key.sign(data, ec.ECDSA(_HASHES[self.key.curve.key_size]()))
        return self.key.sign(data)


def identity_bytes(run_id: int, node: int, holder: str, header_digest: str, nonce: bytes) -> bytes:
    """What a node signs to identify itself: this run, this node id, this holder, this ledger, this challenge."""
    body = json.dumps({"run_id": run_id, "node": node, "holder": holder, "header_digest": header_digest,
                       "nonce": nonce.hex()}, sort_keys=True, separators=(",", ":"))
    return IDENTIFY_CONTEXT + body.encode()


def position_bytes(header_digest: str, version: int, head: bytes) -> bytes:
    """What the server signs: ledger ``header_digest`` stands at ``version`` entries with chain hash ``head``.
    The chain runs from the header's hash through every entry, so one signature vouches for the whole history
    up to that position (shared.protocol.chain)."""
    body = json.dumps({"header_digest": header_digest, "version": int(version), "head": head.hex()},
                      sort_keys=True, separators=(",", ":"))
    return POSITION_CONTEXT + body.encode()


def round_bytes(header_digest: str, rnd: int, version: int, head: bytes, record: bytes) -> bytes:
    """What the server signs into its ledger for a committed round: the position after it and its round
    record, which chains the round's instructions, replies and metrics (shared.protocol.ledger.round_record), so that
    what the server charged each holder is signed too, not only where the model stands."""
    body = json.dumps({"header_digest": header_digest, "round": int(rnd), "version": int(version),
                       "head": head.hex(), "record": record.hex()}, sort_keys=True, separators=(",", ":"))
    return ROUND_CONTEXT + body.encode()


def reply_bytes(reply: Reply) -> bytes:
    """What a node signs in a reply: the reply itself, deterministically serialized, without its signature."""
    unsigned = Reply()
    unsigned.CopyFrom(reply)
    unsigned.ClearField("signature")
    return REPLY_CONTEXT + unsigned.SerializeToString(deterministic=True)


def sign_reply(reply: Reply, key: SigningKey | None) -> Reply:
    """Sign ``reply`` in place with the node's key (nothing without one); returns it."""
    if key is not None:
        reply.signature = key.sign(reply_bytes(reply))
    return reply


@dataclass(frozen=True)
class AllowedNodes:
    """The nodes a federation pins (``federation.allowed_nodes``): one ``HOLDER PUBLIC-KEY [COMMENT]`` line per
    data holder, where PUBLIC-KEY is an OpenSSH public key (``ecdsa-sha2-nistp384 AAAA...``, the format of a
    ``.pub`` file); ``#`` starts a comment. Each holder and each key appears once."""

    path: str
    keys: dict[str, str]  # holder -> its public key line (canonical, no comment)

    @classmethod
    def load(cls, path: str | Path) -> "AllowedNodes":
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise IdentityError(f"federation.allowed_nodes {str(path)!r}: cannot read it ({exc})") from exc
        keys: dict[str, str] = {}
        owners: dict[str, str] = {}
        for number, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            where = f"{path}, line {number}"
            fields = line.split()
            if len(fields) < 3:
                raise IdentityError(f"{where}: expected 'HOLDER KEY-TYPE BASE64 [COMMENT]', got {line[:80]!r}")
            holder, key = fields[0], parse_public_line(" ".join(fields[1:3]), where)
            if holder in keys:
                raise IdentityError(f"{where}: holder {holder!r} is listed twice")
            if key in owners:
                raise IdentityError(f"{where}: this key is already listed for {owners[key]!r}; each holder needs its own")
            keys[holder], owners[key] = key, holder
        if not keys:
            raise IdentityError(f"federation.allowed_nodes {str(path)!r} lists no node")
        return cls(str(path), keys)

    @property
    def digest(self) -> str:
        """SHA-256 of the list's content (holders sorted, canonical keys): what the ledger header pins."""
        canonical = "".join(f"{holder} {self.keys[holder]}\n" for holder in sorted(self.keys))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def signed_by(self, holder: str, data: bytes, signature: bytes) -> bool:
        """Whether ``holder`` is on the list and its pinned key made ``signature`` over ``data``."""
        return holder in self.keys and bool(signature) and verify(self.keys[holder], data, signature)
