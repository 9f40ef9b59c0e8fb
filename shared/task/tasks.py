"""Task data: a task's train, test and optional dev splits, from local files or the Hugging Face hub.

A task (``shared.task.config.TaskConfig``) names its columns, its prompt and its labels; its data come from local
files read with the ``datasets`` library (CSV, TSV, JSON Lines, Parquet) or from a hub dataset. Local files
win: explicit ``data.train_file``/``test_file``/``dev_file``; else the folder ``data.data_dir`` (default: the
task's name) holding ``train.*``, ``test.*`` and optionally ``dev.*``, looked up as given, then under
``$SEEDTUNE_DATA`` and the team data folder (``shared/data`` beside the checkout). The hub
(``data.hub``/``hub_config``/``hub_splits``) is the fallback for real users; when neither is reachable the
error says where it looked.

Every bad input is a :class:`DataError` naming the file, the record or the column, raised before anything is
written: a missing file or column, an empty split, a record without text or label, a test label the task does
not know, text that is not UTF-8.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import string
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Protocol, Sequence

import numpy as np

if TYPE_CHECKING:
    from seedtune.shared.task.config import DataConfig, RunConfig, TaskConfig

log = logging.getLogger(__name__)

SPLITS = ("train", "test", "dev")
EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}

Record = tuple[str, ...]  # a record's text fields, in task.text_fields order


class DataError(ValueError):
    """A data file that is missing, unreadable or without the task's columns, a record without text or label,
    or a split with no examples; the message names the file and the record or column."""


def template_fields(template: str) -> list[str]:
    """The ``{field}`` placeholders of a prompt template, in order (ValueError for a malformed template,
    a positional ``{}`` or a format spec, which a prompt never needs)."""
    fields = []
    for _, name, spec, conversion in string.Formatter().parse(template):
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise ValueError(f"placeholder {{{name}{'!' + conversion if conversion else ''}"
                             f"{':' + spec if spec else ''}}} must be a plain {{column_name}}")
        fields.append(name)
    return fields


@dataclass(frozen=True)
class Prompter:
    """How a record becomes model input, one way for every runtime (torch and ONNX Runtime): a decoder reads
    the filled template, whose ``tail`` (the text after the last field, e.g. "\\nSentiment:") truncation keeps;
    an encoder reads the text, or the pair, as its tokenizer joins them."""

    template: str
    fields: tuple[str, ...]

    @classmethod
    def of(cls, task: "TaskConfig") -> "Prompter":
        return cls(task.template, tuple(task.text_fields))

    @property
    def tail(self) -> str:
        return self.template[self.template.rindex("}") + 1:] if "}" in self.template else ""

    def render(self, record: Record | str) -> str:
        return self.template.format(**dict(zip(self.fields, (t.strip() for t in as_record(record, self.fields)))))


def as_record(record: Record | str, fields: Sequence[str]) -> Record:
    """A record as a tuple of its text fields (a bare string is a one-field record)."""
    record = (record,) if isinstance(record, str) else tuple(record)
    if len(record) != len(fields):
        raise ValueError(f"a record of {len(record)} field(s) for a task of {len(fields)} ({list(fields)})")
    return record


@dataclass(frozen=True)
class Split:
    records: list[Record]
    labels: np.ndarray  # int64 class indices into the task's labels (generation: zeros)
    groups: list[str] | None = None  # each record's value of a grouping column (a natural partition), if read
    targets: list[str] | None = None  # generation: each record's target text

    def __len__(self) -> int:
        return len(self.records)

    def subset(self, indices: np.ndarray) -> "Split":
        groups = None if self.groups is None else [self.groups[i] for i in indices]
        targets = None if self.targets is None else [self.targets[i] for i in indices]
        return Split([self.records[i] for i in indices], self.labels[indices], groups, targets)

    def answers(self, labels: Sequence[str]) -> list[str]:
        """What each record is paired with, as the data spell it: its target (generation) or label name."""
        return list(self.targets) if self.targets is not None else [labels[y] for y in self.labels]

    def prompt_subset(self, size: int, seed: int) -> "Split":
        """Every row of ``size`` distinct prompts drawn with a public seed (a generation test split: all the
        references of each prompt kept, as BLEU against all references needs)."""
        prompts = list(dict.fromkeys(self.records))
        if size <= 0 or size >= len(prompts):
            return self
        keep = {prompts[i] for i in np.random.default_rng(seed).permutation(len(prompts))[:size]}
        return self.subset(np.flatnonzero([r in keep for r in self.records]))

    def with_min_words(self, min_words: int) -> "Split":
        """The records of at least ``min_words`` words. A rule applied to each record alone, never to the data
        as a whole, so it costs no privacy: neighbouring data sets stay neighbouring after it."""
        if min_words <= 0:
            return self
        return self.subset(np.flatnonzero([sum(len(t.split()) for t in r) >= min_words for r in self.records]))

    def hashed_subset(self, size: int, seed: int) -> "Split":
        """About ``size`` records, each kept when a salted hash of the record alone falls below
        ``size / len(self)``: removing or adding one record changes the subset by that record only, so a
        guarantee for the subset is one for the file (a class-balanced draw reshuffles whole classes). The
        split's length is public in seedtune's privacy model (docs/federation.md, "Privacy")."""
        if size <= 0 or size >= len(self):
            return self
        threshold = size / len(self)
        rows = self.records if self.targets is None else [(*r, t) for r, t in zip(self.records, self.targets)]
        keep = [_record_uniform(seed, r, int(label)) < threshold for r, label in zip(rows, self.labels)]
        return self.subset(np.flatnonzero(keep))

    def balanced_subset(self, size: int, seed: int, num_labels: int) -> "Split":
        """A class-balanced random subset (public seed): size // K examples of each of the K labels (the first
        size % K labels one more), fewer of a label that has fewer."""
        if size <= 0 or size >= len(self):
            return self
        rng = np.random.default_rng(seed)
        parts = [rng.permutation(np.flatnonzero(self.labels == c))[: size // num_labels + (c < size % num_labels)]
                 for c in range(num_labels)]
        return self.subset(np.sort(np.concatenate(parts)))


def _record_uniform(seed: int, record: Record, label: int) -> float:
    """A public pseudo-uniform in [0, 1) for one record: SHA-256 of (seed, label, text fields)."""
    digest = hashlib.sha256(f"{seed}\0{label}\0{chr(31).join(record)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2.0**64


# ------------------------------------------------------------------------------------------ locating
def data_roots() -> list[Path]:
    """Where a relative data folder is looked up: the working directory, $SEEDTUNE_DATA, then the team data
    folder (``shared/data``) beside the working directory and beside the checkout."""
    roots = [Path.cwd()]
    if os.environ.get("SEEDTUNE_DATA"):
        roots.append(Path(os.environ["SEEDTUNE_DATA"]))
    repo = Path(__file__).resolve().parents[1]
    for base in (Path.cwd(), repo):
        roots += [base / "shared" / "data", base.parent / "shared" / "data"]
    return list(dict.fromkeys(roots))


def _split_file(folder: Path, split: str) -> Path | None:
    found = [folder / f"{split}{ext}" for ext in EXTENSIONS if (folder / f"{split}{ext}").is_file()]
    if len(found) > 1:
        raise DataError(f"{folder}: more than one {split} file ({', '.join(p.name for p in found)}); keep one")
    return found[0] if found else None


def local_files(data: "DataConfig", task_name: str) -> dict[str, Path] | None:
    """The split files of a task, or None when no local folder has them (then the hub is tried)."""
    if data.train_file:
        files = {s: Path(getattr(data, f"{s}_file")) for s in SPLITS if getattr(data, f"{s}_file")}
        for split, path in files.items():
            if not path.is_file():
                raise DataError(f"data.{split}_file {str(path)!r} does not exist")
        return files
    name = data.data_dir or task_name
    folders = [Path(name)] if Path(name).is_absolute() else [root / name for root in data_roots()]
    for folder in folders:
        if folder.is_dir() and (_split_file(folder, "train") or _split_file(folder, "test")):
            files = {s: p for s in SPLITS if (p := _split_file(folder, s)) is not None}
            for split in ("train", "test"):
                if split not in files:
                    raise DataError(f"{folder}: no {split} file (expected {split}.csv, .tsv, .jsonl, .json or "
                                    f".parquet beside {', '.join(p.name for p in files.values())})")
            return files
    if data.data_dir:
        raise DataError(f"data.data_dir {data.data_dir!r}: no folder with train and test files (looked at "
                        f"{', '.join(map(str, folders))})")
    return None


# ------------------------------------------------------------------------------------------- reading
def _check_utf8(path: Path) -> None:
    """Text files must be UTF-8: a bad byte is named by its line, not left to a decoder deep in a parser."""
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                        f"save the file as UTF-8") from None


def _check_columns(path: Path, dialect: dict) -> tuple[list[str], int]:
    """A CSV/TSV file's header and its number of data rows, once every row was checked against the header. A
    repeated column name would be read as its first occurrence, and a row with more fields than the header
    shifts its values one column over (the parser takes the first as an index): both silently wrong, so both
    refused by name and line (never by content: a remote submitter may read the message)."""
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh, **dialect)
        header = next(reader, None)
        if not header:
            raise DataError(f"{path}: empty file (expected a header row naming the columns)")
        repeated = sorted({name for name in header if header.count(name) > 1})
        if repeated:
            raise DataError(f"{path}: the header names column(s) {repeated} more than once; rename or drop them")
        rows = 0
        for fields in reader:
            if not fields:
                continue  # a blank line: the parser skips it too
            if len(fields) != len(header):
                raise DataError(f"{path}:{reader.line_num}: {len(fields)} field(s) where the header names "
                                f"{len(header)} (a stray {'tab' if dialect else 'comma or quote'}?)")
            rows += 1
    return header, rows


def read_file(path: Path):
    """One split file as a ``datasets.Dataset``, every CSV/TSV column read as text (a label "01" stays "01")."""
    import datasets

    fmt = EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: unknown file type {path.suffix!r}; use one of {', '.join(EXTENSIONS)}")
    if fmt != "parquet":
        _check_utf8(path)
    if fmt == "json" and not path.read_bytes().strip():
        raise DataError(f"{path}: no examples (an empty file)")
    kwargs: dict = {}
    if fmt in ("csv", "tsv"):
        # TSV: tabs separate and quotes are text (csv.QUOTE_NONE). Every column is read as a string.
        dialect = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if fmt == "tsv" else {}
        header, rows = _check_columns(path, dialect)
        if not rows:
            raise DataError(f"{path}: no examples (a header row only)")
        kwargs = {**dialect, "keep_default_na": False,
                  "features": datasets.Features({name: datasets.Value("string") for name in header})}
    from seedtune.shared.task.config import cache_root

    datasets.disable_progress_bars()
    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False  # a holder's own file: no request to the hub's counter
    try:
        return datasets.load_dataset("csv" if fmt == "tsv" else fmt, data_files=str(path), split="train",
                                     cache_dir=str(cache_root() / "datasets"), **kwargs)
    except Exception as exc:  # a parser's error, whatever the library wraps it in: name the file
        cause = exc.__cause__ or exc
        raise DataError(f"{path}: cannot be read as {fmt}: {type(cause).__name__}: {cause}") from exc


def _hub_split(data: "DataConfig", split: str):
    import datasets

    names = dict(zip(SPLITS, data.hub_splits))
    if split not in names:
        return None
    return datasets.load_dataset(data.hub, data.hub_config or None, split=names[split])


def to_split(dataset, task: "TaskConfig", labels: Sequence[str] | None, source: str,
             group_field: str = "") -> tuple[Split, list[str]]:
    """Records and label indices from a dataset's columns (and each record's ``group_field`` value, if named).
    With ``labels`` (the task's), a value outside them is an error naming the record; without, the labels are
    the data's values, sorted (numbers numerically)."""
    columns = list(dataset.column_names)
    generation = task.kind == "generation"
    answer = task.target_field if generation else task.label_field
    wanted = [*task.text_fields, answer] + ([group_field] if group_field else [])
    for name in wanted:
        if name not in columns:
            role = {answer: "task.target_field" if generation else "task.label_field",
                    group_field: "federation.partition_by"}.get(name, "task.text_fields")
            raise DataError(f"{source}: no column {name!r} ({role}); its columns are {columns}")
    if len(dataset) == 0:
        raise DataError(f"{source}: no examples")
    table = dataset.select_columns(list(dict.fromkeys(wanted))).to_dict()  # columns as lists: fast
    texts = [table[f] for f in task.text_fields]
    raw_labels = table[answer]
    for i, value in enumerate(raw_labels):
        if value is None or str(value).strip() == "":
            raise DataError(f"{source}: record {i + 1} has no {answer!r}")
    for field_name, column in zip(task.text_fields, texts):
        for i, value in enumerate(column):
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{source}: record {i + 1} has no text in {field_name!r} (got {value!r:.60})")
    groups = [str(g) for g in table[group_field]] if group_field else None
    if generation:
        targets = [str(v).strip() for v in raw_labels]
        return Split(list(zip(*texts)), np.zeros(len(targets), dtype=np.int64), groups, targets), []
    values = [str(v).strip() for v in raw_labels]
    if not labels:
        labels = sort_labels(set(values))
    index = {label: i for i, label in enumerate(labels)}
    unknown = next(((i, v) for i, v in enumerate(values) if v not in index), None)
    if unknown is not None:
        raise DataError(f"{source}: record {unknown[0] + 1} has {task.label_field} {unknown[1]!r}, not one of the "
                        f"task's labels {list(labels)}")
    return Split(list(zip(*texts)), np.asarray([index[v] for v in values], dtype=np.int64), groups), list(labels)


def sort_labels(values: Iterable[str]) -> list[str]:
    values = list(values)
    try:
        return sorted(values, key=float)
    except ValueError:
        return sorted(values)


def load_raw(data: "DataConfig", task: "TaskConfig", split: str, labels: Sequence[str] | None = None,
             group_field: str = "") -> tuple[Split, list[str]] | None:
    """A whole split as the task reads it and the labels used; None for a dev split the data does not have."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    files = local_files(data, task.name)
    if files is not None:
        if split not in files:
            return None
        log.debug("loading %s %s from %s", task.name, split, files[split])
        return to_split(read_file(files[split]), task, labels, str(files[split]), group_field)
    if not data.hub:
        raise DataError(f"no local files for task {task.name!r} (looked for a folder {task.name!r} in "
                        f"{', '.join(map(str, data_roots()))}) and data.hub is empty; set data.data_dir or "
                        f"data.train_file/test_file")
    try:
        dataset = _hub_split(data, split)
    except Exception as exc:  # offline, no such dataset, hub error: one clear message
        raise DataError(
            f"task {task.name!r}: no local files (looked for a folder {data.data_dir or task.name!r} in "
            f"{', '.join(map(str, data_roots()))}) and the Hugging Face dataset {data.hub!r} "
            f"({data.hub_config or 'default config'}) failed ({type(exc).__name__}: {exc}). Set data.data_dir, "
            f"data.train_file/test_file or $SEEDTUNE_DATA, or allow network access to the hub."
        ) from exc
    if dataset is None:
        return None
    return to_split(dataset, task, labels, f"hub:{data.hub}/{data.hub_config}:{split}", group_field)


def load_own(config: "RunConfig", path: str | Path, split: str = "train") -> Split:
    """A data holder's own ``split`` data (its training data, or its held-out test data): the file at
    ``path``, or that split's file in the folder ``path``, read as the ledger's task reads it (its columns, its
    labels: a value outside them is an error naming the record). All of it is the holder's; ``data.min_words``
    applies to training data, as it does to every training split."""
    where = Path(path)
    file = _split_file(where, split) if where.is_dir() else where
    key = "data-path" if split == "train" else "test-path"
    if file is None or not file.is_file():
        raise DataError(f"{key} {str(path)!r}: no such file, nor a folder with a {split} file")
    part, _ = to_split(read_file(file), config.task, config.task.labels, str(file))
    if split == "train":
        part = part.with_min_words(config.data.min_words)
    if len(part) == 0:
        raise DataError(f"{file}: no {split} examples" + (f" left (data.min_words {config.data.min_words})"
                                                           if split == "train" else ""))
    return part


class WithData(Protocol):
    """A run's configuration as far as its data goes: a RunConfig, or a first-order baseline's."""

    task: TaskConfig
    data: DataConfig


def load_split(config: WithData, split: str, size: int | None = None, group_field: str = "") -> Split:
    """The examples a run uses from one split, labelled with the task's labels (which must be resolved:
    :func:`with_labels`); an empty Split for a dev split the data does not have. ``data.min_words`` applies to
    train and dev (the training distribution, e.g. SST-2's phrases), never to test (the benchmark); then a
    subset of ``size`` (default: data.train_size or data.test_size; 0 = all): kept per record by a salted
    hash for the private train split; for the public dev and test splits class-balanced, or for a generation
    task ``size`` distinct prompts with all their references."""
    data, task = config.data, config.task
    if not task.labels and task.kind == "classification":
        raise ValueError("task.labels is empty: resolve them first (shared.task.tasks.with_labels)")
    loaded = load_raw(data, task, split, task.labels, group_field)
    if loaded is None:
        return Split([], np.zeros(0, dtype=np.int64))
    part = loaded[0]
    if split != "test":
        part = part.with_min_words(data.min_words)
    if size is None:
        size = {"train": data.train_size, "test": data.test_size}.get(split, 0)
    if split == "train":
        part = part.hashed_subset(size, data.seed)
        if len(part) == 0:
            raise DataError(f"task {task.name!r}: no training examples left (data.min_words {data.min_words}, "
                            f"data.train_size {data.train_size})")
        return part
    if task.kind == "generation":
        return part.prompt_subset(size, data.seed)
    return part.balanced_subset(size, data.seed, len(task.labels))


def with_labels(config: "RunConfig", split: str = "test") -> "RunConfig":
    """``config`` with ``task.labels`` filled in from the public ``split`` (test or dev) when the config leaves
    them empty (sorted, stated in the log), and its label words and prompts checked against them. Never from
    the training split: the label set goes into the ledger header, the summary and the model card, all made to
    be published, and a label that one private record holds would be published with them."""
    import dataclasses

    from seedtune.shared.task.config import ConfigError

    if config.task.labels or config.task.kind == "generation":
        return config
    if split == "train":
        raise ConfigError("task.labels cannot come from the training split: it is private, and the label set is "
                          "published (ledger header, summary, model card); state task.labels, or let the public "
                          "test split supply them")
    loaded = load_raw(config.data, config.task, split)
    if loaded is None:
        raise DataError(f"task {config.task.name!r}: no {split} split to take task.labels from")
    labels = loaded[1]
    if len(labels) < 2:
        raise DataError(f"task {config.task.name!r}: the {split} split has one label only ({labels}); a "
                        f"classifier needs two or more")
    log.info("task.labels from the %s split (sorted): %s", split, labels)
    task = dataclasses.replace(config.task, labels=labels)
    try:
        task.validate()
    except ConfigError as exc:
        raise ConfigError(f"{exc} (task.labels from the {split} split: {labels})") from None
    return dataclasses.replace(config, task=task)


# ------------------------------------------------------------------------------------------- metrics
def label_counts(predicted: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Per label: (examples, predicted, correct), a (k, 3) array: everything accuracy and macro-F1 need, and
    what a node releases (noised) of its held-out data. One example adds at most 1 to three of the counts."""
    counts = np.zeros((k, 3), dtype=np.float64)
    np.add.at(counts[:, 0], labels, 1)
    np.add.at(counts[:, 1], predicted, 1)
    np.add.at(counts[:, 2], labels[predicted == labels], 1)
    return counts


def counts_metrics(counts: np.ndarray, names: Sequence[str]) -> dict:
    """Accuracy, macro-F1 (the mean over the labels of each label's F1, 0 for a label never predicted nor
    present) and per-label counts from :func:`label_counts`, exact or noised. Noised counts are made
    consistent first, as exact ones are (post-processing, which costs no privacy): none below 0, and no label
    with more correct than examples or predictions."""
    counts = np.clip(np.asarray(counts, dtype=np.float64), 0, None)
    counts[:, 2] = counts.min(axis=1)
    n_true, n_pred, hit = counts.T
    f1 = np.divide(2 * hit, n_true + n_pred, out=np.zeros(len(names)), where=n_true + n_pred > 0)
    total = n_true.sum()
    number = (lambda x: int(round(x))) if np.all(counts == np.round(counts)) else float
    return {"accuracy": float(hit.sum() / total) if total else float("nan"), "macro_f1": float(f1.mean()),
            "per_label": {name: {"examples": number(t), "predicted": number(p), "correct": number(c)}
                          for name, t, p, c in zip(names, n_true, n_pred, hit)}}


def classification_metrics(predicted: np.ndarray, labels: np.ndarray, names: Sequence[str]) -> dict:
    """Accuracy, macro-F1 and per-label counts (examples, predicted, correct): what a K-label summary reports."""
    return counts_metrics(label_counts(np.asarray(predicted), np.asarray(labels), len(names)), names)


def generation_metrics(hypotheses: Sequence[str], references: Sequence[Sequence[str]], nll_sum: float,
                       target_tokens: int) -> dict:
    """Corpus BLEU (sacrebleu, against all references of each prompt), mean ROUGE-L F1 (rouge-score, the best
    reference of each prompt) and the perplexity of the references (exp of the mean target-token NLL)."""
    import math

    import sacrebleu
    from rouge_score import rouge_scorer

    most = max(len(r) for r in references)
    # None: no k-th reference
    streams: list[Any] = [[r[k] if k < len(r) else None for r in references] for k in range(most)]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score_multi(list(refs), hyp)["rougeL"].fmeasure for hyp, refs in zip(hypotheses, references)]
    return {"bleu": float(sacrebleu.corpus_bleu(list(hypotheses), streams).score),
            "rouge_l": 100 * float(np.mean(rouge)), "perplexity": math.exp(nll_sum / max(target_tokens, 1)),
            "prompts": len(hypotheses), "references": sum(len(r) for r in references),
            "examples": [{"hypothesis": h, "references": list(r[:2])} for h, r in zip(hypotheses[:3], references[:3])]}
