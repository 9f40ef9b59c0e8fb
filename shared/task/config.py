"""One typed, validated configuration for a private ZO run, loaded from TOML.

Each section is a dataclass; unknown keys and bad values are rejected with an error naming the field
(``privacy.epsilon must be > 0, got -1``), so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Self, Sequence, cast


from seedtune.shared.engine.directions import DIRECTION_KINDS, DirectionKind, frame_size
from seedtune.shared.privacy.noise import CALIBRATED_FAMILIES

log = logging.getLogger(__name__)

PRUNE_STRATEGIES = ("static", "dynamic", "incremental")
SELECTION_MODES = ("all", "patterns", "prune", "head")
DTYPES = ("float32", "bfloat16", "float16")  # forward-pass dtypes (model.dtype)
DECODER_HEADS = ("label_rows", "linear", "unit", "centred")

NOISE_CHOICES = CALIBRATED_FAMILIES + ("auto",)


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range; the message names the field."""


def _require(ok: bool, name: str, message: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{name} {message}, got {value!r}")


def _int(name: str, value: Any, lo: int, hi: int) -> None:
    """An int (not a bool) in [lo, hi]. Every integer setting has an upper bound, refused at load: 1e9 threads or
    1e30 rounds would otherwise pass and fail late (out of memory after the ledger is written) or never end."""
    _require(type(value) is int and lo <= value <= hi, name, f"must be an int in [{lo:,}, {hi:,}]", value)


def _path_text(name: str, value: Any) -> None:
    """A string that can name a file: no NUL (the OS would refuse it with a traceback, after other writes)."""
    _require(isinstance(value, str) and "\x00" not in value, name, "must be a string without NUL characters", value)


def setting(default: Any = dataclasses.MISSING, *, factory: Callable[[], Any] | None = None,
            ints: tuple[int, int] | None = None, choices: Sequence[Any] | None = None, help: str = "") -> Any:
    """A config field that carries its meaning: ``help`` (what ``seedtune config`` prints beside it), and where
    given the integer range ``ints`` or the ``choices`` that :meth:`Settings.validate` enforces."""
    metadata = {"help": help, "ints": ints, "choices": tuple(choices) if choices is not None else None}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


class Settings:
    """A config section (a dataclass of :func:`setting` fields): :meth:`validate` checks each field's range or
    choices, named ``SECTION.field``, then the rules between fields (:meth:`check`)."""

    SECTION: ClassVar[str] = ""

    def validate(self) -> Self:
        for f in dataclasses.fields(cast(Any, self)):
            name, value = f"{self.SECTION}.{f.name}" if self.SECTION else f.name, getattr(self, f.name)
            if f.metadata.get("ints") is not None:
                _int(name, value, *f.metadata["ints"])
            if f.metadata.get("choices") is not None:
                _require(value in f.metadata["choices"], name, f"must be one of {f.metadata['choices']}", value)
        self.check()
        return self

    def check(self) -> None:
        """The rules a range or a list of choices cannot state (types, patterns, fields that depend on others)."""


MAX_STEPS = 10**7  # steps of one run (a stage, or all stages): far past any budget a CPU or a GPU spends
MAX_EXAMPLES = 10**9


def _positive(name: str, value: float) -> None:
    _require(isinstance(value, (int, float)) and math.isfinite(value) and value > 0, name, "must be > 0", value)


@dataclass
class ModelConfig(Settings):
    SECTION: ClassVar[str] = "model"

    name: str = setting("minilm", help='"minilm", "smollm2", a Hugging Face model id or a local folder')
    kind: str = setting("auto", help="\"encoder\", \"decoder\" or \"auto\" (from the model's config)")
    decoder_head: str = setting(
        "label_rows", choices=DECODER_HEADS,
        help='a decoder classifier\'s head: "label_rows" (the label words\' rows of its output embedding, tied to the '
             'input embedding in SmolLM2) or "linear" (a head of its own on the last hidden state, starting from '
             'those rows: the same zero-shot scores, and features a head stage computes once per record) or "unit" '
             '(the same head on the last hidden state scaled to unit L2 norm: the DP linear probe\'s features, so a '
             'clipped head step keeps its signal; the same zero-shot predictions) or "centred" (the same head on the '
             'output of layer model.head_layer less the prompt template\'s own state, at unit norm: the common '
             'direction of all states removed, data-free; docs/engine.md, "The head alone")')
    head_layer: int = setting(0, ints=(0, 10_000),
                              help='the layer whose output a "centred" head reads (1 to the layer count; 0 or the '
                                   'count: the last, after the final norm); layers above it never run. 22 for SmolLM2 (of 30), chosen '
                                   'on SST-2\'s public dev split')
    max_length: int = setting(64, ints=(8, 131_072), help="tokens per example; a decoder prompt keeps its tail (the "
                                                          "question)")
    microbatch: int = setting(16, ints=(1, 65_536), help="examples per forward pass, grouped by length: less "
                                                         "padding, bounded memory")
    # Where and in what precision the forward passes run (shared.task.placement). The trainable entries stay
    # in a float32 master whatever the dtype, so a ledger replays to the same float32 values on any machine.
    device: str = setting("cpu", help='"auto" (CUDA, then MPS, then CPU), "cpu", "cuda", "cuda:N" or "mps"')
    dtype: str = setting("float32", choices=DTYPES, help='"float32", "bfloat16" or "float16"')
    feature_cache_mb: int = setting(
        1024, ints=(0, 10**7),
        help="With selection.mode = \"head\", each training record's frozen features are computed once and kept in "
             "memory up to this many MB (then computed afresh each time: the same values, more time). A trainable "
             "set above layer L keeps the output of layers 0..L-1 per record the same way, when every record fits "
             "and the run draws each at least once on average (else they are computed once per batch). Never written "
             "to disk, never released; gone when the process ends.")

    def check(self) -> None:
        _require(isinstance(self.name, str) and self.name != "", "model.name", "must be a non-empty string", self.name)
        _require(self.kind in ("auto", "encoder", "decoder"), "model.kind", "must be auto, encoder or decoder",
                 self.kind)
        _require(isinstance(self.device, str) and re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device) is not None,
                 "model.device", "must be auto, cpu, cuda, cuda:N or mps", self.device)


TASK_KINDS = ("classification", "generation")
DATA_FORMATS = ("csv", "tsv", "json", "parquet")  # by file extension; .jsonl is JSON Lines


@dataclass
class TaskConfig(Settings):
    """What the model learns: which columns it reads, the prompt they fill, and the labels it tells apart
    (classification) or the text it writes after the prompt (generation, decoders only).

    The task travels in the ledger header (the whole config does), so a replay, an export and every node of a
    federation build the same prompt and label scores. The defaults are SST-2 (configs/sst2.toml states them);
    nothing task-specific lives in the engine.
    """

    SECTION: ClassVar[str] = "task"

    name: str = setting("sst2", help="a name for summaries and logs (the privacy ledger keys data by its records)")
    kind: str = setting("classification", choices=TASK_KINDS, help='"classification" (labels) or "generation" (a '
                                                                   'target text; decoders)')
    text_fields: list[str] = setting(factory=lambda: ["sentence"], help="one text, or a pair (premise, hypothesis)")
    label_field: str = setting("label", help="classification: the label column")
    target_field: str = setting("", help="generation: the column the model learns to write after the prompt")
    max_new_tokens: int = setting(64, ints=(1, 8192), help="generation: the longest greedy continuation scored at "
                                                           "evaluation")
    template: str = setting(
        "Review: {sentence}\nSentiment:",
        help="A decoder's prompt: {field} placeholders name text_fields; the label word's score is read right after "
             "it.")
    labels: list[str] = setting(
        factory=lambda: ["0", "1"],
        help="The label values as the data spells them, in class order; empty: the training split's values, sorted "
             "(stated in the log; a federation takes them from the server's public test split).")
    label_words: list[str] = setting(
        factory=lambda: ["negative", "positive"],
        help='What a decoder scores for each label (" " + word after the prompt); empty: the labels themselves')
    label_prompts: list[str] = setting(
        factory=lambda: ["This review is negative. It was terrible.", "This review is positive. It was great."],
        help="An encoder's public label prompts: its zero-shot head rows are their embeddings; empty: the label words")

    def check(self) -> None:
        _require(isinstance(self.name, str) and re.fullmatch(r"[A-Za-z0-9_.-]+", self.name) is not None, "task.name",
                 "must be a non-empty name of letters, digits, '_', '.' or '-'", self.name)
        _require(isinstance(self.text_fields, list) and 1 <= len(self.text_fields) <= 2
                 and all(isinstance(f, str) and f for f in self.text_fields), "task.text_fields",
                 "must list one or two column names", self.text_fields)
        _require(len(set(self.text_fields)) == len(self.text_fields), "task.text_fields", "must not repeat a column",
                 self.text_fields)
        _require(isinstance(self.label_field, str) and self.label_field != "" and self.label_field not in
                 self.text_fields, "task.label_field", "must be a column name that is not a text field",
                 self.label_field)
        generation = self.kind == "generation"
        _require(isinstance(self.target_field, str) and bool(self.target_field) == generation
                 and self.target_field not in self.text_fields, "task.target_field",
                 "must name the target column (not a text field) exactly when task.kind = 'generation'",
                 self.target_field)
        for name in ("labels", "label_words", "label_prompts"):
            _require(not generation or getattr(self, name) == [], f"task.{name}",
                     "applies to classification: set it to [] for a generation task", getattr(self, name))
        # the one parser of templates (shared.task.tasks imports no config)
        from seedtune.shared.task.tasks import template_fields

        _require(isinstance(self.template, str), "task.template", "must be a string", self.template)
        try:
            used = template_fields(self.template)
        except ValueError as exc:
            raise ConfigError(f"task.template {self.template!r} is not a valid template: {exc}") from None
        unknown = [f for f in used if f not in self.text_fields]
        _require(not unknown, "task.template", f"names {unknown} which are not task.text_fields "
                 f"{self.text_fields}", self.template)
        _require(sorted(used) == sorted(self.text_fields), "task.template",
                 f"must use every text field of task.text_fields {self.text_fields} once", self.template)
        for name in ("labels", "label_words", "label_prompts"):
            value = getattr(self, name)
            _require(isinstance(value, list) and all(isinstance(v, str) and v.strip() for v in value),
                     f"task.{name}", "must be a list of non-empty strings", value)
            _require(len(set(value)) == len(value), f"task.{name}",
                     "must not repeat a value (two labels would score the same)", value)
        _require(len(self.labels) != 1, "task.labels", "must name at least two labels (or none: from the data)",
                 self.labels)
        for name in ("label_words", "label_prompts"):
            value = getattr(self, name)
            _require(not value or not self.labels or len(value) == len(self.labels), f"task.{name}",
                     f"must give one entry per label ({len(self.labels)}: {self.labels}) or none", value)

    @property
    def words(self) -> list[str]:
        """The decoder's label words, one per label."""
        return self.label_words or self.labels

    @property
    def prompts(self) -> list[str]:
        """The encoder's label prompts, one per label."""
        return self.label_prompts or self.words


@dataclass
class DataConfig(Settings):
    SECTION: ClassVar[str] = "data"

    data_dir: str = setting(
        "",
        help="Where the task's files are: a folder with train and test (and optionally dev) files, each .csv, .tsv, "
             ".jsonl/.json or .parquet; a relative folder is looked up in the working directory, $SEEDTUNE_DATA and "
             "the team data folder (../shared/data). Empty: the folder named task.name there.")
    train_file: str = setting("", help="explicit files, instead of the folder's (test_file needs train_file)")
    test_file: str = setting("", help="the test split's file (with train_file)")
    dev_file: str = setting("", help="optional: without a dev split there is no periodic (public) dev evaluation")
    hub: str = setting("glue", help='A Hugging Face dataset, used when no local files are found (real users with hub '
                                    'access); "" = none')
    hub_config: str = setting("sst2", help="the hub dataset's configuration")
    hub_splits: list[str] = setting(factory=lambda: ["train[10%:]", "validation", "train[:10%]"], help="train, test, "
                                                                                                       "dev")
    train_size: int = setting(0, ints=(0, MAX_EXAMPLES), help="0 = the whole training split; else about this many, "
                                                              "kept per record by a salted hash")
    test_size: int = setting(0, ints=(0, MAX_EXAMPLES), help="0 = the whole test split")
    seed: int = setting(0, help="public seed for the subset choice")
    min_words: int = setting(
        0, ints=(0, MAX_EXAMPLES),
        help="Keep only train/dev records of at least this many words (0 = all). SST-2's training split is mostly "
             "phrases (median 7 words), its test split full sentences (median 19): a public per-record rule that "
             "spends the steps on sentence-like examples at no privacy cost (the accountant counts what is kept).")

    def check(self) -> None:
        for name in ("data_dir", "train_file", "test_file", "dev_file", "hub", "hub_config"):
            _path_text(f"data.{name}", getattr(self, name))
        _require(not (self.test_file or self.dev_file) or bool(self.train_file), "data.train_file",
                 "must be set when data.test_file or data.dev_file is", self.train_file)
        _require(not self.train_file or bool(self.test_file), "data.test_file", "must be set with data.train_file",
                 self.test_file)
        _require(isinstance(self.hub_splits, list) and len(self.hub_splits) in (2, 3)
                 and all(isinstance(s, str) and s for s in self.hub_splits), "data.hub_splits",
                 "must list the hub's train and test split names, and optionally dev", self.hub_splits)
        _require(isinstance(self.seed, int) and 0 <= self.seed < 2**64, "data.seed", "must be an int in [0, 2^64)",
                 self.seed)


@dataclass
class ZOConfig(Settings):
    SECTION: ClassVar[str] = "zo"

    batch_size: int = setting(32, ints=(1, 10**6), help="expected batch size q*n under Poisson sampling")
    lr: float = setting(1e-4, help="step size of theta -= lr * g * z")
    mu: float = setting(1e-3, help="smoothing scale of the two-point estimate")
    direction: DirectionKind = setting(
        "rademacher", choices=DIRECTION_KINDS,
        help='"rademacher", "gaussian" or "hadamard" (an orthogonal frame) directions z')
    seed: int = setting(0, help="0: fresh direction seeds from the CSPRNG; else a public, reproducible stream from "
                                "this seed")
    directions: int = setting(
        1, ints=(0, 4096),
        help="Directions per step. 1: DPZero's symmetric two-point estimate (2 passes). K > 1: one-sided estimates "
             "sharing one unperturbed pass (K + 1 passes; a head over a Hadamard frame: all K by one transform), "
             "each divided by sqrt(K), the per-example K-vector clipped in L2 (one privacy event per step). 0 with "
             "zo.direction = \"hadamard\": a full frame, K = the power of two at or above the trainable set's size.")

    def check(self) -> None:
        _positive("zo.lr", self.lr)
        _positive("zo.mu", self.mu)
        _require(isinstance(self.seed, int) and 0 <= self.seed < 2**64, "zo.seed", "must be an int in [0, 2^64)",
                 self.seed)
        _require(self.directions != 0 or self.direction == "hadamard", "zo.directions",
                 "0 (a full frame) needs zo.direction = 'hadamard'", self.directions)


def directions_per_step(configured: int, entries: int) -> int:
    """K of a step: ``zo.directions``, or for 0 the full Hadamard frame over ``entries`` trainable entries (the
    trainer, the server and every node derive it alike from the ledger header's config)."""
    if configured:
        return configured
    try:
        return frame_size(entries)
    except ValueError as exc:
        raise ConfigError(f"zo.directions = 0: {exc}") from None


PRIVACY_UNITS = ("example", "holder")


@dataclass
class PrivacyConfig(Settings):
    SECTION: ClassVar[str] = "privacy"

    enabled: bool = setting(True, help="False: non-private MeZO (no clipping, no noise, epsilon reported as inf)")
    epsilon: float = setting(3.0, help="the target epsilon of the whole run (PLD accounting), at delta")
    delta: float = setting(1e-5, help="the target delta")
    clip: float = setting(1.0, help="per-example clipping bound C on the projected gradient")
    noise_multiplier: float = setting(0.0, help="Gaussian only; 0: calibrated from (epsilon, delta, sampling rate, "
                                                "steps)")
    noise: str = setting("gaussian", choices=NOISE_CHOICES, help='"gaussian", "laplace", "lmo" or "auto" (least '
                                                                 'variance at the target; see noise_search)')
    unit: str = setting(
        "example", choices=PRIVACY_UNITS,
        help='what the guarantee protects: "example" (one record of a data holder) or "holder" (a federated node\'s '
             "whole data: each round its node clips its whole vector of scalars to privacy.clip as one unit and lets "
             "it in with probability holder_rate, else sends the noise alone; docs/federation.md, \"The privacy "
             "unit\")")
    holder_rate: float = setting(
        0.1, help='unit "holder": the probability, per round, that an instructed node lets its data in (a secret '
                  "coin from its CSPRNG: the amplification of node sampling, which the server cannot see)")

    def check(self) -> None:
        _require(isinstance(self.enabled, bool), "privacy.enabled", "must be true or false", self.enabled)
        _positive("privacy.epsilon", self.epsilon)
        _require(isinstance(self.delta, float) and 0 < self.delta < 1, "privacy.delta", "must be in (0, 1)",
                 self.delta)
        _positive("privacy.clip", self.clip)
        _require(isinstance(self.noise_multiplier, (int, float)) and math.isfinite(self.noise_multiplier)
                 and self.noise_multiplier >= 0, "privacy.noise_multiplier", "must be >= 0", self.noise_multiplier)
        _require(self.noise == "gaussian" or not self.noise_multiplier, "privacy.noise_multiplier",
                 "applies to privacy.noise = 'gaussian' only (other noises are always calibrated)",
                 self.noise_multiplier)
        _require(isinstance(self.holder_rate, (int, float)) and 0 < self.holder_rate <= 1, "privacy.holder_rate",
                 "must be in (0, 1]", self.holder_rate)


@dataclass
class SelectionConfig(Settings):
    SECTION: ClassVar[str] = "selection"

    mode: str = setting(
        "prune", choices=SELECTION_MODES,
        help="\"all\", \"patterns\", \"prune\", or \"head\": only the classifier head (the encoder's head rows and "
             "bias, the decoder's label-word rows), whose steps read each record's frozen features once "
             "(model.feature_cache_mb)")
    fraction: float = setting(0.01, help='kept fraction for "prune"')
    strategy: str = setting("static", choices=PRUNE_STRATEGIES, help='"static", "dynamic" (recomputed per stage), '
                                                                     '"incremental" (grows per stage)')
    patterns: list[str] = setting(factory=list, help='glob patterns; with "prune", restricts the candidates')

    def check(self) -> None:
        _require(isinstance(self.fraction, (int, float)) and 0 < self.fraction <= 1, "selection.fraction",
                 "must be in (0, 1]", self.fraction)
        _require(isinstance(self.patterns, list) and all(isinstance(p, str) for p in self.patterns),
                 "selection.patterns", "must be a list of strings", self.patterns)
        _require(self.mode != "patterns" or bool(self.patterns), "selection.patterns",
                 "must name at least one pattern when selection.mode = 'patterns'", self.patterns)


@dataclass
class ScheduleConfig(Settings):
    """DP-ZOSO stages: stage s runs stage_steps[s] steps at lr * lr_decay**s and mu * mu_decay**s."""

    SECTION: ClassVar[str] = "schedule"

    stage_steps: list[int] = setting(factory=lambda: [300], help="steps of each stage, in order")
    lr_decay: float = setting(0.5, help="lr multiplier from one stage to the next")
    mu_decay: float = setting(0.5, help="mu multiplier from one stage to the next")
    mu_min: float = setting(1e-5, help="mu never decays below this")
    prox: float = setting(0.0, help="proximal strength lambda: theta -= lr_s * lambda * (theta - stage start) each "
                                    "step")

    @property
    def total_steps(self) -> int:
        return sum(self.stage_steps)

    def check(self) -> None:
        _require(isinstance(self.stage_steps, list) and 1 <= len(self.stage_steps) <= 64
                 and all(type(s) is int and s >= 1 for s in self.stage_steps)
                 and sum(self.stage_steps) <= MAX_STEPS, "schedule.stage_steps",
                 f"must be a list of 1 to 64 ints >= 1 summing to at most {MAX_STEPS:,}", self.stage_steps)
        _require(isinstance(self.lr_decay, (int, float)) and 0 < self.lr_decay <= 1, "schedule.lr_decay",
                 "must be in (0, 1]", self.lr_decay)
        _require(isinstance(self.mu_decay, (int, float)) and 0 < self.mu_decay <= 1, "schedule.mu_decay",
                 "must be in (0, 1] (the perturbation scale never grows)", self.mu_decay)
        _positive("schedule.mu_min", self.mu_min)
        _require(isinstance(self.prox, (int, float)) and math.isfinite(self.prox) and self.prox >= 0,
                 "schedule.prox", "must be >= 0", self.prox)


@dataclass
class EvalConfig(Settings):
    SECTION: ClassVar[str] = "eval"

    every: int = setting(
        100, ints=(0, MAX_STEPS),
        help="Dev-subset evaluations every this many steps (seedtune train) or rounds (a federation); 0: only before "
             "and after training")
    dev_size: int = setting(256, ints=(0, MAX_EXAMPLES), help="dev examples per periodic evaluation (public-split "
                                                              "monitoring, not model selection)")

PARTITIONS = ("iid", "dirichlet", "natural")
AGGREGATIONS = ("mean", "trimmed_mean", "median")
SECURE_AGGREGATIONS = ("none", "secagg+")


@dataclass
class FederationConfig(Settings):
    """Federated DP-ZO: every round the server sends the same fresh seeds to the sampled clients, each runs
    one private ZO step per seed on its own partition, and each seed's scalars are aggregated into one ledger
    entry (``aggregation``). Its run folder is the top-level ``out_dir``, its evaluation cadence ``eval.every``."""

    SECTION: ClassVar[str] = "federation"

    rounds: int = setting(10, ints=(1, 10**6), help="federated rounds")
    clients_per_round: int = setting(0, ints=(0, 10**6), help="nodes sampled per round; 0 = every node still within "
                                                              "its budget")
    local_steps: int = setting(4, ints=(1, 10**5), help="private ZO steps (seeds) per client per round")
    sample_rate: float = setting(0.01, help="Poisson rate q on each client's partition, so every client has the same "
                                            "epsilon/step")
    min_replies: int = setting(1, ints=(1, 10**6), help="a round with fewer valid replies commits nothing")
    round_timeout_s: float = setting(600.0, help="how long a round waits for replies")
    partition: str = setting("iid", choices=PARTITIONS, help='"iid", "dirichlet" (label skew) or "natural" (one node '
                                                             'per value of partition_by)')
    partition_by: str = setting("", help="\"natural\": the column naming each record's institution or user")
    alpha: float = setting(0.5, help="Dirichlet concentration: smaller = more skewed")
    aggregation: str = setting("mean", choices=AGGREGATIONS, help='per seed over the replies: "mean", "trimmed_mean" '
                                                                  'or "median" (robust)')
    trim: float = setting(0.2, help="trimmed_mean: fraction of replies dropped at each end, per seed")
    allowed_nodes: str = setting(
        "",
        help='File of "HOLDER PUBLIC-KEY" lines (shared.protocol.identity.AllowedNodes): only these nodes are '
             'instructed, and only their signed replies count. "": any node that states a holder takes part '
             '(simulations).')
    server_key: str = setting(
        "",
        help="The server's private key (OpenSSH or PEM, no passphrase): it signs every ledger position it sends and "
             "every round it commits, and a resumed server checks its ledger's signatures. Nodes configured with its "
             "public key (node config server-key) follow only signed positions and pin one ledger per server key.")
    node_evaluation: bool = setting(
        False,
        help="After the last round, each node scores the final model on its own held-out data (Flower's evaluate "
             "message) and releases its per-label counts (examples, predicted, correct) under Gaussian noise "
             "calibrated to node_eval_epsilon at privacy.delta: one release, accounted in its data holder's privacy "
             "ledger under that data set's key. The server sums the counts (DP-noised accuracy and macro-F1). "
             "Classification only.")
    node_eval_epsilon: float = setting(1.0, help="epsilon of that one release, per holder and held-out data set")
    secure_aggregation: str = setting(
        "none", choices=SECURE_AGGREGATIONS,
        help='"secagg+": the server learns only each seed\'s sum over a round\'s surviving nodes (SecAgg+ over '
             "Flower's primitives, shared.protocol.secagg), and each node adds 1/min_replies of the Skellam noise the "
             "sum needs (shared.privacy.skellam): at least min_replies nodes must survive a round. docs/federation.md, "
             '"Secure aggregation"')
    secure_batch: float = setting(
        32.0, help="secagg+: the expected Poisson batch of one node, public, that a round's sum is divided by (with "
                   "the number of surviving nodes): a node with more records weighs more, as in FedAvg")
    secure_degree: int = setting(
        0, ints=(0, 10**6), help="secagg+: each node's neighbourhood in SecAgg+'s graph, itself included (odd); 0: "
                                 "2 ceil(log2 M) + 1 of a round's M nodes, or all of them when that covers them")

    def check(self) -> None:
        _require(isinstance(self.sample_rate, (int, float)) and 0 < self.sample_rate <= 1, "federation.sample_rate",
                 "must be in (0, 1]", self.sample_rate)
        _positive("federation.round_timeout_s", self.round_timeout_s)
        _require(isinstance(self.partition_by, str) and (self.partition != "natural") != bool(self.partition_by),
                 "federation.partition_by", "must name a column exactly when federation.partition = 'natural'",
                 self.partition_by)
        _positive("federation.alpha", self.alpha)
        _require(isinstance(self.trim, (int, float)) and 0 <= self.trim < 0.5, "federation.trim",
                 "must be in [0, 0.5)", self.trim)
        _require(isinstance(self.node_evaluation, bool), "federation.node_evaluation", "must be true or false",
                 self.node_evaluation)
        _positive("federation.node_eval_epsilon", self.node_eval_epsilon)
        _positive("federation.secure_batch", self.secure_batch)
        _require(self.secure_degree == 0 or (self.secure_degree >= 3 and self.secure_degree % 2 == 1),
                 "federation.secure_degree", "must be 0 or an odd number >= 3", self.secure_degree)


TRACKING_BACKENDS = ("none", "tensorboard", "mlflow")


@dataclass
class TrackingConfig(Settings):
    SECTION: ClassVar[str] = "tracking"

    backend: str = setting("none", choices=TRACKING_BACKENDS, help='also send the metrics rows to "tensorboard" '
                                                                   '(event files in the run folder) or "mlflow"')
    uri: str = setting("", help="mlflow: the tracking URI (default: sqlite, the run folder's mlflow.db); "
                                "private-batch fields never go there")
    experiment: str = setting("seedtune", help="mlflow: the experiment name")

    def check(self) -> None:
        _require(isinstance(self.uri, str), "tracking.uri", "must be a string", self.uri)
        _require(isinstance(self.experiment, str) and self.experiment != "", "tracking.experiment",
                 "must be a non-empty string", self.experiment)


@dataclass
class RunConfig(Settings):
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    zo: ZOConfig = field(default_factory=ZOConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    out_dir: str = setting("", help="The run folder (ledger, metrics, summary, plots) of a training or a "
                                    "federation's server; empty: runs/train-<time> or runs/federated-<time>")
    threads: int = setting(0, ints=(0, 1024), help="torch CPU threads; 0: torch's default")

    def check(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Settings):
                value.validate()  # every section validates itself
        _path_text("out_dir", self.out_dir)
        # K noisy scalars released together are one mechanism of L2 sensitivity C: accounted as one scalar for
        # the Gaussian only (K independent Laplace or LMO draws would need an accounting of their own).
        _require(self.zo.directions == 1 or not self.privacy.enabled or self.privacy.noise == "gaussian",
                 "zo.directions", f"other than 1 needs privacy.noise = 'gaussian' (got {self.privacy.noise!r})",
                 self.zo.directions)
        if self.federation.secure_aggregation != "none":
            self._check_secure_aggregation()
        _require(self.privacy.unit == "example" or (self.privacy.enabled and self.privacy.noise == "gaussian"),
                 "privacy.unit", "'holder' needs privacy.enabled with privacy.noise = 'gaussian' (a node's whole vector "
                 "is one Gaussian release, or under secure aggregation one Skellam release)", self.privacy.unit)
        _require(self.federation.partition != "dirichlet" or self.task.kind == "classification",
                 "federation.partition", "'dirichlet' skews labels: a classification task's only", "dirichlet")
        _require(self.model.head_layer == 0 or self.model.decoder_head == "centred", "model.head_layer",
                 "is the layer a 'centred' decoder head reads: set model.decoder_head = 'centred'", self.model.head_layer)
        _require(self.model.decoder_head == "label_rows" or self.task.kind == "classification", "model.decoder_head",
                 "other than 'label_rows' is a classifier's head: a generation task scores the vocabulary",
                 self.model.decoder_head)
        _require(self.model.decoder_head != "centred" or self.selection.mode == "head", "model.decoder_head",
                 "'centred' trains the head alone (selection.mode = 'head'): its centre is the base body's and the "
                 "layers above model.head_layer never run, so no body entry may move", self.model.decoder_head)
        _require(not self.federation.node_evaluation or (self.task.kind == "classification" and
                                                          self.privacy.enabled),
                 "federation.node_evaluation", "releases noised label counts: it needs a classification task and "
                 "privacy.enabled (generation is evaluated on the server's public test split)", True)
        # SynFlow scores a float32 model on the CPU (every node must derive the same set): a strategy that re-prunes
        # between stages would have to score the half-precision forward copy.
        _require(self.model.dtype == "float32" or self.selection.mode != "prune" or self.selection.strategy == "static",
                 "selection.strategy", f"must be 'static' with model.dtype = {self.model.dtype!r} (re-pruning runs "
                 f"in float32 only)", self.selection.strategy)

    def privacy_events(self) -> tuple[int, float]:
        """A federated round's privacy events per instructed holder, and their sampling rate: one per local step
        on a Poisson sample of its records (unit "example"), or one for the round, the node's own coin (unit
        "holder"). The server calibrates, counts and caps by them; each node charges its holder by them."""
        if self.privacy.unit == "holder":
            return 1, self.privacy.holder_rate
        return self.federation.local_steps, self.federation.sample_rate

    def _check_secure_aggregation(self) -> None:
        """What SecAgg+ with distributed Skellam noise can compute and account (docs/federation.md)."""
        fed, privacy = self.federation, self.privacy
        _require(privacy.enabled and privacy.noise == "gaussian" and not privacy.noise_multiplier,
                 "federation.secure_aggregation", "needs privacy.enabled with the default privacy.noise "
                 "('gaussian', not fixed): its Skellam counterpart is calibrated to privacy.epsilon", fed.secure_aggregation)
        _require(fed.aggregation == "mean", "federation.aggregation",
                 f"{fed.aggregation!r} cannot be computed on a masked sum: secure aggregation gives the mean only",
                 fed.aggregation)
        _require(fed.min_replies >= 2, "federation.min_replies", "is the survivors a secure round needs (each node "
                 "adds 1/min_replies of the noise): at least 2", fed.min_replies)
        _require(fed.clients_per_round == 0 or fed.clients_per_round >= fed.min_replies, "federation.clients_per_round",
                 f"must be 0 or at least federation.min_replies ({fed.min_replies})", fed.clients_per_round)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested tables as dotted keys (``{"zo": {"lr": 1}}`` -> ``{"zo.lr": 1}``): how a config's keys are named."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


RENAMED = {"federation.run_dir": "out_dir", "federation.eval_every": "eval.every", "data.task": "task.name"}


def from_dict(data: Mapping[str, Any], cls: type = RunConfig, prefix: str = "") -> Any:
    """Build a config dataclass from nested mappings, rejecting unknown keys by their dotted name."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a table, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if f"{prefix}{key}" in RENAMED:
            raise ConfigError(f"config key '{prefix}{key}' is now '{RENAMED[prefix + key]}' (one key per concept)")
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"did you mean '{prefix}{close[0]}'? " if close else ""
            raise ConfigError(f"unknown config key '{prefix}{key}'; {hint}known keys: {sorted(fields)}")
        factory = fields[key].default_factory
        default = factory() if callable(factory) else None
        if dataclasses.is_dataclass(default):
            kwargs[key] = from_dict(value, type(default), f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, default if default is not None else fields[key].default, prefix + key)
    return cls(**kwargs)


def _coerce(value: Any, default: Any, name: str) -> Any:
    """The value checked against the type of the field's default: TOML booleans are Python ints, so
    ``rounds = true`` would otherwise pass as 1; an int where a float is expected is accepted (TOML writes
    ``epsilon = 3`` as an int)."""
    if isinstance(default, bool):
        _require(isinstance(value, bool), name, "must be true or false", value)
    elif isinstance(default, int):
        _require(isinstance(value, int) and not isinstance(value, bool), name, "must be an int", value)
    elif isinstance(default, float):
        _require(isinstance(value, (int, float)) and not isinstance(value, bool), name, "must be a number", value)
        return float(value)
    elif isinstance(default, str):
        _require(isinstance(value, str), name, "must be a string", value)
    elif isinstance(default, list):
        _require(isinstance(value, list), name, "must be a list", value)
    return value


def _merge(base: dict[str, Any], layer: Mapping[str, Any]) -> None:
    """``layer`` into ``base``, table by table: a later file's key replaces an earlier one's, its tables merge."""
    for key, value in layer.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def read_toml(path: str | Path) -> dict[str, Any]:
    """A config file's tables, or a :class:`ConfigError` naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    with p.open("rb") as fh:
        try:
            return tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {str(p)!r} is not valid TOML: {exc}") from exc


def load_config(path: str | Path | Sequence[str | Path] | None = None,
                overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Defaults, then the TOML file(s) in order (e.g. a task preset, then a model's: later keys win, tables
    merge), then dotted overrides such as ``{"privacy.epsilon": 1.0}``."""
    data: dict[str, Any] = {}
    paths = [] if path is None else [path] if isinstance(path, (str, Path)) else list(path)
    for p in paths:
        _merge(data, read_toml(p))
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for depth, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{'.'.join(parents[:depth + 1])} must be a table, got {node!r} "
                                  f"(override {dotted!r})")
        node[leaf] = value
    return from_dict(data).validate()


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with the value parsed as a TOML value (``lr=1e-4``, ``patterns=["*norm*"]``); bare words
    are taken as strings (``model.name=smollm2``)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


CONFIG_FILE_KEY = "config-file"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    return repr(value)


def describe(config: RunConfig) -> str:
    """``config`` as a TOML file that load_config reads back, every key with its field's help: what ``seedtune
    config`` prints, the reference of every key."""
    top, tables = [], []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, Settings):
            rows = [f"{g.name} = {_toml_value(getattr(value, g.name))}  # {g.metadata.get('help', '')}".rstrip(" #")
                    for g in dataclasses.fields(cast(Any, value))]
            tables.append(f"[{f.name}]\n" + "\n".join(rows))
        else:
            top.append(f"{f.name} = {_toml_value(value)}  # {f.metadata.get('help', '')}".rstrip(" #"))
    return "\n".join(top) + "\n\n" + "\n\n".join(tables) + "\n"


def cache_root() -> Path:
    """Where seedtune keeps what it can rebuild (de-quantised models, noise searches, node caches)."""
    return Path(os.environ.get("SEEDTUNE_CACHE", Path.home() / ".cache" / "seedtune"))


def config_from_flower(run_config: Mapping[str, Any]) -> RunConfig:
    """A Flower run config (``[tool.flwr.app.config]`` plus ``--run-config``): ``config-file`` names optional
    TOML files (comma-separated, applied in order: e.g. a task preset, then a model's), every other key is a
    dotted override such as ``federation.rounds``. An empty string is the app config's "unset" (``data.data_dir``,
    ``federation.allowed_nodes``, ...): it leaves a file's value in place."""
    paths = [p.strip() for p in str(run_config.get(CONFIG_FILE_KEY) or "").split(",") if p.strip()]
    overrides = {k: v for k, v in run_config.items() if k != CONFIG_FILE_KEY and not (paths and v == "")}
    config = load_config(paths, overrides)
    for path in paths:  # a preset's app-config keys never apply: say so rather than run something else silently
        beaten = {k: v for k, v in flatten(read_toml(path)).items() if k in overrides and overrides[k] != v}
        if beaten:
            log.warning("config-file %s: %s set by the run config (pyproject.toml's app config or --run-config), "
                        "which beats a file; pass the file's values as overrides to use them", path,
                        ", ".join(f"{k} = {overrides[k]!r}, not {v!r}" for k, v in beaten.items()))
    return config


def recipe_overrides(path: str | Path, yours: str = "") -> str:
    """A recipe file's keys (e.g. configs/federated_dpzo.toml) as a Flower ``--run-config`` string, leaving out
    each key that ``yours`` (the user's own overrides) sets. A recipe cannot be a ``config-file``: the app
    config's values beat a file's, so its keys must come as overrides, and Flower refuses a key given twice."""
    recipe = flatten(read_toml(path))
    from click import ClickException
    from flwr.common.config import parse_config_args

    try:  # the user's keys as Flower will read them (a quoted value may hold "key=")
        given = set(parse_config_args([yours])) if yours.strip() else set()
    except ClickException as exc:
        raise ConfigError(f"overrides {yours!r}: {exc.message}") from exc
    return " ".join(f"{key}={json.dumps(value)}" for key, value in recipe.items() if key not in given)
