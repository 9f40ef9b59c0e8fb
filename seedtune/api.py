"""seedtune's Python API: private zeroth-order training of your own torch model, and the command line's
``train``, ``replay``, ``verify`` and ``export`` as functions.

:class:`PrivateZO` is to zeroth-order training what Opacus's ``PrivacyEngine.make_private`` is to DP-SGD: it
wraps a model, the choice of its trainable parameters and a per-example loss into a trainer that plans its noise
for a target (epsilon, delta) over a fixed number of steps, spends it one Poisson-sampled step at a time, reports
the epsilon spent (PLD accounting of the noise actually sampled) and writes each update as a (seed, coefficient)
pair into a hash-chained ledger, from which :func:`replay` rebuilds the trained weights. The loss function is
where your data lives: it is called with the model and the indices of a batch, and returns one loss per example
(no gradients are taken; two forward passes per step).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, cast

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from seedtune.client.trainer import PrivacyPlan, private_step
from seedtune.client.zo_step import StepResult
from seedtune.shared.privacy.accounting import PrivacyAccountant
from seedtune.shared.task.config import ConfigError, PrivacyConfig, RunConfig, directions_per_step, load_config
from seedtune.shared.protocol.digest import model_digest
from seedtune.shared.engine.directions import DIRECTION_KINDS, DirectionKind, step_seeds
from seedtune.shared.protocol.chain import ChainError
from seedtune.shared.protocol.ledger import Ledger
from seedtune.shared.privacy.noise import SecureRandom
from seedtune.shared.privacy.noise_search import plan_noise
from seedtune.shared.engine.replica import own_model_header
from seedtune.shared.engine.selection import select_all, select_patterns
from seedtune.shared.engine.update import TrainableView

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, np.ndarray], torch.Tensor]


class _OwnModelView(TrainableView):
    """A trainable view scored by the user's loss: what the ZO step needs of a model (client.zo_step.ZoModel).
    Examples are passed to the step as one-element rows ``[index]``, so the step's sampling and clipping see
    the user's data set as indices only."""

    def __init__(self, model: nn.Module, selection, kind: DirectionKind, loss_fn: LossFn) -> None:
        super().__init__(model, selection, kind)
        self.model, self.loss_fn = model, loss_fn

    @torch.no_grad()
    def per_example_loss(self, ids: Sequence[Sequence[int]], labels: np.ndarray) -> np.ndarray:
        """The user's losses in eval mode: both passes of a step must see the same function (no dropout), and
        no layer may update itself from the private batch (a BatchNorm's running statistics would, unnoised)."""
        index = np.fromiter((row[0] for row in ids), dtype=np.int64, count=len(ids))
        training = self.model.training
        self.model.eval()
        try:
            losses = self.loss_fn(self.model, index)
        finally:
            self.model.train(training)
        if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (len(index),):
            shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise ValueError(f"loss_fn must return one loss per example: a tensor of shape ({len(index)},), got "
                             f"{shape}")
        return losses.detach().float().cpu().numpy()

    def check_per_example(self, num_examples: int, probe: int = 8) -> None:
        """Refuse a loss whose value for one example depends on the others in its batch (a batch mean broadcast
        to shape (B,), a loss normalised over the batch): clipping bounds each example's own scalar only if it is
        that example's alone, so the sensitivity argument, and the guarantee, would not hold. On the first
        ``probe`` examples: their losses together, in reverse order, and one by one must agree to float
        rounding. Only the refusal's name leaves this check, never a loss."""
        index = np.arange(min(probe, num_examples))
        if len(index) < 2:
            return
        rows = [[int(i)] for i in index]
        together = self.per_example_loss(rows, index)
        reversed_ = self.per_example_loss(rows[::-1], index)[::-1]
        alone = np.concatenate([self.per_example_loss([row], index[:1]) for row in rows])
        tolerance = 1e-4 * (1.0 + np.abs(alone))
        if not (np.all(np.abs(together - alone) <= tolerance) and np.all(np.abs(reversed_ - alone) <= tolerance)):
            raise ConfigError("loss_fn is not per-example: an example's loss changes with the other examples in its "
                              "batch (a batch mean broadcast to shape (B,)?). Return each example's own loss, "
                              "computed from that example alone; DP clipping bounds nothing otherwise")


class PrivateZO:
    """Differentially private zeroth-order training (DPZero) of your own model.

    Each step draws a Poisson batch (each example with probability ``batch_size / num_examples``), estimates the
    projected gradient of every example along a public random direction from two forward passes, clips it to
    ``clip``, adds noise calibrated so that all ``steps`` together are (``epsilon``, ``delta``)-DP for one
    example added or removed, and moves the trainable parameters along the direction.

    ``trainable``: glob patterns of parameter names (``*`` spans dots: ``["head.*", "*norm*"]``), or None for
    every parameter. ``directions``: K public directions per step instead of one; each example's K one-sided
    estimates (K + 1 forward passes of its batch) are clipped together in L2 and noised as one Gaussian release,
    so the epsilon is the one-direction step's. With ``direction="hadamard"`` and ``directions=0`` the K
    directions are a full Hadamard frame over the trainable entries, and the step is DP-SGD on them computed from
    forward passes only (practical for a small trainable set: a head, an adapter, a small model). ``ledger``: the file for the run's (seed, coefficient) history (None: none is kept).
    ``private=False`` runs plain MeZO (no clipping or noise; epsilon is infinite).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, num_examples: int, *, steps: int, epsilon: float = 3.0,
                 delta: float = 1e-5, clip: float = 1.0, batch_size: int = 64, lr: float = 1e-3, mu: float = 1e-3,
                 trainable: Iterable[str] | None = None, direction: str = "rademacher", directions: int = 1,
                 noise: str = "gaussian",
                 microbatch: int = 256, ledger: str | Path | None = None, private: bool = True) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise ConfigError(f"loss_fn must be callable as loss_fn(model, indices), got {loss_fn!r}")
        for name, value in (("num_examples", num_examples), ("steps", steps), ("batch_size", batch_size),
                            ("microbatch", microbatch)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name, number in (("lr", lr), ("mu", mu), ("epsilon", epsilon), ("delta", delta), ("clip", clip)):
            if not isinstance(number, (int, float)) or isinstance(number, bool) or not math.isfinite(number) \
                    or number <= 0:
                raise ConfigError(f"{name} must be a positive number, got {number!r}")
        if batch_size > num_examples:
            raise ConfigError(f"batch_size {batch_size} exceeds num_examples {num_examples}")
        if direction not in DIRECTION_KINDS:
            raise ConfigError(f"direction must be one of {DIRECTION_KINDS}, got {direction!r}")
        if not isinstance(directions, int) or isinstance(directions, bool) or directions < 0 \
                or (directions == 0 and direction != "hadamard"):
            raise ConfigError(f"directions must be an integer >= 1, or 0 (a full frame) with direction='hadamard', "
                              f"got {directions!r}")
        if directions != 1 and noise != "gaussian":
            raise ConfigError(f"directions other than 1 need noise='gaussian' (K scalars are one release of L2 "
                              f"sensitivity clip), got {noise!r}")
        if not isinstance(private, bool):
            raise ConfigError(f"private must be true or false, got {private!r}")
        if trainable is not None and (isinstance(trainable, str) or not list(trainable)):
            raise ConfigError(f"trainable must be a non-empty list of glob patterns (or None: every parameter), got "
                              f"{trainable!r}")
        self.ledger_path = Path(ledger) if ledger is not None else None
        if self.ledger_path is not None and self.ledger_path.exists():
            raise ConfigError(f"ledger {str(self.ledger_path)!r} exists: a ledger is one run's history; choose a "
                              f"new file")
        self.privacy = PrivacyConfig(enabled=private, epsilon=float(epsilon), delta=float(delta), clip=float(clip),
                                     noise=noise)
        self.privacy.validate()
        patterns = list(trainable) if trainable is not None else None
        try:
            selection = select_patterns(model, patterns) if patterns else select_all(model)
        except ValueError as exc:
            raise ConfigError(f"trainable: {exc}") from exc
        try:
            self.directions = directions_per_step(directions, selection.size)
        except ConfigError as exc:
            raise ConfigError(f"directions: {exc}") from exc
        base_digest = model_digest(model)
        q = batch_size / num_examples
        self.plan = PrivacyPlan(q, plan_noise(self.privacy, q, steps) if private else None, steps)
        self.view = _OwnModelView(model, selection, direction, loss_fn)  # checked above
        self.view.check_per_example(num_examples)
        self.model, self.lr, self.mu, self.microbatch = model, float(lr), float(mu), microbatch
        self.accountant = PrivacyAccountant()
        self.steps_done = 0
        self._rng = SecureRandom()  # the noise and the public seeds: a CSPRNG, never a user's seed
        self._ids = [[i] for i in range(num_examples)]
        self._labels = np.zeros(num_examples, dtype=np.int64)
        settings = {"model": type(model).__qualname__, "trainable": patterns, "steps": steps, "lr": self.lr,
                    "mu": self.mu, "clip": self.privacy.clip if private else None, "batch_size": batch_size,
                    "epsilon": self.privacy.epsilon if private else None, "delta": self.privacy.delta,
                    **({"directions": self.directions} if self.directions > 1 else {})}
        self.ledger = None
        self._broken: str | None = None  # why no further step may run (a step failed after its release)
        if self.ledger_path is not None:
            self.ledger_path.parent.mkdir(parents=True, exist_ok=True)
            self.ledger = Ledger.create(self.ledger_path, own_model_header(
                settings, base_digest, selection.digest(), direction, self.plan.noise))
        log.info("PrivateZO: %d trainable entries of %s, %d steps of %d direction(s) at sampling rate %.3g, noise "
                 "%s", selection.size, type(model).__name__, steps, self.directions, q,
                 self.plan.noise.describe() if self.plan.noise else "none")

    @property
    def epsilon(self) -> float:
        """The epsilon spent so far at ``delta`` (0 before the first step; infinite without privacy)."""
        if self.plan.noise is None:
            return math.inf if self.steps_done else 0.0
        return self.accountant.epsilon(self.privacy.delta)

    def step(self) -> StepResult:
        """One private step. The noise was planned for ``steps`` steps: one more would exceed the target."""
        if self._broken is not None:
            raise RuntimeError(f"this trainer cannot go on: {self._broken}")
        if self.steps_done >= self.plan.steps:
            raise RuntimeError(f"all {self.plan.steps} planned steps are done: the noise was calibrated for "
                               f"epsilon {self.privacy.epsilon} over exactly that many")
        released = self.accountant.steps
        try:
            seeds = step_seeds(self.view.kind, iter(self._rng.seed64, None), self.directions)
            result, _ = private_step(self.view, self._ids, self._labels, self.steps_done + 1, seeds,
                                     self.lr, self.mu, self.plan, self._rng,
                                     self.privacy.clip if self.plan.noise is not None else None, self.microbatch,
                                     self.ledger, self.accountant)
        except Exception as exc:
            if self.accountant.steps != released:  # the scalar was released and accounted: no retry of the step
                self._broken = f"step {self.steps_done + 1} failed after its release ({exc})"
            raise
        self.steps_done += 1
        return result

    def fit(self, progress: bool = True) -> dict[str, Any]:
        """Run the remaining steps (a progress bar unless ``progress=False``); returns :meth:`summary`."""
        with tqdm(total=self.plan.steps, initial=self.steps_done, desc="DP-ZO", unit="step",
                  disable=not progress) as bar:
            while self.steps_done < self.plan.steps:
                self.step()
                bar.update(1)
        return self.summary()

    def summary(self) -> dict[str, Any]:
        """What the run may publish: its privacy guarantee, steps and ledger (nothing computed from the data)."""
        noise = self.plan.noise
        private = noise is not None
        return {"steps": self.steps_done, "epsilon": self.epsilon if private else None,
                "delta": self.privacy.delta if private else None,
                "noise": noise.describe() if noise is not None else None, "sample_rate": self.plan.sample_rate,
                "trainable_entries": self.view.selection.size,
                "ledger": str(self.ledger_path) if self.ledger_path else None,
                "ledger_head": self.ledger.hash_at(len(self.ledger)).hex() if self.ledger is not None else None}

    def close(self) -> None:
        if self.ledger is not None:
            self.ledger.close()
            self.ledger = None

    def __enter__(self) -> "PrivateZO":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------- the CLI's functions
def _config(config: RunConfig | str | Path | Sequence[str | Path] | None,
            overrides: Mapping[str, Any] | None) -> RunConfig:
    if isinstance(config, RunConfig):
        extra = dict(overrides or {})
        out_dir = extra.pop("out_dir", None)
        if extra:
            raise ConfigError("give overrides with config files, or a RunConfig alone")
        return (dataclasses.replace(config, out_dir=out_dir) if out_dir is not None else config).validate()
    return load_config(config, overrides)


def train(config: RunConfig | str | Path | Sequence[str | Path] | None = None,
          overrides: Mapping[str, Any] | None = None, *, out: str | Path | None = None, progress: bool = True,
          resume: bool = False, unanchored: bool = False) -> dict[str, Any]:
    """``seedtune train``: finetune a language model on a task (config files and dotted overrides such as
    ``{"privacy.epsilon": 1.0}``, as ``-c``/``-s`` give them); returns the run's summary. ``resume=True``
    continues the interrupted run in ``out`` (the same configuration and training data, a ledger that reaches
    its anchor; the accounting continues); ``unanchored=True`` accepts a ledger whose anchor was lost."""
    from seedtune.client.trainer import train as train_run

    overrides = dict(overrides or {})
    if out is not None:
        overrides["out_dir"] = str(out)
    return train_run(_config(config, overrides or None), progress=progress, resume=resume, unanchored=unanchored)


def replay(ledger: str | Path, out: str | Path | None = None, *, model: nn.Module | None = None) -> dict[str, Any]:
    """``seedtune replay``: rebuild a finetuned language model from its ledger (saved to ``out`` with a model
    card), or, with ``model``, replay a :class:`PrivateZO` ledger onto your own base model in place."""
    from seedtune.server.replay import replay as replay_run, replay_onto

    if model is not None:
        if out is not None:
            raise ConfigError("replay onto your own model changes it in place: save it yourself, drop out")
        return replay_onto(ledger, model)
    return replay_run(ledger, out)


def verify(ledger: str | Path, unanchored: bool = False, server_key: str | Path | None = None) -> dict[str, Any]:
    """``seedtune verify``: check a ledger's whole history (every chain, and the run folder's anchor). A ledger
    with rounds and no anchor beside it is an error (its lost rounds could not be told), unless ``unanchored``:
    then the chains alone are checked and the answer says ``"unanchored": true``. With ``server_key`` (the
    federation server's public key, a ``.pub`` file) every round must be signed by it: the check that tells a
    consistent rewrite by anyone without the key (new header, every hash recomputed) from the ledger itself.
    ``secure_rounds`` counts the securely aggregated rounds: their coefficients are checked against the stored
    per-seed aggregate; the nodes' own scalars were never seen by the server, so they cannot be."""
    from seedtune.shared.protocol.identity import IdentityError, load_public
    from seedtune.shared.protocol.run_folder import anchors_of

    try:
        public = load_public(server_key, "--server-key") if server_key else None
    except IdentityError as exc:
        raise ConfigError(str(exc)) from exc

    opened = Ledger.open(ledger, read_only=True)
    try:
        anchors = anchors_of(ledger, opened.genesis)  # beside it (metrics.jsonl) and outside its run folder
        if not anchors and opened.last_round and not unanchored:
            raise ChainError(f"ledger {ledger}: {opened.last_round} rounds and no anchor (its run folder's "
                             f"metrics.jsonl is missing or records none, and this machine keeps none outside it), "
                             f"so a ledger that lost its last rounds cannot be told from a whole one; restore "
                             f"metrics.jsonl, or pass --unanchored (unanchored=True) to check the chains alone")
        entries = opened.verify(anchors)
        anchor = max(anchors, key=lambda a: a.round, default=None)
        signed = opened.check_signatures(public, f"--server-key {str(server_key)!r}") if public else None
        rounds = opened.last_round
        return {"ledger": str(ledger), "ok": True, "rounds": rounds, "entries": entries,
                "head": opened.hash_at(entries).hex(),
                "record": opened.record_at(rounds).hex() if opened.chains_rounds else None,
                "format": opened.header.format_version, "anchored_round": anchor.round if anchor else None,
                "unanchored": anchor is None and bool(rounds), "signed_rounds": signed,
                "secure_rounds": opened.secure_rounds(),
                "noise": opened.header.noise, "base_model_digest": opened.header.base_model_digest}
    finally:
        opened.close()


def export(ledger: str | Path | None, out: str | Path,
           config: RunConfig | str | Path | Sequence[str | Path] | None = None,
           overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``seedtune export-onnx``: the finetuned model of ``ledger`` (or the base model of ``config``) as an ONNX
    file for ONNX Runtime nodes, with its model card beside it."""
    from seedtune.server.replay import export as export_run

    if (ledger is None) == (config is None and not overrides):
        raise ConfigError("give either a LEDGER (the finetuned model) or a config (--config/--set: a base model), "
                          "not both")
    return export_run(ledger, out, None if ledger is not None else _config(config, overrides))


def load_model(folder: str | Path):
    """The classifier (or generator) a replay saved in ``folder``, ready to predict: its task (labels, prompts,
    label words) comes from the folder's seedtune.json, an encoder's head from its side file."""
    from seedtune.shared.engine.replica import load_saved

    return load_saved(folder)

