"""Linear-probe baselines: a linear head on the frozen model's features, privately (DP-SGD) or not.

This is what a user would write instead of finetuning: the frozen model's features, computed once per record
(:meth:`shared.task.models.TextClassifier.all_features`: the encoder's normalised mean-pooled embedding, the
decoder's last hidden state), each normalised to unit L2 norm (a per-record rule, no statistics of the data),
and a fresh softmax-regression head over them, started at zero. Privately it is DP-SGD on the head alone:

* Poisson sampling at rate ``q = 1 / ceil(n / B)`` (the DP-SGD baseline's rate), drawn from the CSPRNG;
* per-example gradients in closed form: for softmax cross-entropy on a linear head, the gradient of example
  ``i`` is the outer product ``(p_i - e_{y_i}) x_i^T`` (bias as a constant feature 1), whose L2 norm is exactly
  ``|p_i - e_{y_i}| |x_i|``, so clipping to ``C`` needs no per-example tensor;
* Gaussian noise ``N(0, (sigma C)^2)`` on every entry of the clipped sum from the CSPRNG, divided by the
  expected batch size ``q n``; sigma calibrated, and epsilon reported, by :mod:`shared.privacy.accounting` (PLD),
  the RDP bound as a cross-check.

``private = False`` is the same loop without clipping or noise.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, replace
from typing import Any, Callable

import numpy as np
import torch

from seedtune.shared.privacy.accounting import PrivacyAccountant, calibrate_noise_multiplier
from seedtune.shared.task.config import ConfigError
from seedtune.shared.task.first_order import FirstOrderConfig, poisson_rate
from seedtune.shared.task.loading import load_task_model
from seedtune.shared.privacy.noise import Gaussian, SecureRandom
from seedtune.shared.protocol.run_folder import write_summary
from seedtune.shared.task.tasks import load_split

log = logging.getLogger(__name__)


def probe_inputs(features: torch.Tensor) -> torch.Tensor:
    """Unit-norm features with a constant 1 appended (the bias): every row has norm sqrt(2)."""
    unit = torch.nn.functional.normalize(features.float(), dim=-1)
    return torch.cat([unit, torch.ones(unit.shape[0], 1)], dim=1)


def probe_logits(weight: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    return inputs @ weight.T


def clipped_gradient_sum(weight: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor,
                         clip: float | None) -> torch.Tensor:
    """Sum over the batch of each example's cross-entropy gradient in ``weight`` (K x D), each clipped to L2
    norm ``clip`` first (``None``: not clipped). The gradient of example i is ``r_i x_i^T`` with
    ``r_i = softmax(W x_i) - e_{y_i}``; its norm ``|r_i| |x_i|`` scales ``r_i`` before one matrix product."""
    if inputs.shape[0] == 0:
        return torch.zeros_like(weight)
    residual = torch.softmax(probe_logits(weight, inputs), dim=-1)
    residual[torch.arange(inputs.shape[0]), labels] -= 1.0
    if clip is not None:
        norms = residual.norm(dim=1) * inputs.norm(dim=1)
        residual = residual * (clip / norms.clamp_min(1e-12)).clamp(max=1.0)[:, None]
    return residual.T @ inputs


class ProbeLearner:
    """The head and its optimizer over fixed probe inputs: one DP-SGD (or plain) step per call."""

    def __init__(self, inputs: torch.Tensor, labels: np.ndarray, num_labels: int, config: FirstOrderConfig) -> None:
        self.inputs, self.labels, self.config = inputs, torch.as_tensor(labels, dtype=torch.long), config
        self.n = inputs.shape[0]
        self.sample_rate = poisson_rate(self.n, config.batch_size)
        self.weight = torch.zeros(num_labels, inputs.shape[1], requires_grad=True)
        opt_cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.SGD
        self.optimizer = opt_cls([self.weight], lr=config.lr)
        self.rng = SecureRandom()
        self.noise: Gaussian | None = None
        self.accountant = PrivacyAccountant()
        if config.private:
            sigma = config.noise_multiplier or calibrate_noise_multiplier(
                config.epsilon, config.delta, self.sample_rate, config.steps)
            self.noise = Gaussian(float(sigma))

    def step(self) -> None:
        rows = torch.as_tensor(self.rng.poisson_sample(self.n, self.sample_rate), dtype=torch.long)
        with torch.no_grad():
            total = clipped_gradient_sum(self.weight, self.inputs[rows], self.labels[rows],
                                         self.config.clip if self.noise is not None else None)
            if self.noise is not None:
                sigma_c = self.noise.sigma * self.config.clip
                total += torch.from_numpy(sigma_c * self.rng.normal(total.numel())).float().view_as(total)
        self.weight.grad = total / (self.sample_rate * self.n)
        self.optimizer.step()
        if self.noise is not None:
            self.accountant.record(self.noise, self.sample_rate)

    def accuracy(self, inputs: torch.Tensor, labels: np.ndarray) -> float:
        with torch.no_grad():
            predicted = probe_logits(self.weight, inputs).argmax(-1).numpy()
        return float((predicted == labels).mean())


def train_probe(config: FirstOrderConfig, progress: bool = False,
                on_loop_start: Callable[[], object] | None = None, draws: int = 1) -> dict[str, Any]:
    """A centralized linear-probe run; returns a summary like :func:`client.baselines.dpsgd.train_first_order`'s,
    with the seconds spent computing features (``features_s``) apart from the head's steps (``train_s``, one draw's).

    ``draws > 1`` trains that many heads on the same features, each with fresh CSPRNG noise and sampling, and
    reports their mean test accuracy (``test_accuracy``), each (``test_accuracies``) and their standard deviation:
    on a 500-question test split one draw moves by 2 points or more, and the features, the costly part, are
    computed once. Each draw is its own release at ``epsilon``; together they are not (a benchmark's measurement
    of the method, not a model to publish)."""
    from tqdm.auto import tqdm

    start, cpu_start = time.time(), time.process_time()
    config.validate()
    if draws < 1:
        raise ConfigError(f"draws must be >= 1, got {draws}")
    if not config.probe:
        raise ConfigError("train_probe trains a linear probe: set probe = true")
    if config.threads:
        torch.set_num_threads(config.threads)
    task = load_task_model(config.model, config.task)
    train_split, test_split = load_split(config, "train"), load_split(config, "test")
    train_ids, test_ids = task.encode(train_split.records), task.encode(test_split.records)
    features_start = time.perf_counter()
    train_x = probe_inputs(task.all_features(train_ids, config.model.microbatch, progress, "training features"))
    test_raw = task.all_features(test_ids, config.model.microbatch, progress, "test features")
    test_x = probe_inputs(test_raw)
    features_s = time.perf_counter() - features_start
    zero_shot = None
    if config.zero_shot:  # the model's own head on the same features: no second forward
        zero_shot = float((task.head_scores(test_raw).argmax(-1).numpy() == test_split.labels).mean())
    learner = ProbeLearner(train_x, train_split.labels, len(task.labels), config)
    log.info("%s on %s: %d x %d head, rate %.4g, noise %s", config.method, task.name, len(task.labels),
             train_x.shape[1], learner.sample_rate, learner.noise.describe() if learner.noise else "none")
    if on_loop_start is not None:
        on_loop_start()
    loop_start = time.perf_counter()
    accuracies = []
    for draw in range(draws):
        if draw:  # a fresh head, noise and batches; the noise multiplier calibrated once
            learner = ProbeLearner(train_x, train_split.labels, len(task.labels), config if learner.noise is None
                                   else replace(config, noise_multiplier=learner.noise.sigma))
        for _ in tqdm(range(config.steps), desc=config.method, disable=not progress):
            learner.step()
        accuracies.append(learner.accuracy(test_x, test_split.labels))
    train_s = (time.perf_counter() - loop_start) / draws
    private = learner.noise is not None
    summary = {
        "model": task.name,
        "method": config.method,
        "steps": config.steps,
        "batch_size": config.batch_size,
        "epsilon": learner.accountant.epsilon(config.delta) if private else None,
        "rdp_epsilon": learner.accountant.rdp_epsilon(config.delta) if private else None,
        "delta": config.delta if private else None,
        "noise_multiplier": learner.noise.sigma if learner.noise else 0.0,
        "sample_rate": learner.sample_rate,
        "trainable_params": learner.weight.numel(),
        "test_accuracy": float(np.mean(accuracies)),
        **({"test_accuracies": accuracies, "test_accuracy_sd": float(np.std(accuracies, ddof=1))} if draws > 1 else {}),
        "zero_shot_accuracy": zero_shot,
        "train_size": len(train_ids),
        "test_size": len(test_ids),
        "features_s": round(features_s, 3),
        "train_s": round(train_s, 3),
        "cpu_s": round(time.process_time() - cpu_start, 2),
        "wall_s": round(time.time() - start, 2),
        "config": asdict(config),
    }
    write_summary(config.out_dir, summary)
    return summary
