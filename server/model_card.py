"""The model card a replay or an export writes beside the model: what it is, what it was trained for and with
what privacy guarantee, and how to rebuild it.

The guarantee is accounted afresh here (:class:`shared.privacy.accounting.PrivacyAccountant`) from the noise the
ledger header records as sampled and the steps the ledger holds, not copied from a log: a federated ledger
records the private steps each data holder was asked to run (its instructions table) and the federation's
sampling rate; a ``seedtune train`` ledger has one step per round, at the sampling rate its run folder's
summary.json states (the only figure taken from there; without it the card says the epsilon is unknown).
The card never states the size of a training set: it describes private data, and a card is made to be
published (the run folder's summary.json keeps it for the data holder).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seedtune.shared.privacy.accounting import PrivacyAccountant
from seedtune.shared.task.config import RunConfig
from seedtune.shared.protocol.ledger import Ledger
from seedtune.shared.privacy.noise import Noise, Skellam
from seedtune.shared.protocol.run_folder import SUMMARY_FILE

CARD_FILE = "README.md"  # a Hugging Face folder's model card


@dataclass(frozen=True)
class PrivacyRecord:
    """A ledger's privacy guarantee: epsilon per data holder at delta (None: not private, or not known)."""

    private: bool
    delta: float
    noise: str  # the noise as sampled (shared.privacy.noise.Noise.describe), or "none"
    epsilon: dict[str, float] | None  # holder -> epsilon; None when the sampling rate is not known
    steps: dict[str, int]  # holder -> private steps accounted
    federated: bool
    accounting: str = "PLD (dp-accounting)"  # how the epsilon was composed (the RDP bound where no PLD covers it)
    local_epsilon: float | None = None  # secure aggregation: the largest holder's guarantee from its own noise share

    @property
    def epsilon_max(self) -> float | None:
        return max(self.epsilon.values()) if self.epsilon else None


def privacy_record(ledger: Ledger, config: RunConfig, ledger_path: str | Path) -> PrivacyRecord:
    header = ledger.header
    noise = Noise.from_json(header.noise_params) if header.noise_params else None
    instructed = ledger.instructed_steps()
    federated = bool(instructed)
    steps = instructed if federated else {"trainer": ledger.last_round}
    summary_path = Path(ledger_path).parent / SUMMARY_FILE
    summary = json.loads(summary_path.read_text()) if not federated and summary_path.is_file() else {}
    rate = config.privacy_events()[1] if federated else summary.get("sample_rate")
    epsilon = local = None
    if noise is not None and rate is not None:
        epsilon = {holder: _epsilon(noise, float(rate), count, config.privacy.delta) for holder, count in steps.items()}
        if isinstance(noise, Skellam) and steps:  # what each node's own share of the noise protects alone
            local = _epsilon(noise.share(config.federation.min_replies), float(rate), max(steps.values()), config.privacy.delta)
    accounting = ("RDP bound of a K-coordinate Skellam release (Agarwal et al. 2021 under Zhu and Wang's sampling "
                  "bound), dp-accounting's conversion" if noise is not None and noise.accounted_by_rdp
                  else "PLD (dp-accounting)")
    return PrivacyRecord(noise is not None, config.privacy.delta, noise.describe() if noise else "none", epsilon,
                         steps, federated, accounting, local)


def _epsilon(noise: Noise, rate: float, steps: int, delta: float) -> float:
    accountant = PrivacyAccountant()
    accountant.record(noise, rate, steps)
    return accountant.epsilon(delta)


def _fmt(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.4g}"


def model_card(info: dict[str, Any], config: RunConfig, record: PrivacyRecord, command: str) -> str:
    """The card's Markdown. ``info``: the replay's figures (model, digests, ledger head, rounds, entries)."""
    task, sel = config.task, config.selection
    trainable = {"all": "every parameter", "patterns": f"whole tensors matching {list(sel.patterns)}",
                 "prune": f"SynFlow-pruned (data-free), {sel.fraction:g} of the entries"
                          + (f" within {list(sel.patterns)}" if sel.patterns else ""),
                 "head": "the classifier head only (the encoder's head rows and bias, or the decoder's label-word "
                         "rows or head of its own), the body frozen"}[sel.mode]
    if record.private:
        holders = ("each data holder (a node's institution) of the federation" if record.federated
                   else "the training set of one `seedtune train` run")
        guarantee = (f"({_fmt(record.epsilon_max)}, {record.delta:g})-differential privacy for one example added "
                     f"to or removed from {holders}")
        if config.privacy.unit == "holder" and record.federated:
            guarantee = (f"({_fmt(record.epsilon_max)}, {record.delta:g})-differential privacy for one data holder's "
                         f"whole data added to or removed from the federation")
        if record.epsilon is None:
            guarantee += " (epsilon unknown: the run folder's summary.json, which states the sampling rate, is absent)"
    else:
        guarantee = "none: trained without differential privacy (non-private MeZO)"
    lines = [
        "---",
        "library_name: seedtune",
        "tags: [differential-privacy, zeroth-order, seedtune]",
        "---",
        f"# {config.model.name} finetuned privately on {task.name} with seedtune",
        "",
        "Finetuned with differentially private zeroth-order optimisation: every update is a public seed and "
        "one clipped, noised scalar, recorded in a hash-chained ledger from which this model is rebuilt.",
        "",
        "## Privacy",
        f"- Guarantee: {guarantee}",
        f"- epsilon: {_fmt(record.epsilon_max)}" + (f" (the largest of {len(record.epsilon)} holders)"
                                                       if record.epsilon and len(record.epsilon) > 1 else ""),
        f"- delta: {record.delta:g}",
        "- Privacy unit: " + ("a data holder's whole data (add/remove)" if config.privacy.unit == "holder"
                              else "one training example (add/remove), per data holder"),
        f"- Accounting: {record.accounting} of the noise as sampled: " + record.noise,
        *([f"- Secure aggregation: the server saw only each round's sums; the epsilon above holds while it followed "
           f"the protocol and at least {config.federation.min_replies} nodes survived each round. Against a server "
           f"that deviates, each holder is protected by its own share of the noise: epsilon "
           f"{_fmt(record.local_epsilon)} (recorded in its privacy ledger, `seedtune holder status`)"]
          if record.local_epsilon is not None else []),
        f"- Clip: {config.privacy.clip:g}; private steps: " + ", ".join(
            f"{h} {n}" for h, n in sorted(record.steps.items())),
        "- Data size: not stated (the size of a training set describes private data; a federation's server never "
        "learns its nodes' sizes)",
        "",
        "## Task",
        f"- Task: {task.name} ({task.kind})",
        f"- Text fields: {', '.join(task.text_fields)}" + (f"; target: {task.target_field}" if task.target_field
                                                            else ""),
        "- Prompt template (decoders): " + json.dumps(task.template),
        *([f"- Labels: {', '.join(map(str, task.labels))}",
           f"- Label words (decoders): {', '.join(task.words)}",
           f"- Label prompts (encoders' zero-shot head): {'; '.join(task.prompts)}"]
          if task.kind == "classification" else []),
        "",
        "## Model",
        f"- Base model: {config.model.name}, digest `{info.get('base_model_digest', '')}`",
        f"- This model's digest: `{info.get('model_digest', '')}`",
        f"- Trainable set: {trainable}, digest `{info.get('trainable_digest', '')}`",
        f"- Steps: {info.get('rounds')} rounds, {info.get('entries')} ledger entries; ZO lr {config.zo.lr:g}, "
        f"mu {config.zo.mu:g}, {config.zo.direction} directions",
        f"- Ledger head: `{info.get('ledger_head', '')}`",
        "",
        "## Rebuild and load",
        f"    {command}",
        "",
        "    import seedtune",
        "    model = seedtune.load_model(\"<this folder>\")  # the classifier with its head, ready to predict",
        "",
    ]
    return "\n".join(lines)
