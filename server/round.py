"""One federated round's pure parts: the plan the server sends, the validation of a reply and of a whole round's
replies (:func:`judge`), the scalar bound.

:class:`server.federation.FederatedServer` is the loop around them (configure, send, validate, aggregate,
commit, evaluate); these functions hold no state and touch no ledger, so each is testable alone. The
aggregation itself is :mod:`shared.protocol.aggregation` (the ledger's verifier recomputes it).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from seedtune.shared.protocol.aggregation import ACCEPTED
from seedtune.shared.protocol.identity import AllowedNodes, identity_bytes, reply_bytes
from seedtune.shared.protocol.ledger import Provenance
from seedtune.shared.privacy.noise import Noise
from seedtune.shared.protocol.proto import (PROTOCOL_VERSION, REFUSAL_HISTORY, Challenge, Hyperparameters, Identity,
                                            Reply)
from seedtune.shared.protocol.wire import PayloadTooLarge, WireError, from_content

log = logging.getLogger(__name__)
REFUSED_HISTORY = "refused_history"  # the node refused the server's ledger itself (Reply.refusal_code)
BELOW_MIN_REPLIES = "below_min_replies"  # provenance status of valid replies in a round with too few of them


class Rejected(ValueError):
    """A reply the server will not use; ``kind`` is the metrics counter and provenance status it goes to."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class RoundPlan:
    round: int
    version: int  # ledger length the round's scalars must be computed at
    nodes: list[int]
    seeds: list[int]
    hyper: Hyperparameters | None  # None: a query (catch up, report), no training

    @property
    def max_reply_bytes(self) -> int:
        """A reply is 4 bytes per seed plus a small envelope; anything much larger is refused unparsed."""
        return 4 * len(self.seeds) + 16 * 1024


@dataclass
class Collected:
    """What a round's send-and-validate step brought back (server.federation.FederatedServer.collect, or
    server.secure for a secure round): every reply's provenance, the rejections by kind, how many replies
    arrived, the bytes each node sent and was sent, and where the time went."""

    provenance: list[Provenance]
    rejected: Counter[str]
    replies: int
    up: Counter[int]
    down: Counter[int]
    timings: dict[str, float]


def scalar_bound(clip: float, noise: Noise | None) -> float:
    """Largest |scalar| an honest client sends: a clipped mean (at most C, a little more when the Poisson batch
    is larger than expected) plus noise, loosely bounded at 20 standard deviations."""
    return clip * (4.0 + 20.0 * noise.std) if noise is not None else 1e6


MAX_IDENTITY_BYTES = 16 * 1024  # a holder name, a public key line and a signature


def validate_identity(msg: Any, challenge: Challenge, asked: list[int], pins: AllowedNodes | None) -> str:
    """The data holder a node's answer to ``challenge`` establishes, or :class:`Rejected` naming what is wrong.

    With ``pins`` the node must prove a holder on the list: the list's key for that holder, and a signature
    by it over this challenge (its run, node id, ledger and fresh nonce), so an answer is never valid twice."""
    src = msg.metadata.src_node_id
    if src not in asked:
        raise Rejected("unknown_node", f"identity from node {src}, which was not asked")
    if msg.has_error():
        raise Rejected("client_error", f"node {src} failed: {msg.error.reason}")
    try:
        identity = from_content(msg.content, Identity, max_bytes=MAX_IDENTITY_BYTES)
    except WireError as exc:
        raise Rejected("malformed", f"node {src}: {exc}") from exc
    if identity.refusal:
        raise Rejected("refused", f"node {src} refused to identify: {identity.refusal}")
    if identity.protocol_version != PROTOCOL_VERSION or identity.run_id != challenge.run_id or identity.node != src:
        raise Rejected("wrong_round", f"node {src}: identity for protocol {identity.protocol_version}, run "
                       f"{identity.run_id}, node {identity.node}")
    holder = identity.holder
    if not holder:
        raise Rejected("no_holder", f"node {src} stated no data holder")
    if pins is None:
        return holder
    if holder not in pins.keys:
        raise Rejected("not_pinned", f"node {src}: holder {holder!r} is not on {pins.path}")
    if identity.public_key != pins.keys[holder]:
        raise Rejected("not_pinned", f"node {src} claims holder {holder!r} with "
                       f"{'no key (set node-key in its node config)' if not identity.public_key else 'another key'}"
                       f" than {pins.path} pins")
    signed_bytes = identity_bytes(challenge.run_id, src, holder, challenge.header_digest, challenge.nonce)
    if not pins.signed_by(holder, signed_bytes, identity.signature):
        raise Rejected("bad_signature", f"node {src}: the identity of {holder!r} is not signed by its pinned key")
    return holder


def signed(reply: Reply, holder: str | None, pins: AllowedNodes | None) -> bool:
    """Whether ``reply`` is the pinned holder's own (always true when the federation pins no nodes)."""
    return pins is None or (holder is not None and reply.holder == holder
                            and pins.signed_by(holder, reply_bytes(reply), reply.signature))


def envelope(msg: Any, plan: RoundPlan, run_id: int, holder: str | None, seen: set[int],
             pins: AllowedNodes | None = None, max_bytes: int | None = None) -> Reply:
    """The reply in ``msg`` if it answers this round from the holder its node proved, signed where the
    federation pins keys, once, at the round's version; else :class:`Rejected` naming what is wrong. What it
    carries is checked by the caller (:func:`validate`: the scalars; server.secure: a SecAgg+ step's answer).

    ``holder`` is the data holder the sending node proved; ``seen`` the nodes already accepted this round;
    ``pins`` the federation's pinned keys (a reply must then carry its holder's signature)."""
    src = msg.metadata.src_node_id
    if src not in plan.nodes:
        raise Rejected("unknown_node", f"reply from node {src}, which was not sent this round's instruction")
    if msg.has_error():
        raise Rejected("client_error", f"node {src} failed: {msg.error.reason}")
    try:
        reply = from_content(msg.content, Reply, max_bytes=max_bytes or plan.max_reply_bytes)
    except WireError as exc:
        raise Rejected("oversized" if isinstance(exc, PayloadTooLarge) else "malformed",
                       f"node {src}: {exc}") from exc
    if reply.refusal:
        kind = REFUSED_HISTORY if reply.refusal_code == REFUSAL_HISTORY else "refused"
        raise Rejected(kind, f"node {src} refused: {reply.refusal}")
    if reply.protocol_version != PROTOCOL_VERSION or reply.run_id != run_id or reply.round != plan.round \
            or reply.node != src:
        raise Rejected("wrong_round", f"node {src}: reply for protocol {reply.protocol_version}, run "
                       f"{reply.run_id}, round {reply.round}, node {reply.node}; expected round {plan.round}")
    if reply.holder != holder:
        raise Rejected("wrong_holder", f"node {src}: reply for holder {reply.holder!r}, the node stated {holder!r}")
    if not signed(reply, holder, pins):
        raise Rejected("bad_signature", f"node {src}: the reply is not signed by {holder!r}'s pinned key")
    if src in seen:
        raise Rejected("duplicate", f"node {src}: a second reply for round {plan.round}")
    if reply.model_version != plan.version:
        raise Rejected("wrong_version", f"node {src}: computed at version {reply.model_version}, "
                       f"the round is at {plan.version}")
    return reply


def validate(msg: Any, plan: RoundPlan, run_id: int, holder: str | None, seen: set[int],
             bound: float, pins: AllowedNodes | None = None) -> tuple[Reply, np.ndarray]:
    """The reply in ``msg`` (:func:`envelope`) and its float32 scalars, one per seed, finite and within the
    honest ``bound``; or :class:`Rejected` naming what is wrong with it."""
    reply = envelope(msg, plan, run_id, holder, seen, pins)
    src = msg.metadata.src_node_id
    if len(reply.scalars) != 4 * len(plan.seeds):
        raise Rejected("wrong_count", f"node {src}: {len(reply.scalars)} bytes of scalars for "
                       f"{len(plan.seeds)} seeds (4 bytes each)")
    scalars = np.frombuffer(reply.scalars, dtype="<f4")
    if not np.all(np.isfinite(scalars)):
        raise Rejected("non_finite", f"node {src}: non-finite scalars {scalars.tolist()}")
    if np.any(np.abs(scalars) > bound):
        raise Rejected("out_of_range", f"node {src}: |scalar| up to {np.abs(scalars).max():.4g} > {bound:.4g}")
    return reply, scalars


def judge(plan: RoundPlan, replies: list[Any], run_id: int, holders: Mapping[int, str], bound: float,
          pins: AllowedNodes | None, min_replies: int) -> tuple[list[Provenance], Counter[str]]:
    """Every reply's provenance row (accepted, or the rejection kind) and the rejections by kind. With fewer
    than ``min_replies`` valid replies, none is accepted: they are kept as :data:`BELOW_MIN_REPLIES`."""
    provenance: list[Provenance] = []
    rejected: Counter[str] = Counter()
    accepted: set[int] = set()
    for msg in replies:
        src = msg.metadata.src_node_id
        holder = holders.get(src)
        try:
            _, scalars = validate(msg, plan, run_id, holder, accepted, bound, pins)
        except Rejected as exc:
            rejected[exc.kind] += 1
            log.warning("round %d: rejected (%s) %s", plan.round, exc.kind, exc)
            provenance.append(Provenance(src, holder or "", exc.kind))
            continue
        accepted.add(src)
        provenance.append(Provenance(src, holder or "", ACCEPTED, scalars.tobytes()))
    if 0 < len(accepted) < min_replies:
        log.warning("round %d: %d valid replies < min_replies %d; committing no update", plan.round,
                    len(accepted), min_replies)
        provenance = [Provenance(p.node, p.holder, BELOW_MIN_REPLIES, p.scalars) if p.status == ACCEPTED else p
                      for p in provenance]
    return provenance, rejected
