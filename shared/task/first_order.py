"""What the first-order baselines share between their client and server halves: the run configuration
(:class:`FirstOrderConfig`, and :class:`FedAvgConfig` for the federated variant), the record names of the
FedAvg messages, and the choice of trainable tensors (``prepare_trainable``), which the FedAvg server must
make exactly as its clients do so that their tensors line up by name.

The learner itself (Opacus ghost clipping, the secure noise) is in :mod:`client.baselines.dpsgd`; the
FedAvg server half in :mod:`server.baselines.fedavg`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from seedtune.shared.task.config import ConfigError, DataConfig, ModelConfig, TaskConfig
from seedtune.shared.task.models import TextClassifier

TRAINABLE = "trainable"  # FedAvg ArrayRecord: the trainable tensors, by parameter name
METRICS = "metrics"  # FedAvg MetricRecord: the node's public counters (steps, epsilon)

OPTIMIZERS = ("adam", "sgd")
LORA_TARGETS = {"encoder": ["query", "value"], "decoder": ["q_proj", "v_proj"]}


@dataclass
class FirstOrderConfig:
    """One first-order run: the model and data sections are the DP-ZO RunConfig's own."""

    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    steps: int = 100
    batch_size: int = 32  # expected batch size under Poisson sampling
    lr: float = 5e-4
    optimizer: str = "adam"  # "adam" (DP-Adam) or "sgd" (DP-SGD)
    private: bool = True
    epsilon: float = 3.0
    delta: float = 1e-5
    clip: float = 1.0  # per-example L2 clipping bound on the whole gradient
    noise_multiplier: float = 0.0  # 0: calibrated (PLD) from (epsilon, delta, rate, steps)
    lora_rank: int = 0  # 0: full finetuning (embeddings frozen); r > 0: LoRA adapters only
    lora_alpha: float = 16.0
    # True: a linear probe, only a fresh linear head on the frozen model's features is trained
    # (client/baselines/probe.py: closed-form per-example gradients, no Opacus)
    probe: bool = False
    threads: int = 0
    zero_shot: bool = True  # evaluate the base model first (bench_utility takes it from its zero-shot row)
    out_dir: str = ""  # summary.json goes here when set

    def validate(self) -> "FirstOrderConfig":
        self.model.validate()
        self.task.validate()
        self.data.validate()
        checks = [
            (self.task.kind == "classification" and bool(self.task.labels), "task",
             "must be a classification task with its labels stated (the first-order baselines train classifiers)",
             self.task.name),
            (isinstance(self.steps, int) and self.steps >= 1, "steps", "must be an int >= 1", self.steps),
            (isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size", "must be an int >= 1",
             self.batch_size),
            (self.lr > 0, "lr", "must be > 0", self.lr),
            (self.optimizer in OPTIMIZERS, "optimizer", f"must be one of {OPTIMIZERS}", self.optimizer),
            (self.epsilon > 0, "epsilon", "must be > 0", self.epsilon),
            (0 < self.delta < 1, "delta", "must be in (0, 1)", self.delta),
            (self.clip > 0, "clip", "must be > 0", self.clip),
            (self.noise_multiplier >= 0, "noise_multiplier", "must be >= 0", self.noise_multiplier),
            (isinstance(self.lora_rank, int) and self.lora_rank >= 0, "lora_rank", "must be an int >= 0",
             self.lora_rank),
            (not (self.probe and self.lora_rank), "lora_rank", "must be 0 for a linear probe (probe = true)",
             self.lora_rank),
        ]
        for ok, name, message, value in checks:
            if not ok:
                raise ConfigError(f"{name} {message}, got {value!r}")
        return self

    @property
    def method(self) -> str:
        if self.probe:
            return "dp-probe" if self.private else "probe"
        if not self.private:
            return "finetune-lora" if self.lora_rank else "finetune"
        return "dpsgd-lora" if self.lora_rank else "dpsgd"


def poisson_rate(train_size: int, batch_size: int) -> float:
    """The rate Opacus' Poisson loader samples at: one over the plain loader's number of batches."""
    if batch_size > train_size:
        raise ConfigError(f"batch_size {batch_size} exceeds the training set size {train_size}")
    return 1.0 / math.ceil(train_size / batch_size)


def prepare_trainable(task: TextClassifier, lora_rank: int, lora_alpha: float) -> int:
    """Freeze what ghost clipping cannot clip (embedding tables) or, with LoRA, everything but the adapters.
    Returns the number of trainable parameters."""
    module = task.module
    if lora_rank:
        from peft import LoraConfig, inject_adapter_in_model

        body = module.lm if task.kind == "decoder" else module.body
        inject_adapter_in_model(LoraConfig(r=lora_rank, lora_alpha=lora_alpha,  # type: ignore[arg-type]  # any number
                                           lora_dropout=0.0,
                                           target_modules=LORA_TARGETS[task.kind]), body)
        for name, p in module.named_parameters():
            p.requires_grad_("lora_" in name)
    else:
        for sub in module.modules():
            if isinstance(sub, nn.Embedding):
                sub.weight.requires_grad_(False)
        _freeze_unused(task)
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _freeze_unused(task: TextClassifier) -> None:
    """Freeze parameters the task loss does not depend on (BERT's pooler): Opacus needs a per-example norm
    for every trainable parameter. Found with one backward pass on public text, so no data is involved."""
    batch = task.collate(task.encode(task.probe(["a public probe.", "another public probe."])), np.arange(2) % 2)
    params = [p for p in task.module.parameters() if p.requires_grad]
    loss = F.cross_entropy(task.module(batch.input_ids, batch.attention_mask), batch.labels)
    for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True)):
        if g is None:
            p.requires_grad_(False)


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors by name: what a FedAvg client ships and the server averages."""
    return {name: p.detach() for name, p in module.named_parameters() if p.requires_grad}


@dataclass
class FedAvgConfig:
    learner: FirstOrderConfig = field(default_factory=FirstOrderConfig)
    rounds: int = 2
    local_steps: int = 5
    num_clients: int = 2
    out_dir: str = ""  # the server writes summary.json here

    @property
    def steps_per_node(self) -> int:
        return self.rounds * self.local_steps
