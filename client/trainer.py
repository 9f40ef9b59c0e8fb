"""Centralized private ZO training: the federated client's local loop run to completion on one machine.

The loop reads like the algorithm: pick the trainable set (data-free), calibrate the noise for the whole
run, then per stage (DP-ZOSO) and step: draw a public seed, estimate a privatised scalar on a Poisson
batch, apply ``theta += -lr * scalar * z(seed)`` through the same code a replaying server uses, pull towards
the stage anchor, and record the step with the accountant. Each (seed, coeff) also goes into the run's ledger,
the same hash-chained history a federation keeps, so ``seedtune replay`` rebuilds the finetuned model from the
base weights in seconds (where the run is such a history: one trainable set and no proximal pull).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, cast

import numpy as np
import torch
from tqdm.auto import tqdm

from seedtune.client.privacy_ledger import data_key
from seedtune.client.zo_step import StepResult, ZoModel, zo_step
from seedtune.shared.protocol.aggregation import ACCEPTED, RoundRule, update_scale
from seedtune.shared.protocol.ledger import Ledger, Provenance
from seedtune.shared.privacy.accounting import PrivacyAccountant, StepRun, noise_epsilon
from seedtune.shared.task.config import ConfigError, RunConfig, directions_per_step, flatten
from seedtune.shared.protocol.digest import model_digest
from seedtune.shared.engine.directions import seed_stream, step_seeds
from seedtune.shared.task.loading import load_task_model
from seedtune.shared.task.placement import placement
from seedtune.shared.privacy.noise import Noise, SecureRandom
from seedtune.shared.privacy.noise_search import plan_noise
from seedtune.client.schedule import stages
from seedtune.shared.engine.selection import TrainableSet
from seedtune.shared.engine.replica import OPERATIONAL_KEYS, float32_model, ledger_header, select_trainable
from seedtune.shared.task.tasks import load_split, local_files, with_labels
from seedtune.shared.task.tracking import Tracker, check_backend, open_tracker
from seedtune.shared.engine.update import ScoredView
from seedtune.shared.protocol.run_folder import (CONFIG_FILE, DATA_PIN_FILE, LEDGER_FILE, METRICS_FILE, SUMMARY_FILE,
                                                 anchors_of, check_anchor_home, ends_with_newline, write_home_anchor)

log = logging.getLogger(__name__)


@dataclass
class PrivacyPlan:
    sample_rate: float
    noise: Noise | None  # None without privacy
    steps: int


def plan_privacy(config: RunConfig, train_size: int) -> PrivacyPlan:
    if config.privacy.unit != "example":
        raise ConfigError(f"privacy.unit = {config.privacy.unit!r} is a federation's unit (each node's data holder); "
                          f"a centralized run's records are protected one example at a time: set privacy.unit = "
                          f"'example'")
    q = config.zo.batch_size / train_size
    if q > 1:
        raise ConfigError(f"zo.batch_size {config.zo.batch_size} exceeds the training set size {train_size}")
    steps = config.schedule.total_steps
    if not config.privacy.enabled:
        return PrivacyPlan(q, None, steps)
    return PrivacyPlan(q, plan_noise(config.privacy, q, steps), steps)


TRAINER = "trainer"  # the provenance holder of a centralized run: its one data set


def private_step(view: ZoModel, ids: Sequence[Sequence[int]], labels: np.ndarray, step: int, seeds: list[int],
                 lr: float, mu: float, plan: PrivacyPlan, rng: SecureRandom, clip: float | None, microbatch: int,
                 ledger: Ledger | None, accountant: PrivacyAccountant) -> tuple[StepResult, list[float]]:
    """One step of a centralized run, whoever drives it (``train``, or :class:`seedtune.PrivateZO` on a
    user's own model): the privatised scalars, accounted as soon as they exist; the ledger's round; then the
    update ``theta += -(lr / sqrt(K)) sum_k scalar_k z_k`` (one ledger entry per direction, applied in order, by the
    ledger's own rule over the released float32 scalars: a round of one reply, the trainer's)."""
    result = zo_step(view, ids, labels, seeds=seeds, mu=mu, sample_rate=plan.sample_rate, microbatch=microbatch,
                     rng=rng, clip=clip, noise=plan.noise)
    released = np.asarray(result.scalars, dtype="<f4")
    if plan.noise is not None:  # first: from here the noised scalar exists, whatever fails next
        accountant.record(plan.noise, plan.sample_rate)
    rule = RoundRule("mean", update_scale(lr, len(seeds)))
    coeffs = [float(c) for c in rule.coefficients(released[None, :])]
    if ledger is not None:  # then the history, then the weights: a failed commit leaves the model as the ledger has it
        ledger.commit_round(step, result.seeds, coeffs, [Provenance(0, TRAINER, ACCEPTED, released.tobytes())],
                            rule)
    view.apply_all(list(zip(result.seeds, coeffs)))  # one call per round, as every applier makes it
    return result, coeffs


def _not_a_ledger(config: RunConfig) -> str | None:
    """Why this run's weights are not base + sum of coeff * z(seed) over one trainable set, if they are not."""
    if config.schedule.prox > 0:
        return f"schedule.prox {config.schedule.prox} pulls the weights outside the (seed, coeff) history"
    if config.selection.mode == "prune" and config.selection.strategy != "static":
        return f"selection.strategy {config.selection.strategy!r} changes the trainable set between stages"
    return None


def _create_ledger(config: RunConfig, base_digest: str, selection: TrainableSet, noise: Noise | None,
                   out_dir: Path) -> Ledger:
    path = out_dir / LEDGER_FILE
    for old in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        if old.exists():
            log.warning("replacing %s from an earlier run in the same folder", old)
            old.unlink()
    return Ledger.create(path, ledger_header(config, base_digest, selection.digest(), noise))


# Where and how this machine runs the passes: a run may resume elsewhere (the ledger replays the same float32
# values on any device, and the privacy accounting does not depend on it).
RESUME_MAY_CHANGE = ("out_dir", "threads", "model.device", "model.microbatch", "model.feature_cache_mb")


def _interrupted(out_dir: Path) -> bool:
    return (out_dir / LEDGER_FILE).is_file() and (out_dir / CONFIG_FILE).is_file() and \
        not (out_dir / SUMMARY_FILE).is_file()


def _check_resumable(config: RunConfig, out_dir: Path) -> None:
    """Why ``out_dir`` cannot be resumed with ``config``, as an error (before anything is written)."""
    if not config.out_dir:
        raise ConfigError("resume needs the run folder of the interrupted run (--out DIR)")
    if (out_dir / SUMMARY_FILE).is_file():
        raise ConfigError(f"{out_dir} is a finished run ({SUMMARY_FILE} is there): nothing to resume")
    if not _interrupted(out_dir):
        raise ConfigError(f"{out_dir} holds no interrupted run to resume (it needs {CONFIG_FILE} and {LEDGER_FILE})")
    if (reason := _not_a_ledger(config)) is not None:
        raise ConfigError(f"this run keeps no ledger ({reason}), so it cannot be resumed")
    saved, current = flatten(json.loads((out_dir / CONFIG_FILE).read_text())), flatten(config.to_dict())
    differ = sorted(k for k in saved.keys() | current.keys()
                    if saved.get(k) != current.get(k) and k.split(".")[0] not in OPERATIONAL_KEYS
                    and k not in RESUME_MAY_CHANGE)
    if differ:
        shown = ", ".join(f"{k} {saved.get(k)!r} -> {current.get(k)!r}" for k in differ[:5])
        raise ConfigError(f"resume with the interrupted run's configuration ({out_dir / CONFIG_FILE}); this one "
                          f"differs in {shown}")


def data_pin(records: int, sample_rate: float, key: str) -> dict[str, Any]:
    """What the run's privacy accounting assumed of its training data: how many records, the Poisson rate over
    them, and which records (:func:`data_key`). Kept in the run folder (:data:`DATA_PIN_FILE`), never in the
    ledger: the ledger is made to be published, and the count and a digest of the private records are not."""
    return {"records": records, "sample_rate": sample_rate, "data_key": key}


def _check_data_pin(out_dir: Path, pin: dict[str, Any], train_file: str) -> None:
    """A resumed run's training data must be the data its steps so far were accounted on: appended rows lower
    the sampling rate and, with it, the epsilon the accountant would report for the steps already released."""
    path = out_dir / DATA_PIN_FILE
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} is missing: this run folder does not say which training data its steps were "
                          f"accounted on, so it cannot be resumed (start a new run folder)") from None
    except ValueError as exc:
        raise ConfigError(f"{path} is not readable JSON ({exc}); the run cannot be resumed") from None
    if saved == pin:
        return
    if not isinstance(saved, dict) or saved.get("records") != pin["records"]:
        what = (f"it has {pin['records']} records, the run's steps were accounted on "
                f"{saved.get('records') if isinstance(saved, dict) else '?'} (sampling rate "
                f"{saved.get('sample_rate') if isinstance(saved, dict) else '?'}, now {pin['sample_rate']:.6g})")
    else:
        what = "its records are not the ones the run's steps were accounted on (same count, other content or order)"
    raise ConfigError(f"the training data ({train_file}) changed since the run began: {what}; resume with the "
                      f"original file, or start a new run folder")


def _resume_ledger(out_dir: Path, header, unanchored: bool) -> Ledger:
    """The interrupted run's ledger, verified against its anchors (the last ledger record its run folder's
    metrics.jsonl wrote, and the one kept outside the run folder, :func:`shared.protocol.run_folder.home_anchor`), after
    checking it was made for this very base model, trainable set and noise (the noise is calibrated afresh from
    the same config: the same parameters). A ledger behind its anchor (a lost
    WAL, a restored copy) would release its lost steps again with fresh noise, unaccounted: refused; so is a
    ledger with steps and no anchor, unless ``unanchored`` says the user vouches for it."""
    ledger = Ledger.open(out_dir / LEDGER_FILE)
    try:
        for field in ("base_model_digest", "trainable_digest", "direction", "noise", "noise_params"):
            if getattr(ledger.header, field) != getattr(header, field):
                raise ConfigError(f"{out_dir / LEDGER_FILE}: its {field} is not this run's (a changed model "
                                  f"package or noise calibration?); it cannot be resumed")
        anchors = anchors_of(ledger.path, ledger.genesis)  # the run folder's metrics, and outside it
        if not anchors and ledger.last_round and not unanchored:
            raise ConfigError(f"{out_dir / METRICS_FILE} anchors none of the ledger's {ledger.last_round} steps "
                              f"(deleted or emptied?) and this machine keeps no anchor of it outside the run folder "
                              f"(run_folder.anchor_home()), so a ledger that lost steps could not be told from a "
                              f"whole one: restore them, or resume with --unanchored if you vouch for this ledger")
        ledger.verify(anchors)
    except BaseException:
        ledger.close()
        raise
    return ledger


def train(config: RunConfig, progress: bool = True, on_loop_start: Callable[[], object] | None = None,
          resume: bool = False, unanchored: bool = False) -> dict[str, Any]:
    """Run the whole training (see :func:`_train`); a tracker it opened is closed whatever happens, a failed
    run's marked as failed."""
    opened: list[Tracker] = []
    try:
        return _train(config, progress, on_loop_start, resume, unanchored, opened)
    except BaseException:
        for tracker in opened:
            tracker.close(failed=True)
        raise


def _train(config: RunConfig, progress: bool, on_loop_start: Callable[[], object] | None, resume: bool,
           unanchored: bool, opened: list[Tracker]) -> dict[str, Any]:
    """Run the whole training; ``on_loop_start`` is called once, right before the first step (a benchmark
    resets its peak-memory counter there to measure the training phase apart from the setup).

    ``resume``: continue the interrupted run in ``config.out_dir`` (the same configuration and training data,
    and a ledger that reaches its anchor, or it is refused; ``unanchored`` accepts a ledger with no anchor).
    Its ledger is the run's record of what was released: each committed round is one step accounted at the
    run's noise and sampling rate, so the accountant continues from them (a step computed but not committed
    released nothing), the weights are replayed from them, and the remaining steps follow."""
    start = time.time()
    if config.threads:
        torch.set_num_threads(config.threads)
    # Every input is loaded and checked before the run folder is made: a bad data file or a device this
    # machine lacks leaves nothing behind.
    device, dtype = placement(config.model)
    check_backend(config.tracking)
    check_anchor_home()
    given = config  # as the user gave it: what a tracker is told
    config = with_labels(config, "test")  # public: never the private training split's
    train_split = load_split(config, "train")
    test_split = load_split(config, "test")
    dev_split = load_split(config, "dev", config.eval.dev_size)
    task = load_task_model(config.model, config.task)
    out_dir = Path(config.out_dir or f"runs/train-{time.strftime('%Y%m%d-%H%M%S')}")
    if resume:
        _check_resumable(config, out_dir)
    elif _interrupted(out_dir):
        raise ConfigError(f"{out_dir} holds an interrupted run (a ledger, no {SUMMARY_FILE}): continue it with "
                          f"--resume, or choose another folder (--out)")
    train_ids, train_labels = task.examples(train_split)
    test_set = task.eval_set(test_split)
    # the periodic dev evaluation (public-split monitoring) is a classifier's accuracy
    dev_ids, dev_labels = task.examples(dev_split) if not task.generation else ([], dev_split.labels[:0])
    log.info("task %s (%s), model %s (%s), %d train / %d test / %d dev examples", config.task.name,
             f"{len(config.task.labels)} labels" if not task.generation else "generation", task.name, task.kind,
             len(train_ids), len(test_set), len(dev_ids))
    if not len(dev_ids) and config.eval.every:
        log.info("no periodic evaluation: it needs a dev split and a classification task")

    plan = plan_privacy(config, len(train_ids))
    pin = data_pin(len(train_split), plan.sample_rate,
                   data_key(zip(train_split.records, train_split.answers(config.task.labels))))
    if resume:
        files = local_files(config.data, config.task.name)
        _check_data_pin(out_dir, pin, str(files["train"]) if files else f"the hub's {config.task.name} train split")
    private = config.privacy.enabled

    # The base digest and the first trainable set come from the float32 model on the CPU (as every replica
    # derives them); then the forward passes move to their device and dtype.
    not_a_ledger = _not_a_ledger(config)
    base_digest = model_digest(task.module) if not_a_ledger is None else None
    selection = select_trainable(task, config, 0)
    view = ScoredView.placed(task, selection, config.zo.direction, device, dtype, config.model.feature_cache_mb)
    log.info("forward passes on %s in %s; %d trainable entries (%.3f%%), digest %s", device, config.model.dtype,
             selection.size, 100 * selection.fraction_of(task.module), selection.digest()[:16])
    directions = directions_per_step(config.zo.directions, selection.size)
    log.info("sampling rate %.3g, %d steps of %d direction(s)%s, noise %s", plan.sample_rate, plan.steps,
             directions, " (a full Hadamard frame)" if not config.zo.directions else "",
             plan.noise.describe() if plan.noise else "none")
    out_dir.mkdir(parents=True, exist_ok=True)  # every input checked out: from here the run writes its folder
    if not resume:
        (out_dir / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2))
        (out_dir / DATA_PIN_FILE).write_text(json.dumps(pin, indent=2))
    if resume:
        # a run folder to resume holds a ledger, so its run is one (base_digest is set)
        ledger = _resume_ledger(out_dir, ledger_header(config, cast(str, base_digest), selection.digest(),
                                                       plan.noise), unanchored)
    elif base_digest is not None:
        ledger = _create_ledger(config, base_digest, selection, plan.noise, out_dir)
    else:
        ledger = None
        log.warning("no ledger for this run (%s): its model cannot be rebuilt with seedtune replay", not_a_ledger)

    tracker = open_tracker(config.tracking, out_dir, flatten(given.to_dict()))
    if tracker is not None:
        opened.append(tracker)
    zero_shot = task.evaluate(test_set, config.model.microbatch, progress)
    log.info("zero-shot test %s", ", ".join(f"{k} {v:.4f}" for k, v in zero_shot.items() if isinstance(v, float)))

    rng = SecureRandom()
    seeds = seed_stream(config.zo.seed) if config.zo.seed else iter(rng.seed64, None)
    accountant = PrivacyAccountant()
    done = 0
    if resume and ledger is not None:
        done = ledger.last_round
        view.apply_all([(e.seed, e.coeff) for e in ledger.entries()])
        if private:
            accountant.record(plan.noise, plan.sample_rate, done)
        if config.zo.seed:  # a fixed seed stream continues where the run stopped
            for _ in range(done):
                step_seeds(config.zo.direction, seeds, directions)
        log.info("resuming %s at step %d of %d (weights replayed from its ledger; epsilon so far %s)", out_dir,
                 done, plan.steps, f"{accountant.epsilon(config.privacy.delta):.4g}" if private else "none")
    # the frozen part of every training record once, where the steps to come draw each record at least once
    # (a set that changes per stage: this view serves the first stage only)
    static = config.selection.mode != "prune" or config.selection.strategy == "static"
    view_steps = plan.steps - done if static else config.schedule.stage_steps[0]
    view.prepare(train_ids, view_steps * plan.sample_rate, progress)
    metrics_path = out_dir / METRICS_FILE
    bar = tqdm(total=plan.steps, initial=done, desc="DP-ZO" if private else "MeZO", unit="step",
               disable=not progress)
    loop_start = None  # set at the first step, after the first trainable set is chosen (pruning is setup)
    torn = resume and not ends_with_newline(metrics_path)
    with metrics_path.open("a" if resume else "w", buffering=1) as metrics:  # line-buffered: readable while training
        if torn:  # a row the kill cut short stays a line of its own (readers skip it)
            metrics.write("\n")
        if config.eval.every and len(dev_ids) and not resume:
            dev0 = task.accuracy(dev_ids, dev_labels, config.model.microbatch)
            metrics.write(json.dumps({"step": 0, "dev_accuracy": dev0}) + "\n")
            if tracker is not None:
                tracker.log({"dev_accuracy": dev0}, 0)
        for stage in stages(config.schedule, config.zo.lr, config.zo.mu):
            if stage.index > 0 and config.selection.mode == "prune" and config.selection.strategy != "static":
                new = select_trainable(task, config, stage.index)  # float32 only (RunConfig.validate)
                if config.selection.strategy == "incremental":
                    new = new.union(selection, [n for n, _ in task.module.named_parameters()])
                selection = new
                view = ScoredView(task, selection, config.zo.direction,
                                  feature_cache_mb=config.model.feature_cache_mb)
                view.prepare(train_ids, stage.steps * plan.sample_rate, progress)
                log.info("stage %d: %d trainable entries (%.3f%%), digest %s", stage.index, selection.size,
                         100 * selection.fraction_of(task.module), selection.digest()[:16])
            anchor = view.values() if config.schedule.prox > 0 else None
            for t in range(max(stage.first_step, done), stage.first_step + stage.steps):
                if loop_start is None:
                    if on_loop_start is not None:
                        on_loop_start()
                    loop_start = time.perf_counter()  # the steps alone (dev evaluations included, if any)
                result, coeffs = private_step(
                    view, train_ids, train_labels, t + 1, step_seeds(config.zo.direction, seeds, directions), stage.lr,
                    stage.mu, plan, rng, config.privacy.clip if private else None, config.model.microbatch,
                    ledger, accountant)
                if anchor is not None:
                    view.pull_towards(anchor, stage.lr * config.schedule.prox)
                bar.update(1)
                bar.set_postfix(stage=stage.index, loss=f"{result.loss:.3f}")
                row: dict[str, Any] = {"step": t + 1, "stage": stage.index, "batch": result.batch_size, "clipped": result.clipped,
                       "nonfinite": result.nonfinite, "loss": result.loss}
                if directions == 1:  # (K coefficients are the ledger's business)
                    row["coeff"] = coeffs[0]
                if ledger is not None:  # the anchors outside the ledger file that a resumed run checks it against
                    record = ledger.record_at(t + 1)
                    row["ledger_record"] = record.hex()
                    write_home_anchor(ledger.path, ledger.genesis, t + 1, record)
                if config.eval.every and (t + 1) % config.eval.every == 0 and len(dev_ids):
                    row["dev_accuracy"] = task.accuracy(dev_ids, dev_labels, config.model.microbatch)
                    bar.write(f"step {t + 1}: dev accuracy {row['dev_accuracy']:.4f}")
                metrics.write(json.dumps(row) + "\n")
                if tracker is not None:
                    tracker.log(row, t + 1)
    bar.close()
    train_s = time.perf_counter() - loop_start if loop_start is not None else 0.0  # (resumed after its last step)
    if ledger is not None:
        ledger.close()

    test = task.evaluate(test_set, config.model.microbatch, progress)
    epsilon = accountant.epsilon(config.privacy.delta) if private else None  # non-private: no guarantee
    # With a ledger, `seedtune replay <ledger> --out DIR` rebuilds this model: the same model_digest.
    digest = model_digest(float32_model(task, config, view).module) if ledger is not None else None
    summary = {
        "model": task.name,
        "task": config.task.name,
        "labels": config.task.labels,
        "device": str(device),
        "dtype": config.model.dtype,
        "steps": plan.steps,
        "directions_per_step": directions,
        "epsilon": epsilon,
        # each stage's steps alone: one PLD composition of these runs is "epsilon"
        "epsilon_per_stage": [noise_epsilon((StepRun(plan.noise, plan.sample_rate, n),), config.privacy.delta)
                              for n in config.schedule.stage_steps] if plan.noise is not None else None,
        "delta": config.privacy.delta if private else None,
        "noise": plan.noise.family if plan.noise else None,
        "noise_params": plan.noise.describe() if plan.noise else None,
        "noise_std": plan.noise.std if plan.noise else 0.0,  # per unit of clip (the Gaussian's sigma)
        "sample_rate": plan.sample_rate,
        "trainable_entries": selection.size,
        "trainable_fraction": selection.fraction_of(task.module),
        # on the public test split, after training and before it (zero-shot): classification's accuracy,
        # macro-F1 and per label examples, predicted, correct; generation's BLEU, ROUGE-L, perplexity, examples
        **{f"test_{k}": v for k, v in test.items()},
        **{f"zero_shot_{k}": v for k, v in zero_shot.items()},
        "train_size": len(train_ids),
        "test_size": len(test_set),
        "train_s": round(train_s, 3),
        "wall_s": round(time.time() - start, 2),
        "resumed_at_step": done if resume else None,
        "out_dir": str(out_dir),
        "ledger": str(out_dir / LEDGER_FILE) if ledger is not None else None,
        "model_digest": digest,
    }
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    if tracker is not None:  # the guarantee and the public test split's figures (not the training set's size)
        tracker.log({"epsilon": epsilon, **{k: v for k, v in summary.items() if k.startswith(("test_", "zero_shot_"))}},
                    plan.steps)
        tracker.close()
        opened.remove(tracker)
    return summary
