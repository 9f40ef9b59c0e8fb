"""What a federated run reports, as pure functions of what the server measured: each round's metrics row, the
nodes' summed evaluation, and the run's summary. Nothing here reads a node's private data beyond what the
protocol releases (noised scalars, noised counts, epsilons, digests)."""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Iterable, Mapping

import numpy as np

from seedtune.shared.privacy.accounting import PrivacyAccountant, StepRun
from seedtune.shared.privacy.noise import Noise
from seedtune.shared.privacy.noise_search import COUNT_SENSITIVITY
from seedtune.shared.protocol.proto import Reply
from seedtune.shared.task.tasks import counts_metrics

log = logging.getLogger(__name__)


class Clock:
    """Seconds per phase of a round, in the order the phases ran."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] = round(now - self._last, 6)
        self._last = now

    def add(self, timings: Mapping[str, float]) -> None:
        self.phases.update({k: round(v, 6) for k, v in timings.items()})
        self._last = time.perf_counter()


def round_row(rnd: int, nodes: int, replies: int, accepted: int, rejected: Mapping[str, int], entries: int,
              ledger_entries: int, record: bytes, up: Mapping[int, int], down: Mapping[int, int], local_steps: int,
              epsilon: dict[str, float | None]) -> dict[str, Any]:
    """A committed round's metrics row (metrics.jsonl; ``ledger_record`` is the round's anchor)."""
    return {
        "round": rnd, "nodes": nodes, "replies": replies, "accepted": accepted,
        "rejected": sum(rejected.values()), "rejected_by_kind": dict(rejected), "entries": entries,
        "ledger_entries": ledger_entries, "ledger_record": record.hex(),
        "bytes_up_max": max(up.values(), default=0), "bytes_up_total": sum(up.values()),
        "bytes_up_per_step": max(up.values()) / local_steps if up else None,
        "bytes_down_max": max(down.values(), default=0), "bytes_down_total": sum(down.values()),
        "epsilon": epsilon,
        "epsilon_max": max((e for e in epsilon.values() if e is not None), default=None),
    }


def node_evaluation(replies: Mapping[int, Reply], asked: int, labels: list[str], noise: Noise,
                    delta: float) -> dict[str, Any]:
    """The nodes' noised per-label counts summed into a DP accuracy and macro-F1 over the holders' held-out data;
    a reply whose counts are not 3 finite values per label is ignored."""
    counts, epsilon = [], {}
    for src, reply in replies.items():
        values = np.asarray(reply.counts, dtype=np.float64)
        if values.shape != (3 * len(labels),) or not np.isfinite(values).all():
            log.warning("node %d: evaluation counts of shape %s (expected %d finite values); ignored", src,
                        values.shape, 3 * len(labels))
            continue
        counts.append(values.reshape(len(labels), 3))
        epsilon[reply.holder] = reply.metrics.get("epsilon")
    out: dict[str, Any] = {
        "node_eval_holders": len(counts), "node_eval_asked": asked,
        "node_eval_noise_std": noise.std * COUNT_SENSITIVITY,  # per released count
        # each holder's epsilon on its held-out data, from its own ledger (this release and any before)
        "node_eval_epsilon_holders": epsilon,
        "node_eval_epsilon_per_release": PrivacyAccountant([StepRun(noise, 1.0, 1)]).epsilon(delta),
    }
    if counts:
        out.update({f"node_test_{k}": v for k, v in counts_metrics(np.sum(counts, axis=0), labels).items()})
    return out


def epsilons_agree(server: Mapping[str, float | None], holders: Mapping[str, float]) -> bool:
    """Each holder's own ledger records the epsilon the server accounted for it (a holder that did not answer
    does not agree)."""
    return all(abs(holders.get(h, math.inf) - e) <= 1e-6 * max(1.0, e) for h, e in server.items() if e is not None)


def run_summary(rows: list[dict[str, Any]], synced: Mapping[int, Reply], asked: Iterable[int], server_digest: str,
                server_epsilon: Mapping[str, float | None], test: Mapping[str, Any],
                **facts: Any) -> dict[str, Any]:
    """The run's summary: ``facts`` (model, rounds, noise, digests, ...) first, then what follows from the
    metrics rows, the nodes' final sync replies and the test split's metrics."""
    client_digests = {str(n): r.state_digest for n, r in synced.items()}
    # what each holder's own privacy ledger recorded (over every run on that data), next to this server's
    holder_epsilon = {r.holder: r.metrics["epsilon"] for r in synced.values() if "epsilon" in r.metrics}
    dev = [r["dev_accuracy"] for r in rows if "dev_accuracy" in r]
    return {
        **facts,
        "epsilon_max": max((r["epsilon_max"] for r in rows if r.get("epsilon_max") is not None), default=None),
        "epsilon_holders": holder_epsilon,
        "epsilon_agree": epsilons_agree(server_epsilon, holder_epsilon),
        "dev_accuracy_first": dev[0] if dev else None, "dev_accuracy_last": dev[-1] if dev else None,
        **{f"zero_shot_{k}": v for r in rows if r["round"] == 0 for k, v in r.items() if k.startswith("test_")},
        **{f"test_{k}": v for k, v in test.items()},
        "state_digest": server_digest, "client_digests": client_digests,
        "client_runtimes": {str(n): r.runtime or "torch" for n, r in synced.items()},
        # Every node asked in the final sync (every live node; only the identified ones when the run pins its
        # nodes) answered, and every answer matches: a silent or refusing node is not agreement.
        "clients_agree": bool(client_digests) and len(client_digests) == len(list(asked))
                         and all(d == server_digest for d in client_digests.values()),
    }
