"""From released scalars to ledger coefficients: the one rule the server, the trainer, every node and
``seedtune verify`` share.

A round's K seeds are the same for every instructed node, so the round adds K entries to the ledger, one per
seed, whatever the number M of replies: entry k's coefficient is ``-lr * A(s_1k, ..., s_Mk)`` with A the round's
aggregation rule over the accepted nodes' float32 scalars. Replay and catch-up then generate K directions per
round, not M x K.

Every sum is exact (``math.fsum``, one rounding at the end), so the same scalars give the same coefficient on
any machine, numpy version or order of summation: an auditor recomputes each aggregate from the ledger's
provenance table and must find the stored float32 coefficient bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

RULES = ("mean", "trimmed_mean", "median")


def kept(m: int, rule: str, trim: float = 0.0) -> slice:
    """Which of M sorted values a rule averages: all (mean), the middle after dropping floor(trim M) at each
    end (trimmed mean), or the middle one or two (median)."""
    if m < 1:
        raise ValueError("an aggregate needs at least one value")
    if rule == "mean":
        return slice(0, m)
    if rule == "trimmed_mean":
        if not 0 <= trim < 0.5:
            raise ValueError(f"trim must be in [0, 0.5), got {trim!r}")
        t = int(trim * m)
        return slice(t, m - t)
    if rule == "median":
        return slice((m - 1) // 2, m // 2 + 1)
    raise ValueError(f"unknown aggregation rule {rule!r}; choose one of {RULES}")


def aggregate(scalars: np.ndarray, rule: str, trim: float = 0.0) -> np.ndarray:
    """Per column (seed) of an (M, K) array of scalars, the rule's aggregate as float64, computed exactly."""
    values = np.asarray(scalars, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] < 1:
        raise ValueError(f"scalars must be an (M >= 1, K) array, got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError("scalars must be finite")
    part = kept(values.shape[0], rule, trim)
    columns = np.sort(values, axis=0)[part] if rule != "mean" else values
    n = columns.shape[0]
    return np.array([math.fsum(col) / n for col in columns.T], dtype=np.float64)


def update_scale(lr: float, directions: int) -> float:
    """The rule's learning rate for steps of K directions: ``lr / sqrt(K)``, because each released scalar of such
    a step is a projection divided by sqrt(K) (client.zo_step), so the step moves lr times the gradient; lr for
    one direction. The trainer, the server and every node's local progress use it alike."""
    return lr / math.sqrt(directions) if directions > 1 else lr


def coefficients(lr: float, aggregates: np.ndarray) -> np.ndarray:
    """``float32(-lr * a)`` per aggregate: what a ledger entry stores and replay adds along z(seed). A zero is
    stored as +0.0 (SQLite would give back a -0.0 as the integer 0, without its sign)."""
    with np.errstate(over="ignore"):
        out = (-float(lr) * np.asarray(aggregates, dtype=np.float64)).astype(np.float32)
    return out + np.float32(0.0)


def coefficient(lr: float, scalar: float) -> float:
    """One scalar's coefficient under the same rounding (a node's local progress, a trainer's step)."""
    return float(coefficients(lr, np.array([scalar]))[0])


ACCEPTED = "accepted"  # a provenance row whose scalars entered the round's aggregates
# Secure aggregation (server.secure): the server never sees a node's scalars, only their sum. A round's per-seed
# aggregate (the sum divided as the round's metrics say) is one row of its own, node 0, and each node whose
# masked vector is in the sum has a row of this status, without scalars.
SECURE_SUM, MASKED = "secure_sum", "masked"
FEEDS = (ACCEPTED, SECURE_SUM)  # the provenance rows a round's coefficients are computed from


@dataclass(frozen=True)
class RoundRule:
    """How one round turns accepted scalars into coefficients; recorded with the round, so that an auditor
    recomputes each coefficient from the provenance table alone."""

    rule: str = "mean"
    lr: float = 0.0
    trim: float = 0.0

    def coefficients(self, scalars: np.ndarray) -> np.ndarray:
        """(M, K) accepted scalars -> K float32 coefficients."""
        return coefficients(self.lr, aggregate(scalars, self.rule, self.trim))
