"""The federation's identities: the pinned holders, the server's signing key, which holder each node proved it
serves, and what each holder has spent.

Privacy is accounted per data holder, by the identity each node proves (a signed answer to a challenge,
:func:`server.round.validate_identity`), never by Flower's node id, which changes at every launch and key
rotation. Every step instructed to a holder's node is counted before anything is sent (sent = spent: the
server's accounting may over-count a holder, never under-count it); the nodes keep their own accounting on
their own disks (client.privacy_ledger), and the run's summary shows both.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterable

from seedtune.shared.privacy.accounting import PrivacyAccountant
from seedtune.shared.task.config import ConfigError, PrivacyConfig
from seedtune.shared.protocol.identity import NONCE_BYTES, AllowedNodes, IdentityError, SigningKey
from seedtune.shared.privacy.noise import Noise
from seedtune.shared.protocol.proto import PROTOCOL_VERSION, Challenge
from seedtune.server.courier import Courier
from seedtune.server.round import Rejected, validate_identity

log = logging.getLogger(__name__)


def load_pins(path: str) -> AllowedNodes | None:
    """The federation's pinned holders and their keys (federation.allowed_nodes; "" pins none)."""
    if not path:
        return None
    try:
        pins = AllowedNodes.load(path)
    except IdentityError as exc:
        raise ConfigError(str(exc)) from exc
    log.info("pinned nodes: %d holders from %s (digest %s)", len(pins.keys), path, pins.digest[:16])
    return pins


def load_key(path: str) -> SigningKey | None:
    """The server's key that signs each ledger position it sends (federation.server_key; "" signs nothing)."""
    if not path:
        return None
    try:
        key = SigningKey.load(path, "federation.server_key")
    except IdentityError as exc:
        raise ConfigError(str(exc)) from exc
    log.info("signing ledger positions with %s (%s)", path, key.public)
    return key


class Holders:
    """Node -> holder, the nodes the pinned list refused, and one accountant per holder."""

    def __init__(self, privacy: PrivacyConfig, sample_rate: float, noise: Noise | None,
                 pins: AllowedNodes | None = None) -> None:
        self.privacy, self.sample_rate, self.noise, self.pins = privacy, sample_rate, noise, pins
        self.of: dict[int, str] = {}  # Flower node id -> the data holder it proved
        self.strangers: set[int] = set()  # nodes whose identity the pinned list refused: never asked again
        self.accountants: dict[str, PrivacyAccountant] = {}  # every private step instructed, per holder

    # ------------------------------------------------------------------------------------- identities
    def unknown(self, nodes: Iterable[int]) -> list[int]:
        """The nodes to ask who they serve: neither identified nor refused."""
        return sorted(set(nodes) - set(self.of) - self.strangers)

    def identify(self, nodes: Iterable[int], courier: Courier, genesis: str, rnd: int) -> None:
        """Ask the nodes not yet identified which data holder they serve, with a challenge that carries nothing
        of the ledger (``genesis`` names it). One that does not answer is not instructed (its spending could not
        be keyed) and is asked again next round; one the pinned list refuses is never asked again."""
        unknown = self.unknown(nodes)
        if not unknown:
            return
        challenge = Challenge(protocol_version=PROTOCOL_VERSION, run_id=courier.run_id, header_digest=genesis,
                              nonce=os.urandom(NONCE_BYTES))
        for msg in courier.challenge(unknown, challenge.SerializeToString(deterministic=True), rnd):
            self.learn(msg, challenge, unknown, rnd)
        missing = [n for n in unknown if n not in self.of]
        if missing:
            log.warning("round %d: %d node(s) not identified; not instructed: %s", rnd, len(missing), missing)

    def learn(self, msg: Any, challenge: Challenge, asked: list[int], rnd: int) -> None:
        """Take a node's answer to ``challenge``: its holder, or (pinned list refusing it) a stranger for good."""
        src = msg.metadata.src_node_id
        try:
            self.of[src] = validate_identity(msg, challenge, asked, self.pins)
        except Rejected as exc:
            log.warning("round %d: node %d not identified (%s): %s", rnd, src, exc.kind, exc)
            if exc.kind in ("not_pinned", "bad_signature"):
                self.strangers.add(src)

    def one_per_holder(self, nodes: Iterable[int]) -> dict[str, int]:
        """Identified holder -> its node among ``nodes`` (the lowest id if several claim it)."""
        first: dict[str, int] = {}
        for n in sorted(nodes):
            if n in self.of:
                first.setdefault(self.of[n], n)
        return first

    # --------------------------------------------------------------------------------------- budgets
    def record(self, holder: str, steps: int) -> None:
        """Every step of this federation has the header's noise at its sampling rate (None: non-private)."""
        self.accountants.setdefault(holder, PrivacyAccountant()).record(self.noise, self.sample_rate, steps)

    def epsilon(self, holder: str, extra_steps: int = 0) -> float | None:
        """The holder's epsilon at the federation's delta; None without privacy (no guarantee at all)."""
        return self._spent(holder, extra_steps) if self.privacy.enabled else None

    def _spent(self, holder: str, extra_steps: int) -> float:
        accountant = self.accountants.get(holder, PrivacyAccountant())
        return accountant.after(self.noise, self.sample_rate, extra_steps).epsilon(self.privacy.delta)

    def epsilons(self) -> dict[str, float | None]:
        """Every holder instructed so far, and its epsilon."""
        return {h: self.epsilon(h) for h in sorted(self.accountants)}

    def eligible(self, nodes: Iterable[int], steps: int) -> list[int]:
        """One node per identified holder (the lowest id if several claim it), if the holder's budget allows
        ``steps`` more."""
        first = self.one_per_holder(nodes)
        if self.privacy.enabled:
            first = {h: n for h, n in first.items() if self._spent(h, steps) <= self.privacy.epsilon}
        return sorted(first.values())
