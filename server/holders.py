"""The federation's data holders: which holder each node proved it serves, and what each holder has spent.

Privacy is accounted per data holder, by the identity each node proves (a signed answer to a challenge,
:func:`server.round.validate_identity`), never by Flower's node id, which changes at every launch and key
rotation. Every step instructed to a holder's node is counted before anything is sent (sent = spent: the
server's accounting may over-count a holder, never under-count it); the nodes keep their own accounting on
their own disks (client.privacy_ledger), and the run's summary shows both.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

from seedtune.shared.accounting import PrivacyAccountant
from seedtune.shared.config import PrivacyConfig
from seedtune.shared.identity import AllowedNodes
from seedtune.shared.noise import Noise
from seedtune.shared.proto import Challenge
from seedtune.server.round import Rejected, validate_identity

log = logging.getLogger(__name__)


class Holders:
    """Node -> holder, the nodes the pinned list refused, and one accountant per holder."""

    def __init__(self, privacy: PrivacyConfig, sample_rate: float, noise: Noise | None) -> None:
        self.privacy, self.sample_rate, self.noise = privacy, sample_rate, noise
        self.of: dict[int, str] = {}  # Flower node id -> the data holder it proved
        self.strangers: set[int] = set()  # nodes whose identity the pinned list refused: never asked again
        self.accountants: dict[str, PrivacyAccountant] = {}  # every private step instructed, per holder

    # ------------------------------------------------------------------------------------- identities
    def unknown(self, nodes: Iterable[int]) -> list[int]:
        """The nodes to ask who they serve: neither identified nor refused."""
        return sorted(set(nodes) - set(self.of) - self.strangers)

    def learn(self, msg: Any, challenge: Challenge, asked: list[int], pins: AllowedNodes | None, rnd: int) -> None:
        """Take a node's answer to ``challenge``: its holder, or (pinned list refusing it) a stranger for good."""
        src = msg.metadata.src_node_id
        try:
            self.of[src] = validate_identity(msg, challenge, asked, pins)
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
        if not self.privacy.enabled:
            return None
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
            first = {h: n for h, n in first.items() if self.epsilon(h, steps) <= self.privacy.epsilon}
        return sorted(first.values())
