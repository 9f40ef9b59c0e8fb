"""Opening a federated run folder: a new ledger, or the one a stopped server left, checked before it is trusted.

The ledger is the source of truth: a restarted server replays it into its replica and continues with the next
round. It is checked first against every anchor of its history kept outside the ledger file (the run folder's
metrics rows and this machine's home anchor, :mod:`shared.protocol.run_folder`), so that a ledger restored from an older
copy, cut short or rewritten is refused rather than continued, and against the server's signing key.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from seedtune.shared.task.config import RunConfig
from seedtune.shared.protocol.identity import SigningKey
from seedtune.shared.protocol.ledger import Ledger, LedgerError
from seedtune.shared.protocol.proto import LedgerHeader
from seedtune.shared.engine.replica import Replica, config_json
from seedtune.shared.protocol.run_folder import LEDGER_FILE, METRICS_FILE, anchors_of
from seedtune.server.report import RunReport

log = logging.getLogger(__name__)


def open_run(run_dir: Path, config: RunConfig, replica: Replica, new_header: Callable[[], LedgerHeader],
             allowed_nodes: str, key: SigningKey | None) -> tuple[Ledger, RunReport]:
    """The run folder's ledger (created with ``new_header()`` when there is none) and metrics report, the
    replica brought to the ledger's head. ``allowed_nodes`` is the pinned list's digest ("" pins none)."""
    report = RunReport(run_dir)
    anchor = report.anchor()  # the ledger head this run folder recorded, outside the ledger file
    if anchor is not None and not (run_dir / LEDGER_FILE).exists():
        raise LedgerError(f"{run_dir / LEDGER_FILE} is missing, but {anchor.source} records round "
                          f"{anchor.round} of it: restore the ledger, or choose a new run folder (out_dir)")
    ledger = Ledger.open_or_create(run_dir / LEDGER_FILE, new_header, config_json=config_json(config),
                                   base_model_digest=replica.base_digest, trainable_digest=replica.trainable_digest,
                                   allowed_nodes=allowed_nodes)
    replica.attach(ledger.header)
    n = len(ledger)
    anchors = anchors_of(ledger.path, ledger.genesis, anchor)  # the run folder's, and outside it
    if not anchors and ledger.last_round:
        raise LedgerError(f"{ledger.path} holds {ledger.last_round} rounds, but {report.path} anchors none of "
                          f"them (deleted or emptied?) and this machine keeps none outside the run folder: a ledger "
                          f"that lost rounds cannot be told from a whole one, and its holders would be instructed "
                          f"again for them. Restore {METRICS_FILE}, or start a new run folder (out_dir)")
    if n or anchors:
        log.info("resuming from %s: %d committed rounds, %d entries; replaying", ledger.path, ledger.last_round, n)
        ledger.verify(anchors)  # a ledger behind or beside any of its anchors is refused
        if key is not None:  # a ledger rewritten by anyone without the key is refused
            ledger.check_signatures(key.public, f"federation.server_key {key.path!r}")
        replica.apply(list(ledger.entries()), ledger.hash_at(n))
    return ledger, report
