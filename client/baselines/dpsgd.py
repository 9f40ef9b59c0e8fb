"""First-order baselines: DP-SGD / DP-Adam with Opacus ghost clipping, and the same loop without privacy.

DP-ZO is only worth its forward-only steps if it is compared with the first-order method it replaces, run
the way the literature runs it (Li et al., ICLR 2022): per-example clipping by ghost clipping (per-example
gradient norms of linear layers without materialising per-example gradients), Poisson sampling, Gaussian
noise on the clipped sum divided by the expected batch size, and Adam or SGD on top.

* The task and loss are the DP-ZO path's: :class:`shared.task.models.TextClassifier`'s logits and cross-entropy.
* The noise multiplier is calibrated, and the reported epsilon computed, by :mod:`shared.privacy.accounting` (PLD),
  for the sampling rate Opacus really uses (``1 / ceil(n / B)``). Opacus' own RDP accountant is logged as a
  cross-check only.
* What is trained (``trainable_parameters``): every parameter except the embedding tables. Ghost clipping
  cannot handle the decoder's tied input/output embedding (the label logits index its rows directly, a use
  Opacus' hooks never see, so that gradient would escape clipping), and BERT's position embeddings see a
  batch-1 index tensor that breaks per-example norms. Parameters the loss never reaches (BERT's pooler) are
  frozen too. With ``lora_rank > 0`` only peft LoRA adapters on the
  attention projections are trained. Modules without a ghost-clipping rule (LlamaRMSNorm) fall back to
  Opacus' functorch per-example gradients, which Opacus folds into the same per-example norm.
* ``private=False`` is plain finetuning through the same loop (same sampler, no clipping, no noise).
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import asdict
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from seedtune.shared.privacy.accounting import PrivacyAccountant, calibrate_noise_multiplier
from seedtune.shared.task.first_order import FirstOrderConfig, poisson_rate, prepare_trainable
from seedtune.shared.task.loading import load_task_model
from seedtune.shared.task.models import TextClassifier
from seedtune.shared.privacy.noise import Gaussian, SecureRandom
from seedtune.shared.task.tasks import load_split
from seedtune.shared.protocol.run_folder import write_summary

log = logging.getLogger(__name__)

class _Indices(Dataset):
    """Example indices; the loop collates token ids itself (dynamic padding, like the DP-ZO path)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[torch.Tensor]:
        return (torch.tensor(i),)  # a tuple: Opacus reads each field's shape to build empty batches


class _CsprngPoissonBatches:
    """Poisson batches (each record in each batch independently with ``rate``) drawn from
    :class:`shared.privacy.noise.SecureRandom`, in place of Opacus' sampler: that one draws from a torch generator, a
    Mersenne Twister whose state its outputs give away, and which record was sampled is what the accounting
    assumes secret. As many batches per pass as Opacus' (``1 / rate``)."""

    def __init__(self, population: int, rate: float, rng: SecureRandom) -> None:
        self.population, self.rate, self.rng = population, rate, rng

    def __len__(self) -> int:
        return int(1 / self.rate)

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(len(self)):
            yield self.rng.poisson_sample(self.population, self.rate).tolist()


def _csprng_batches(opacus_loader: DataLoader, rate: float, rng: SecureRandom) -> DataLoader:
    """Opacus' Poisson loader with its sampler replaced by :class:`_CsprngPoissonBatches`; its collate
    function (which builds empty batches) kept."""
    dataset = opacus_loader.dataset
    return DataLoader(dataset, batch_sampler=_CsprngPoissonBatches(len(dataset), rate, rng),  # type: ignore[arg-type]
                      collate_fn=opacus_loader.collate_fn)


def _secure_noise(optimizer: Any, rng: SecureRandom) -> None:
    """Make an Opacus DPOptimizer draw its Gaussian noise from :class:`shared.privacy.noise.SecureRandom`.

    Opacus draws the noise from a torch generator unless ``secure_mode``, which needs torchcsprng (unmaintained;
    no build for this torch). The optimizer's one noise hook is replaced; clipping, accumulation and the
    expected-batch scaling stay Opacus' own."""
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    def add_noise() -> None:
        std = optimizer.noise_multiplier * optimizer.max_grad_norm
        for p in optimizer.params:
            _check_processed_flag(p.summed_grad)
            draws = torch.from_numpy(rng.normal(p.summed_grad.numel())).to(p.summed_grad.dtype)
            p.grad = (p.summed_grad + std * draws.view_as(p.summed_grad)).view_as(p)
            _mark_as_processed(p.summed_grad)

    optimizer.add_noise = add_noise


class FirstOrderLearner:
    """A task model wrapped for private (Opacus, ghost clipping) or plain first-order steps on one dataset.

    Used whole by :func:`train_first_order` and round by round by the FedAvg client; ``steps`` are counted
    so that the accountant covers every step run, whatever calls them."""

    def __init__(self, task: TextClassifier, ids: Sequence[Sequence[int]], labels: np.ndarray,
                 config: FirstOrderConfig, total_steps: int) -> None:
        from opacus import PrivacyEngine

        self.task, self.ids, self.labels, self.config = task, ids, labels, config
        self.sample_rate = poisson_rate(len(ids), config.batch_size)
        params = [p for p in task.module.parameters() if p.requires_grad]
        opt_cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.SGD
        optimizer = opt_cls(params, lr=config.lr)
        loader = DataLoader(_Indices(len(ids)), batch_size=config.batch_size)  # Opacus' rate: 1 / len(loader)
        rng = SecureRandom()
        self.criterion: Any = nn.CrossEntropyLoss()
        self.noise: Gaussian | None = None
        task.module.train()  # Opacus' hooks record only in training mode (and its validator insists)
        if config.private:
            sigma = config.noise_multiplier or calibrate_noise_multiplier(
                config.epsilon, config.delta, self.sample_rate, total_steps)
            self.noise = Gaussian(float(sigma))
            self.engine = PrivacyEngine(accountant="rdp")
            self.model, self.optimizer, self.criterion, self.loader = self.engine.make_private(
                module=task.module, optimizer=optimizer, criterion=self.criterion, data_loader=loader,
                noise_multiplier=sigma, max_grad_norm=config.clip, poisson_sampling=True,
                grad_sample_mode="ghost")
            _secure_noise(self.optimizer, rng)
            if abs(self.loader.sample_rate - self.sample_rate) > 1e-12:
                raise RuntimeError(f"Opacus samples at {self.loader.sample_rate}, accounted {self.sample_rate}")
        else:
            from opacus.data_loader import DPDataLoader

            self.model, self.optimizer = task.module, optimizer
            self.loader = DPDataLoader.from_data_loader(loader)  # the same Poisson batches, nothing else
        self.loader = _csprng_batches(self.loader, self.sample_rate, rng)
        self.accountant = PrivacyAccountant()
        self.steps = 0
        self._batches: Iterator[list[torch.Tensor]] = itertools.chain.from_iterable(itertools.repeat(self.loader))

    def step(self) -> float:
        """One optimizer step on a fresh Poisson batch; returns the batch's mean loss (nan if empty)."""
        self.model.train()
        rows = next(self._batches)[0].tolist()
        self.optimizer.zero_grad(set_to_none=True)
        if rows:
            batch = self.task.collate([self.ids[i] for i in rows], self.labels[rows])
            loss = self.criterion(self.model(batch.input_ids, batch.attention_mask).float(), batch.labels)
            loss.backward()
            value = float(loss.item())
        else:  # an empty Poisson batch still releases a noisy (zero-sum) step: skipping it would leak
            for p in self.optimizer.param_groups[0]["params"]:
                p.grad = torch.zeros_like(p)
            value = math.nan
        self.optimizer.step()
        self.steps += 1
        if self.noise is not None:
            self.accountant.record(self.noise, self.sample_rate)
        return value

    def epsilon(self) -> float | None:
        return self.accountant.epsilon(self.config.delta) if self.noise is not None else None

    def opacus_rdp_epsilon(self) -> float | None:
        """Opacus' own RDP bound (looser than the PLD): a cross-check, never the reported epsilon."""
        return float(self.engine.get_epsilon(self.config.delta)) if self.noise is not None else None

    def accuracy(self, ids: Sequence[Sequence[int]], labels: np.ndarray) -> float:
        self.model.eval()
        return self.task.accuracy(ids, labels, self.config.model.microbatch)


def train_first_order(config: FirstOrderConfig, progress: bool = False,
                      on_loop_start: Callable[[], object] | None = None) -> dict[str, Any]:
    """Centralized first-order run; returns a summary like :func:`client.trainer.train`'s (``on_loop_start``
    likewise runs right before the first step)."""
    from tqdm.auto import tqdm

    start = time.time()
    config.validate()
    if config.threads:
        torch.set_num_threads(config.threads)
    task = load_task_model(config.model, config.task)
    trainable = prepare_trainable(task, config.lora_rank, config.lora_alpha)
    train_split = load_split(config, "train")
    test_split = load_split(config, "test")
    train_ids, test_ids = task.encode(train_split.records), task.encode(test_split.records)
    zero_shot = task.accuracy(test_ids, test_split.labels, config.model.microbatch) if config.zero_shot else None
    learner = FirstOrderLearner(task, train_ids, train_split.labels, config, config.steps)
    log.info("%s on %s: %d trainable parameters, rate %.4g, noise %s", config.method, task.name, trainable,
             learner.sample_rate, learner.noise.describe() if learner.noise else "none")
    if on_loop_start is not None:
        on_loop_start()
    loop_start = time.perf_counter()
    losses = [learner.step() for _ in tqdm(range(config.steps), desc=config.method, disable=not progress)]
    train_s = time.perf_counter() - loop_start
    summary = {
        "model": task.name,
        "method": config.method,
        "steps": config.steps,
        "batch_size": config.batch_size,
        "epsilon": learner.epsilon(),
        "opacus_rdp_epsilon": learner.opacus_rdp_epsilon(),
        "delta": config.delta if config.private else None,
        "noise_multiplier": learner.noise.sigma if learner.noise else 0.0,
        "sample_rate": learner.sample_rate,
        "trainable_params": trainable,
        "train_loss_last10": float(np.nanmean(losses[-10:])),
        "test_accuracy": learner.accuracy(test_ids, test_split.labels),
        "zero_shot_accuracy": zero_shot,
        "train_size": len(train_ids),
        "test_size": len(test_ids),
        "train_s": round(train_s, 3),
        "wall_s": round(time.time() - start, 2),
        "config": asdict(config),
    }
    write_summary(config.out_dir, summary)
    return summary
