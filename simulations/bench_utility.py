"""Benchmark: the utility/cost table. Privacy, accuracy, memory, time and communication of every method.

    python -m seedtune.simulations.bench_utility --json [--mode quick|full] [--out DIR] [--jobs 1]
                                        [--models ...] [--methods ...] [--tasks sst2 trec rte] [--resume]

Methods, on SST-2 (``--tasks``: also TREC and RTE through their presets, configs/<task>.toml) with the same
task loss (shared.task.models.TextClassifier, cross-entropy):

* ``zero-shot``: the base model, no step.
* ``dpzo`` (epsilon 1, 3, 8) and ``mezo`` (the same engine, privacy off): client/trainer.py ``train``.
* ``dpsgd`` (epsilon 1, 3, 8; DP-Adam, Opacus ghost clipping), ``dpsgd-lora`` (epsilon 3) and ``finetune``
  (the same loop without privacy): client/baselines/dpsgd.py.
* ``probe`` and ``dp-probe`` (epsilon 1, 3, 8): what a user would write instead, a linear head on the frozen
  model's features, plainly or by DP-SGD on the head alone (client/baselines/probe.py).
* ``dpzo-head`` (epsilon 1, 3, 8): the head stage, DP-ZO over a Hadamard frame on the head (selection.mode =
  "head"), on the features of the plan's head (a decoder: ``model.decoder_head``, ``model.head_layer``), and
  ``dp-probe-recipe``: the DP probe on those same features, which tells the features' gain from the method's.
* ``fed-dpzo``: a real federated DP-ZO round (server loop + ClientApp handlers, in-process transport) and
  ``fed-dpsgd``: a real Flower FedAvg simulation of the DP-SGD clients. Their rows exist for the uplink
  (bytes per client per round, measured as Flower ships each message); their few steps are not meant to
  move accuracy.

Each row runs in a fresh subprocess (``--row``), so its peak RSS (VmHWM, model load and evaluation
included, as a user's process sees it) and its CPU seconds (``cpu_s``, user + system, the whole row: what
"equal CPU time" compares) are its own. Epsilon is always our PLD accountant's. Writes
``rows.jsonl`` (one JSON object per row, appended as rows finish), ``table.md`` and ``plot.png`` to
``--out`` (default a new ``runs/bench-utility-<time>``); ``--json`` also prints each row as one JSON line. A
folder that already holds rows (the committed ``results/utility`` among them) is continued with ``--resume``,
redrawn with ``--report-only`` or replaced with ``--overwrite``, never rewritten otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from seedtune.shared.protocol.run_folder import METRICS_FILE, PRIVACY_LEDGER_FILE

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
DELTA = 1e-5
EPSILONS = (1.0, 3.0, 8.0)
METHODS = ("zero-shot", "probe", "dp-probe", "dp-probe-recipe", "mezo", "dpzo", "dpzo-head", "finetune", "dpsgd",
           "dpsgd-lora", "fed-dpzo", "fed-dpsgd")
PROBE_METHODS = ("probe", "dp-probe", "dp-probe-recipe")  # a linear head on frozen features (train_probe)
TASKS = ("sst2", "trec", "rte")  # sst2: the embedded default; the others layer configs/<task>.toml
ROWS_DIR = "rows.d"  # one JSON file per finished row
ROW_FIELDS = ("task", "model", "method", "epsilon_target", "epsilon_spent", "delta", "test_accuracy", "zero_shot_accuracy",
              "steps", "batch_size", "peak_rss_mb", "s_per_step", "s_per_example", "bytes_per_client_round",
              "trainable_params", "cpu_s", "wall_s")


@dataclass(frozen=True)
class ModelPlan:
    """Per-model settings: the DP-ZO config (a TOML file, overrides) and the step budgets.

    ``steps`` is the shared budget of the main comparison (DP-ZO at every epsilon, MeZO, DP-SGD at epsilon 3,
    finetuning); ``long_dpzo_steps`` adds DP-ZO epsilon-3 rows at other budgets; ``short_steps`` is the
    budget of the costliest extras (DP-SGD at epsilon 1 and 8, LoRA), cut for CPU time and noted as such."""

    name: str
    zo_file: str | None  # configs/*.toml for the DP-ZO rows (relative to the repository)
    steps: int
    short_steps: int
    batch_size: int  # expected batch of every trained row (DP-ZO's zo.batch_size)
    long_dpzo_steps: tuple[int, ...] = ()
    fo_lr: float = 5e-5  # DP-Adam, full (small: at batch 32-64 the noise dominates each coordinate)
    ft_lr: float = 2e-5  # Adam, non-private full finetuning
    lora_lr: float = 5e-4  # DP-Adam, LoRA adapters
    clip: float = 1.0  # first-order per-example clip
    microbatch: int = 16  # evaluation (and DP-ZO forward) batch
    train_size: int = 0  # 0: the whole split
    test_size: int = 0
    zo_overrides: dict[str, Any] = field(default_factory=dict)
    fed_train_size: int = 400  # federated rows: a small class-balanced subset, split over the clients
    fed_test_size: int = 128
    # the linear probes (client/baselines/probe.py): chosen on SST-2's public dev split (docs/results.md)
    probe_steps: int = 1000
    probe_batch: int = 256
    probe_lr: float = 1.0  # plain SGD on unit-norm features
    # DP-ZO on the head alone (selection.mode = "head"): a Hadamard frame of K = n >= head size directions (a step is
    # then DP-SGD on the head, shared.engine.directions), the probe's batch, steps, learning rate and clip
    head_width: int = 0  # head entries per label: hidden + 1 (encoder: a bias) or hidden (decoder)
    # a decoder's head for the head stage and dp-probe-recipe: "centred" (layer head_layer's state less the
    # template's, at unit norm; shared.task.decoder); an encoder keeps "label_rows" (its own head on its features)
    decoder_head: str = "label_rows"
    head_layer: int = 0


@dataclass(frozen=True)
class RowSpec:
    model: str
    method: str
    epsilon: float | None
    steps: int
    mode: str
    threads: int
    budget: str = "main"  # "main" (the shared step budget), "long", "short" (cut for CPU time) or "fed"
    note: str = ""
    task: str = "sst2"
    draws: int = 1  # probe rows: heads trained on the same features, each with fresh noise (their mean reported)

    @property
    def key(self) -> str:
        return row_key(self.task, self.model, self.method, self.epsilon, self.steps, self.draws)

    @property
    def slug(self) -> str:
        return self.key.replace("/", "-")


def row_key(task: str, model: str, method: str, epsilon: float | None, steps: int, draws: int = 1) -> str:
    """A row's identity; SST-2 rows keep the key they had before rows had a task (results/utility/), one-draw
    rows the key they had before probe rows had draws (a resumed run with another --probe-draws reruns them)."""
    return (f"{model}/{method}/{epsilon}/{steps}" + ("" if task == "sst2" else f"/{task}")
            + (f"/x{draws}" if draws > 1 else ""))


FED_CLIENTS, FED_ROUNDS_DPZO, FED_LOCAL_STEPS_DPZO, FED_ROUNDS_FO, FED_LOCAL_STEPS_FO = 2, 1, 10, 2, 2
_TINY: dict[str, Any] = dict(zo_file=None, steps=8, short_steps=4, batch_size=16, fo_lr=1e-3, ft_lr=1e-3, lora_lr=1e-2,
             train_size=1000, test_size=128, zo_overrides={"zo.lr": 1e-2, "privacy.clip": 5.0},
             fed_train_size=200, fed_test_size=64, probe_steps=20, probe_batch=32)
PLANS: dict[str, dict[str, ModelPlan]] = {
    "quick": {"tiny-encoder": ModelPlan(name="tiny-encoder", head_width=33, **_TINY),
              "tiny-decoder": ModelPlan(name="tiny-decoder", head_width=32, decoder_head="centred", head_layer=1,
                                        **_TINY)},
    "full": {
        # configs/smollm2_eps3.toml's settings (batch 32, clip 10, microbatch 8, its trainable set and lr) in one
        # stage. The shared budget is 100 steps: a ghost-clipping DP-SGD step of SmolLM2 costs about 4 DP-ZO steps
        # on this CPU. results/utility/ was measured with the earlier config (1% of all weights, lr 1e-3).
        "smollm2": ModelPlan(name="smollm2", zo_file="configs/smollm2_eps3.toml", steps=100, short_steps=10,
                             batch_size=32, long_dpzo_steps=(250,), microbatch=8, head_width=576,
                             probe_lr=3.0,  # its own dev sweep (docs/results.md)
                             # the centred state of layer 22 of 30: chosen on SST-2's public dev split (docs/results.md)
                             decoder_head="centred", head_layer=22),
        # configs/quickstart.toml's settings (batch 64, lr 1e-3, clip 5) in one 50-step stage (CPU time).
        "minilm": ModelPlan(name="minilm", zo_file="configs/quickstart.toml", steps=50, short_steps=20,
                            batch_size=64, long_dpzo_steps=(300,), microbatch=64, head_width=385),
    },
}
# Run order of the full plan: what the acceptance checks first (DP-SGD vs DP-ZO at epsilon 3 and equal
# steps, the uplinks), then the epsilon sweep, so that a run cut short on a busy machine still has them.
# Rows of models not named here (the quick plan's) run in plan order.
RUN_ORDER = (
    ("smollm2", ("dpsgd@3", "dpzo@3", "finetune", "zero-shot", "fed-dpzo@3", "fed-dpsgd@3", "dpzo@1", "dpzo@8",
                 "dpsgd@1", "dpsgd@8")),
    ("minilm", ("zero-shot", "dpzo@3", "dpsgd@3", "finetune")),
    ("smollm2", ("mezo",)),
    ("minilm", ("dpzo@1", "dpzo@8", "mezo", "dpsgd@1", "dpsgd@8", "dpsgd-lora@3", "fed-dpzo@3", "fed-dpsgd@3")),
    ("smollm2", ("dpsgd-lora@3", "dpzo-long@3")),
)


def plan_rows(mode: str, models: list[str], methods: list[str], threads: int,
              epsilons: tuple[float, ...] = EPSILONS, tasks: tuple[str, ...] = ("sst2",)) -> list[RowSpec]:
    return [spec for task in tasks for spec in _task_rows(mode, models, methods, threads, epsilons, task)]


def _task_rows(mode: str, models: list[str], methods: list[str], threads: int, epsilons: tuple[float, ...],
               task: str) -> list[RowSpec]:
    rows: dict[tuple[str, str], RowSpec] = {}
    for name in models:
        plan = PLANS[mode][name]
        notes = {"main": "", "long": "the long DP-ZO setting (docs/results.md)",
                 "short": f"{plan.short_steps} steps only (CPU time)"}
        fed = {"fed-dpzo": f"{FED_CLIENTS} clients x {FED_ROUNDS_DPZO} round x {FED_LOCAL_STEPS_DPZO} steps",
               "fed-dpsgd": f"Flower FedAvg, {FED_CLIENTS} clients x {FED_ROUNDS_FO} rounds x {FED_LOCAL_STEPS_FO} "
                            "steps"}
        items = [("zero-shot", None, 0, "main"), ("probe", None, plan.probe_steps, "main"),
                 *[("dp-probe", e, plan.probe_steps, "main") for e in EPSILONS],
                 *[("dp-probe-recipe", e, plan.probe_steps, "main") for e in EPSILONS
                   if plan.decoder_head != "label_rows"],  # else the same features as dp-probe's
                 *[("dpzo", e, plan.steps, "main") for e in EPSILONS],
                 *[("dpzo-head", e, plan.probe_steps, "main") for e in EPSILONS],
                 ("mezo", None, plan.steps, "main"), ("dpsgd", 3.0, plan.steps, "main"),
                 ("finetune", None, plan.steps, "main"),
                 *[("dpsgd", e, plan.short_steps, "short") for e in EPSILONS if e != 3.0],
                 ("dpsgd-lora", 3.0, plan.short_steps, "short"),
                 ("fed-dpzo", 3.0, FED_ROUNDS_DPZO * FED_LOCAL_STEPS_DPZO, "fed"),
                 ("fed-dpsgd", 3.0, FED_ROUNDS_FO * FED_LOCAL_STEPS_FO, "fed"),
                 *[("dpzo", e, n, "long") for n in plan.long_dpzo_steps for e in EPSILONS]]
        for m, e, n, budget in items:
            if m not in methods or (e is not None and e not in epsilons):
                continue
            note = notes[budget] if budget != "fed" else \
                f"{fed[m]} on {plan.fed_train_size} examples (uplink measurement)"
            label = (f"{m}-long" if budget == "long" else m) + ("" if e is None else f"@{e:g}")
            rows[(name, label)] = RowSpec(name, m, e, n, mode, threads, budget, note, task)
    ordered = [rows.pop((name, label)) for name, labels in RUN_ORDER for label in labels if (name, label) in rows]
    return ordered + list(rows.values())


# ------------------------------------------------------------------------------------------ one row
def _task_files(spec: RowSpec) -> list[Path]:
    """The task preset layered after a model's (none for SST-2, the embedded default task)."""
    if spec.task not in TASKS:
        raise ValueError(f"unknown task {spec.task!r}; choose from {TASKS}")
    return [] if spec.task == "sst2" else [ROOT / "configs" / f"{spec.task}.toml"]


def _task_sections(spec: RowSpec, train_size: int, test_size: int):
    """The row's task and data sections, as a DP-ZO run of the same task reads them."""
    from seedtune.shared.task.config import load_config

    config = load_config(_task_files(spec), {"data.train_size": train_size, "data.test_size": test_size})
    return config.task, config.data


def _zo_config(plan: ModelPlan, spec: RowSpec, out_dir: str, extra: dict[str, Any] | None = None):
    from seedtune.shared.task.config import load_config

    overrides = {"model.name": plan.name, "model.microbatch": plan.microbatch, "zo.batch_size": plan.batch_size,
                 "schedule.stage_steps": [spec.steps], "eval.every": 0, "data.train_size": plan.train_size,
                 "data.test_size": plan.test_size, "threads": spec.threads, "out_dir": out_dir,
                 "privacy.enabled": spec.epsilon is not None, "privacy.delta": DELTA, **plan.zo_overrides}
    if spec.epsilon is not None:
        overrides["privacy.epsilon"] = spec.epsilon
    overrides.update(extra or {})
    return load_config(([ROOT / plan.zo_file] if plan.zo_file else []) + _task_files(spec), overrides)


def _fo_config(plan: ModelPlan, spec: RowSpec, out_dir: str, train_size: int, test_size: int):
    from seedtune.shared.task.first_order import FirstOrderConfig
    from seedtune.shared.task.config import ModelConfig

    private = spec.method not in ("finetune", "probe")
    lora = spec.method.endswith("lora")
    probe = spec.method in PROBE_METHODS
    recipe = spec.method == "dp-probe-recipe"  # the head stage's features, not the baseline's
    lr = plan.probe_lr if probe else plan.lora_lr if lora else (plan.fo_lr if private else plan.ft_lr)
    task, data = _task_sections(spec, train_size, test_size)
    return FirstOrderConfig(
        model=ModelConfig(name=plan.name, microbatch=plan.microbatch,
                          decoder_head=plan.decoder_head if recipe else "label_rows",
                          head_layer=plan.head_layer if recipe else 0),
        task=task, data=data, steps=spec.steps,
        batch_size=plan.probe_batch if probe else plan.batch_size, lr=lr, optimizer="sgd" if probe else "adam",
        private=private, epsilon=spec.epsilon or 1.0, delta=DELTA, clip=plan.clip, lora_rank=8 if lora else 0,
        probe=probe, threads=spec.threads, zero_shot=False, out_dir=out_dir).validate()


def _zero_shot(plan: ModelPlan, spec: RowSpec) -> dict[str, Any]:
    import torch

    from seedtune.shared.task.config import ModelConfig, RunConfig
    from seedtune.shared.task.loading import load_task_model
    from seedtune.shared.task.tasks import load_split

    if spec.threads:
        torch.set_num_threads(spec.threads)
    task_config, data = _task_sections(spec, 0, plan.test_size)
    config = RunConfig(model=ModelConfig(name=plan.name, microbatch=plan.microbatch), task=task_config,
                       data=data).validate()
    task = load_task_model(config.model, config.task)
    test = load_split(config, "test")
    acc = task.accuracy(task.encode(test.records), test.labels, plan.microbatch)
    return {"test_accuracy": acc, "zero_shot_accuracy": acc, "batch_size": None,
            "trainable_params": 0, "epsilon_spent": 0.0}


def _fed_dpzo(plan: ModelPlan, spec: RowSpec, out_dir: str) -> dict[str, Any]:
    from seedtune.server.federation import FederatedServer
    from seedtune.simulations.inprocess import InProcessGrid

    sample_rate = min(1.0, plan.batch_size / (plan.fed_train_size / FED_CLIENTS))
    config = _zo_config(plan, spec, out_dir, {
        "data.train_size": plan.fed_train_size, "data.test_size": plan.fed_test_size, "eval.dev_size": 32,
        "federation.rounds": FED_ROUNDS_DPZO, "federation.local_steps": FED_LOCAL_STEPS_DPZO,
        "federation.clients_per_round": 0, "federation.sample_rate": sample_rate, "out_dir": out_dir})
    # Fresh simulated data holders per row: their privacy ledger lives in the row's folder.
    grid = InProcessGrid(FED_CLIENTS, privacy_ledger=str(Path(out_dir) / PRIVACY_LEDGER_FILE))
    summary = FederatedServer(config, grid, out_dir).run()
    rows = [json.loads(line) for line in (Path(out_dir) / METRICS_FILE).read_text().splitlines()]
    return {"test_accuracy": summary["test_accuracy"], "zero_shot_accuracy": summary["zero_shot_test_accuracy"],
            "epsilon_spent": summary["epsilon_max"], "batch_size": round(sample_rate * plan.fed_train_size
                                                                            / FED_CLIENTS, 2),
            "bytes_per_client_round": max(r.get("bytes_up_max", 0) for r in rows),
            "bytes_down_per_client_round": max(r.get("bytes_down_max", 0) for r in rows),
            "trainable_params": None, "clients_agree": summary["clients_agree"]}


def _fed_dpsgd(plan: ModelPlan, spec: RowSpec, out_dir: str) -> dict[str, Any]:
    from seedtune.shared.task.first_order import FedAvgConfig
    from seedtune.simulations.fedavg import run_fedavg

    learner = _fo_config(plan, replace(spec, method="dpsgd"), "", plan.fed_train_size,
                         plan.fed_test_size)
    learner.batch_size = min(plan.batch_size, plan.fed_train_size // FED_CLIENTS)
    summary = run_fedavg(FedAvgConfig(learner=learner, rounds=FED_ROUNDS_FO, local_steps=FED_LOCAL_STEPS_FO,
                                      num_clients=FED_CLIENTS, out_dir=out_dir))
    return {"test_accuracy": summary["test_accuracy"], "zero_shot_accuracy": summary["zero_shot_accuracy"],
            "epsilon_spent": summary["epsilon_max"], "batch_size": learner.batch_size,
            "bytes_per_client_round": summary["bytes_up_per_client_round"],
            "bytes_down_per_client_round": summary["bytes_down_per_client_round"],
            "trainable_params": summary["trainable_params"]}


def run_row(spec: RowSpec) -> dict[str, Any]:
    """Run one row in this process and return it (call in a fresh process: the peak RSS is the process's)."""
    from seedtune.simulations.bench_step import peak_rss_mb, reset_peak

    setup = {"peak": 0.0}

    def training_starts() -> None:
        """Keep the peak so far (model load, data, pruning, Opacus wrapping), then measure the training phase."""
        setup["peak"] = peak_rss_mb()
        reset_peak()

    plan = PLANS[spec.mode][spec.model]
    start = time.time()
    out_dir = tempfile.mkdtemp(prefix=f"bench-{spec.model}-{spec.method}-")
    row: dict[str, Any] = {"task": spec.task, "model": spec.model, "method": spec.method,
                           "epsilon_target": spec.epsilon,
                           "delta": DELTA if spec.epsilon is not None else None, "steps": spec.steps,
                           "batch_size": plan.batch_size, "bytes_per_client_round": None, "s_per_step": None}
    if spec.method == "zero-shot":
        row.update(_zero_shot(plan, spec))
    elif spec.method in ("dpzo", "mezo"):
        from seedtune.client.trainer import train

        summary = train(_zo_config(plan, spec, out_dir), progress=False, on_loop_start=training_starts)
        row.update(test_accuracy=summary["test_accuracy"], zero_shot_accuracy=summary["zero_shot_accuracy"],
                   epsilon_spent=summary["epsilon"], trainable_params=summary["trainable_entries"],
                   noise_multiplier=summary["noise_std"], s_per_step=summary["train_s"] / spec.steps)
    elif spec.method in ("dpsgd", "dpsgd-lora", "finetune"):
        from seedtune.client.baselines.dpsgd import train_first_order

        summary = train_first_order(_fo_config(plan, spec, out_dir, plan.train_size, plan.test_size),
                                    on_loop_start=training_starts)
        row.update(test_accuracy=summary["test_accuracy"], zero_shot_accuracy=summary["zero_shot_accuracy"],
                   epsilon_spent=summary["epsilon"], trainable_params=summary["trainable_params"],
                   noise_multiplier=summary["noise_multiplier"], opacus_rdp_epsilon=summary["opacus_rdp_epsilon"],
                   s_per_step=summary["train_s"] / spec.steps)
    elif spec.method == "dpzo-head":
        from seedtune.client.trainer import train

        labels = len(_task_sections(spec, 0, 0)[0].labels)
        k = 1 << (labels * plan.head_width - 1).bit_length()
        summary = train(_zo_config(plan, spec, out_dir, {
            "selection.mode": "head", "zo.direction": "hadamard", "zo.directions": k,
            "model.decoder_head": plan.decoder_head, "model.head_layer": plan.head_layer,  # a decoder's own head
            "zo.batch_size": plan.probe_batch, "zo.lr": plan.probe_lr, "privacy.clip": plan.clip}),
            progress=False, on_loop_start=training_starts)
        row.update(test_accuracy=summary["test_accuracy"], zero_shot_accuracy=summary["zero_shot_accuracy"],
                   epsilon_spent=summary["epsilon"], trainable_params=summary["trainable_entries"],
                   noise_multiplier=summary["noise_std"], batch_size=plan.probe_batch, directions=k,
                   s_per_step=summary["train_s"] / spec.steps)
    elif spec.method in PROBE_METHODS:
        from seedtune.client.baselines.probe import train_probe

        config = _fo_config(plan, spec, out_dir, plan.train_size, plan.test_size)
        summary = train_probe(config, on_loop_start=training_starts, draws=spec.draws)
        row.update({k: summary[k] for k in ("test_accuracies", "test_accuracy_sd") if k in summary})
        row.update(test_accuracy=summary["test_accuracy"], draws=spec.draws, zero_shot_accuracy=None,
                   epsilon_spent=summary["epsilon"],
                   trainable_params=summary["trainable_params"], noise_multiplier=summary["noise_multiplier"],
                   batch_size=config.batch_size, features_s=summary["features_s"],
                   s_per_step=summary["train_s"] / spec.steps)
    elif spec.method == "fed-dpzo":
        row.update(_fed_dpzo(plan, spec, out_dir))
    elif spec.method == "fed-dpsgd":
        row.update(_fed_dpsgd(plan, spec, out_dir))
    else:
        raise ValueError(f"unknown method {spec.method!r}; choose from {METHODS}")
    if row["s_per_step"] is not None:
        row["s_per_step"] = round(row["s_per_step"], 4)
        row["s_per_example"] = round(row["s_per_step"] / row["batch_size"], 5)
    else:
        row["s_per_example"] = None
    if setup["peak"]:  # trained rows: the training phase's own peak (final evaluation included) and the setup's
        row["train_peak_rss_mb"] = round(peak_rss_mb(), 1)
        row["setup_peak_rss_mb"] = round(setup["peak"], 1)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    row.update(peak_rss_mb=round(max(peak_rss_mb(), setup["peak"]), 1), cpu_s=round(usage.ru_utime + usage.ru_stime, 1),
               wall_s=round(time.time() - start, 2), threads=spec.threads, mode=spec.mode, budget=spec.budget,
               note=spec.note)
    return row


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return pid > 0
    except OSError:
        return False


def _run_in_subprocess(spec: RowSpec, out: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "seedtune.simulations.bench_utility", "--row", json.dumps(asdict(spec)), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    # The row's log goes to a file, not a pipe: a row outlives an interrupted parent (rows.d, --resume).
    (out / ROWS_DIR).mkdir(parents=True, exist_ok=True)
    log_path = out / ROWS_DIR / f"{spec.slug}.log"
    with log_path.open("w") as err:
        done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"row {spec.key} failed (log: {log_path}):\n{log_path.read_text()[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ reports
def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1e4 else f"{value:.3g}"
    return str(value)


def write_table(rows: list[dict[str, Any]], path: Path) -> None:
    head = ["task", "model", "method", "steps", "batch", "eps target", "eps spent", "test acc", "zero-shot",
            "peak RSS MB", "training-phase peak MB", "s/step", "s/example", "uplink B/client/round", "trainable params",
            "CPU s", "wall s", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        acc = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
        cells = [r.get("task", "sst2"), r["model"], r["method"], r["steps"], _fmt(r["batch_size"], 0), _fmt(r["epsilon_target"], 0),
                 _fmt(r["epsilon_spent"]), acc(r["test_accuracy"]), acc(r["zero_shot_accuracy"]),
                 _fmt(r["peak_rss_mb"], 0), _fmt(r.get("train_peak_rss_mb"), 0), _fmt(r["s_per_step"], 2), _fmt(r["s_per_example"], 4),
                 _fmt(r["bytes_per_client_round"]), _fmt(r["trainable_params"]), _fmt(r.get("cpu_s"), 0), _fmt(r["wall_s"], 0), r["note"]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    path.write_text("\n".join(lines + [""] + comparisons(rows)) + "\n")


def comparisons(rows: list[dict[str, Any]]) -> list[str]:
    """The acceptance figures, computed from the rows: DP-ZO vs DP-SGD peak memory at epsilon 3 and equal
    steps, FedAvg vs DP-ZO uplink, the accuracy gaps at the shared step budget, and DP-ZO against the DP
    linear probe at each epsilon (with both rows' CPU seconds)."""
    lines = []
    for task in sorted({r.get("task", "sst2") for r in rows}):
        lines += _task_comparisons([r for r in rows if r.get("task", "sst2") == task], task)
    return lines


def _task_comparisons(rows: list[dict[str, Any]], task: str) -> list[str]:
    def find(model: str, method: str, budget: str, epsilon: float | None = 3.0) -> dict[str, Any] | None:
        return next((r for r in rows if (r["model"], r["method"], r["budget"]) == (model, method, budget)
                     and r["epsilon_target"] == epsilon), None)

    lines = []
    for model in sorted({r["model"] for r in rows}):
        for epsilon in sorted({r["epsilon_target"] for r in rows if r["method"] == "dp-probe"}):
            probe = find(model, "dp-probe", "main", epsilon)
            for method, budget in (("dpzo", "main"), ("dpzo", "long"), ("dpzo-head", "main")):
                zo = find(model, method, budget, epsilon)
                if zo and probe:
                    lines.append(f"- {task}, {model}, epsilon {epsilon:g}: {method} ({zo['steps']} steps) "
                                 f"{100 * zo['test_accuracy']:.1f} ({zo.get('cpu_s', '?')} CPU s) vs dp-probe "
                                 f"{100 * probe['test_accuracy']:.1f} ({probe.get('cpu_s', '?')} CPU s): "
                                 f"{100 * (zo['test_accuracy'] - probe['test_accuracy']):+.1f} points")
        zo, sgd, ft = find(model, "dpzo", "main"), find(model, "dpsgd", "main"), find(model, "finetune", "main", None)
        fed_zo, fed_sgd = find(model, "fed-dpzo", "fed"), find(model, "fed-dpsgd", "fed")
        if zo and sgd:
            lines.append(f"- {model}, epsilon 3, {zo['steps']} steps: DP-ZO peak RSS / DP-SGD peak RSS = "
                         f"{zo['peak_rss_mb']:.0f} / {sgd['peak_rss_mb']:.0f} MB = "
                         f"{zo['peak_rss_mb'] / sgd['peak_rss_mb']:.3f}; test accuracy DP-ZO "
                         f"{100 * zo['test_accuracy']:.1f} vs DP-SGD {100 * sgd['test_accuracy']:.1f} "
                         f"({100 * (zo['test_accuracy'] - sgd['test_accuracy']):+.1f} points)"
                         + (f", vs non-private finetuning {100 * ft['test_accuracy']:.1f} "
                            f"({100 * (zo['test_accuracy'] - ft['test_accuracy']):+.1f} points)" if ft else ""))
        zo_train = [r for r in rows if r["model"] == model and r["method"] == "dpzo" and r.get("train_peak_rss_mb")]
        sgd_train = [r for r in rows if r["model"] == model and r["method"] == "dpsgd" and r.get("train_peak_rss_mb")]
        if zo_train and sgd_train:  # a step's memory does not depend on epsilon: only the noise scale differs
            zo_peak = max(r["train_peak_rss_mb"] for r in zo_train)
            sgd_peak = min(r["train_peak_rss_mb"] for r in sgd_train)
            eps = {name: ", ".join(f"{r['epsilon_target']:g}" for r in group)
                   for name, group in (("zo", zo_train), ("sgd", sgd_train))}
            lines.append(f"- {model}, training phase only (the peak after model load and setup): DP-ZO at most "
                         f"{zo_peak:.0f} MB (epsilon {eps['zo']}), DP-SGD at least {sgd_peak:.0f} MB (epsilon "
                         f"{eps['sgd']}): ratio {zo_peak / sgd_peak:.3f}")
        if fed_zo and fed_sgd:
            lines.append(f"- {model}: uplink per client per round, FedAvg {fed_sgd['bytes_per_client_round']:,} B "
                         f"vs DP-ZO {fed_zo['bytes_per_client_round']:,} B ({fed_zo['steps']} steps): "
                         f"{fed_sgd['bytes_per_client_round'] / fed_zo['bytes_per_client_round']:,.0f}x")
    return lines


def write_plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("task", "sst2") == "sst2"]  # the plot is SST-2's
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    ax = axes[0]
    for i, model in enumerate(models):
        color = f"C{i}"
        for method, style in (("dpzo", "o-"), ("dpsgd", "s--")):
            pts = sorted((r["epsilon_target"], r["test_accuracy"]) for r in rows if r["model"] == model
                         and r["method"] == method and r["budget"] in ("main", "short"))
            if pts:
                ax.plot(*zip(*pts), style, color=color, label=f"{model} {method}")
        pts = sorted((r["epsilon_target"], r["test_accuracy"]) for r in rows if r["model"] == model
                     and r["method"] == "dp-probe")
        if pts:
            ax.plot(*zip(*pts), "^:", color=color, label=f"{model} dp-probe")
        for method, ls in (("zero-shot", ":"), ("probe", (0, (1, 2))), ("mezo", "-."), ("finetune", (0, (5, 1)))):
            ref = [r["test_accuracy"] for r in rows if r["model"] == model and r["method"] == method]
            if ref:
                ax.axhline(ref[0], color=color, ls=ls, lw=1, label=f"{model} {method}")
    ax.set_xscale("log")
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xticks(EPSILONS, [f"{e:g}" for e in EPSILONS])
    ax.set(xlabel="epsilon (delta = 1e-5)", ylabel="SST-2 test accuracy", title="accuracy vs epsilon")
    ax.legend(fontsize=7, ncol=2)
    ax = axes[1]
    methods = [m for m in METHODS if not m.startswith("fed-") and any(r["method"] == m for r in rows)]
    width = 0.8 / max(len(models), 1)
    for i, model in enumerate(models):
        def peak(method: str, field: str) -> float:
            return max((r.get(field) or 0 for r in rows if r["model"] == model and r["method"] == method), default=0)

        xs = [j + i * width for j in range(len(methods))]
        ax.bar(xs, [peak(m, "peak_rss_mb") for m in methods], width, label=f"{model} whole process", color=f"C{i}",
               alpha=0.45)
        ax.bar(xs, [peak(m, "train_peak_rss_mb") for m in methods], width * 0.6, color=f"C{i}", hatch="//",
               edgecolor="black", label=f"{model} training phase")
    ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(methods))], methods, rotation=20)
    ax.set(ylabel="peak RSS (MB)", title="peak memory per method (max over its rows)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print each row as one JSON line")
    parser.add_argument("--mode", choices=sorted(PLANS), default="quick")
    parser.add_argument("--out", default="", help="folder for rows.jsonl, table.md, plot.png (default: a new "
                        "runs/bench-utility-<time>)")
    parser.add_argument("--overwrite", action="store_true", help="replace the rows an existing --out folder holds")
    parser.add_argument("--models", nargs="+", help="subset of the mode's models")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=["sst2"],
                        help="tasks (SST-2, and the presets configs/trec.toml, configs/rte.toml)")
    parser.add_argument("--epsilons", nargs="+", type=float, default=list(EPSILONS),
                        help="subset of the private rows' targets")
    parser.add_argument("--jobs", type=int, default=1, help="rows run in parallel (one subprocess each)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per row")
    parser.add_argument("--probe-draws", type=int, default=1,
                        help="probe rows: heads trained on the same features with fresh noise each; the row reports "
                             "their mean, each and their spread (each draw is its own release at the row's epsilon)")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in OUT/rows.jsonl")
    parser.add_argument("--report-only", action="store_true", help="rewrite table.md and plot.png from rows.jsonl")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row spec (JSON) in this process
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    out = Path(args.out or f"runs/bench-utility-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.row:
        spec = RowSpec(**json.loads(args.row))
        # The row is also kept beside the results, so it outlives an interrupted parent (--resume collects
        # it), and marked while it runs, so a resumed parent does not start it twice.
        (out / ROWS_DIR).mkdir(parents=True, exist_ok=True)
        marker = out / ROWS_DIR / f"{spec.slug}.pid"
        marker.write_text(str(os.getpid()))
        try:
            row = run_row(spec)
            (out / ROWS_DIR / f"{spec.slug}.json").write_text(json.dumps(row))
        finally:
            marker.unlink(missing_ok=True)
        print(json.dumps(row), flush=True)
        return 0

    models = args.models or list(PLANS[args.mode])
    unknown = set(models) - set(PLANS[args.mode])
    if unknown:
        parser.error(f"models {sorted(unknown)} are not in the {args.mode} plan ({sorted(PLANS[args.mode])})")
    if args.probe_draws < 1:
        parser.error(f"--probe-draws must be >= 1, got {args.probe_draws}")
    rows_path = out / "rows.jsonl"
    held = rows_path.is_file() or any((out / ROWS_DIR).glob("*.json"))
    if held and not (args.resume or args.report_only or args.overwrite):
        parser.error(f"{out} already holds rows (rows.jsonl or {ROWS_DIR}/): --resume continues them, --report-only "
                     f"redraws their table, --overwrite replaces them; or name another --out")
    out.mkdir(parents=True, exist_ok=True)
    done = {}
    if args.resume or args.report_only:
        kept = rows_path.read_text().splitlines() if rows_path.is_file() else []
        kept += [p.read_text() for p in sorted((out / ROWS_DIR).glob("*.json"))]
        for line in kept:
            r = json.loads(line)
            done[row_key(r.get("task", "sst2"), r["model"], r["method"], r["epsilon_target"], r["steps"],
                         r.get("draws") or 1)] = r
    else:
        rows_path.unlink(missing_ok=True)
        for p in (out / ROWS_DIR).glob("*.json"):  # a fresh run starts from no rows
            p.unlink()
    running = {p.stem for p in (out / ROWS_DIR).glob("*.pid") if _alive(int(p.read_text() or 0))}
    planned = [] if args.report_only else \
        [replace(s, draws=args.probe_draws) if s.method in PROBE_METHODS else s
         for s in plan_rows(args.mode, models, args.methods, args.threads, tuple(args.epsilons), tuple(args.tasks))]
    specs = [s for s in planned if s.key not in done and not (args.resume and s.slug in running)]
    log.info("%d rows to run (%d kept), %d at a time", len(specs), len(done), args.jobs)
    rows = list(done.values())
    failed = []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool, rows_path.open("a", buffering=1) as fh:
        futures = {pool.submit(_run_in_subprocess, spec, out.resolve()): spec for spec in specs}
        for future in as_completed(futures):
            try:
                row = future.result()
            except RuntimeError as exc:  # one failed row must not cost the others: report it, keep going
                log.error("%s", exc)
                failed.append(futures[future].key)
                continue
            rows.append(row)
            fh.write(json.dumps(row) + "\n")
            if args.json:
                print(json.dumps(row), flush=True)
            log.info("row done: %s %s eps %s: acc %s, peak %s MB", row["model"], row["method"],
                     row["epsilon_target"], row["test_accuracy"], row["peak_rss_mb"])
    zero_shot = {(r.get("task", "sst2"), r["model"]): r["test_accuracy"] for r in rows if r["method"] == "zero-shot"}
    for r in rows:  # first-order rows skip the (deterministic) base-model evaluation: same model, same test set
        if r["zero_shot_accuracy"] is None:
            r["zero_shot_accuracy"] = zero_shot.get((r.get("task", "sst2"), r["model"]))
    order = {m: i for i, m in enumerate(METHODS)}
    rows.sort(key=lambda r: (r.get("task", "sst2"), r["model"], order[r["method"]], r["epsilon_target"] or 0,
                             r["steps"]))
    rows_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_table(rows, out / "table.md")
    write_plot(rows, out / "plot.png")
    if failed:
        log.error("%d rows failed: %s", len(failed), ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
