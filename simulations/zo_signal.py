"""Diagnostic: how much progress one private ZO step can make, per choice of trainable set.

    python -m seedtune.simulations.zo_signal -c configs/smollm2_eps3.toml --json \\
        --selection prune:0.01 --selection "prune:0.01:*mlp*" --selection "patterns:*norm*"
    python -m seedtune.simulations.zo_signal -c configs/smollm2_eps3.toml --json --compare-dtype bfloat16 --mus 1e-3 1e-2

A step moves theta by ``-lr * s * z`` with ``s`` the clipped, noised two-point scalar. To second order the
expected loss change is ``-lr E[s z.g] + lr^2/2 E[s^2] E[z'Hz]``; its best value over lr,
``E[s z.g]^2 / (2 E[s^2] E[z'Hz])``, reached at ``lr* = E[s z.g] / (E[s^2] E[z'Hz])``, says how fast DP-ZO can
move with a given trainable set and where a learning-rate sweep should start. Pruning pays off when it keeps
the gradient (``E[s z.g]``) while dropping curvature and directions that only add variance.

``g`` is the mean gradient of the loss (``|g_S|^2`` estimated without bias as the dot product of two
disjoint halves' gradients), ``s`` is computed exactly as the trainer computes it (per-example clip at the
config's C; the noise variance of its calibrated mechanism added analytically), ``z'Hz`` is a symmetric second
difference. All of it runs on the dev split, which the project treats as public: no privacy is spent.
Estimates from a few seeds are noisy; each comes with its standard error.

``--compare-dtype bfloat16`` asks instead whether the two-point estimate survives half-precision forwards: for
the config's trainable set, the same seeds and batches, it computes every per-example projected gradient with
float32 and with the given dtype's forward passes, at each ``--mus`` value, and reports their correlation and
the dtype's error relative to the float32 estimates' spread (the master stays float32 in both).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from seedtune.client.trainer import plan_privacy
from seedtune.client.zo_step import privatize, projected_gradients
from seedtune.shared.task.config import RunConfig, load_config, parse_override
from seedtune.shared.engine.directions import direction_torch
from seedtune.shared.task.loading import load_task_model
from seedtune.shared.task.models import TextClassifier
from seedtune.shared.privacy.noise import SecureRandom
from seedtune.shared.engine.replica import select_trainable
from seedtune.shared.engine.selection import TrainableSet
from seedtune.shared.task.tasks import load_split, with_labels
from seedtune.shared.engine.update import ScoredView


def parse_selection(spec: str, base: RunConfig) -> RunConfig:
    """``all``, ``patterns:P1,P2`` or ``prune:FRACTION[:P1,P2]`` as a copy of ``base`` with that selection."""
    config = copy.deepcopy(base)
    kind, _, rest = spec.partition(":")
    sel = config.selection
    if kind == "all":
        sel.mode, sel.patterns = "all", []
    elif kind == "patterns" and rest:
        sel.mode, sel.patterns = "patterns", rest.split(",")
    elif kind == "prune" and rest:
        fraction, _, patterns = rest.partition(":")
        sel.mode, sel.fraction, sel.patterns = "prune", float(fraction), patterns.split(",") if patterns else []
    else:
        raise ValueError(f"--selection {spec!r}: use all, patterns:P1,P2 or prune:FRACTION[:P1,P2]")
    config.validate()
    return config


def mean_gradient(task: TextClassifier, ids: list[list[int]], labels: np.ndarray, microbatch: int
                  ) -> dict[str, torch.Tensor]:
    """Gradient of the mean loss over ``ids`` for every parameter, by backpropagation in microbatches."""
    params = dict(task.module.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    grads = {n: torch.zeros_like(p) for n, p in params.items()}
    try:
        for p in params.values():
            p.requires_grad_(True)
        for start in range(0, len(ids), microbatch):
            batch = task.collate(ids[start : start + microbatch], labels[start : start + microbatch])
            task.module.zero_grad(set_to_none=True)
            logits = task.module(batch.input_ids, batch.attention_mask).float()
            (F.cross_entropy(logits, batch.labels, reduction="sum") / len(ids)).backward()
            for n, p in params.items():
                if p.grad is not None:
                    grads[n] += p.grad
    finally:
        for n, p in params.items():
            p.grad = None
            p.requires_grad_(flags[n])
    return grads


def restricted(grads: dict[str, torch.Tensor], selection: TrainableSet) -> torch.Tensor:
    """The gradient's entries on the trainable set, in the order directions are generated over."""
    return torch.cat([grads[n].reshape(-1) if idx is None else grads[n].reshape(-1)[idx]
                      for n, idx, _, _ in selection.segments()]).double()


@dataclass
class Signal:
    selection: str
    entries: int
    grad_norm2: float  # unbiased |g_S|^2
    signal: float  # E[s z.g]
    signal_se: float
    scalar_m2: float  # E[s^2], noise included
    curvature: float  # E[z'Hz]
    curvature_se: float

    def best(self) -> tuple[float | None, float | None]:
        """(lr*, expected loss decrease per step at lr*); None where the estimates show no descent direction
        (signal or curvature not positive: more seeds, or a set without usable gradient)."""
        if self.signal <= 0 or self.curvature <= 0:
            return None, None
        lr = self.signal / (self.scalar_m2 * self.curvature)
        return lr, self.signal * lr / 2


def measure(task: TextClassifier, config: RunConfig, spec: str, halves: tuple[dict, dict],
            batches: list[tuple[list[list[int]], np.ndarray]], noise_var: float, first_seed: int) -> Signal:
    selection = select_trainable(task, config)
    view = ScoredView(task, selection, config.zo.direction)
    g_a, g_b = restricted(halves[0], selection), restricted(halves[1], selection)
    mu, clip, micro = config.zo.mu, config.privacy.clip, config.model.microbatch
    mu_curv = 0.3 / math.sqrt(selection.size)  # |mu z| = 0.3 whatever the set's size: a resolvable loss change
    rng = SecureRandom()  # unused without noise; privatize's signature asks for it
    products, squares, curvatures = [], [], []
    for k, (ids, labels) in enumerate(batches):
        seed = first_seed + k
        g_i, _ = projected_gradients(view, ids, labels, seed=seed, mu=mu, microbatch=micro)
        # the trainer's own clipping rule; the noise enters E[s^2] analytically, not as one more random draw
        s = privatize(g_i, clip, len(ids), None, rng)[0] if config.privacy.enabled else float(g_i.mean())
        z = direction_torch(seed, 0, selection.size, config.zo.direction, dtype=torch.float64)
        products.append(s * float(z @ g_a))
        squares.append(s * s + noise_var)
        base = np.concatenate([view.per_example_loss(ids[j : j + micro], labels[j : j + micro])
                               for j in range(0, len(ids), micro)]).astype(np.float64).mean()
        _, sym = projected_gradients(view, ids, labels, seed=seed, mu=mu_curv, microbatch=micro)
        curvatures.append(2 * (float(np.mean(sym, dtype=np.float64)) - base) / mu_curv**2)
    n = len(batches)
    return Signal(spec, selection.size, float(g_a @ g_b), float(np.mean(products)),
                  float(np.std(products, ddof=1) / math.sqrt(n)), float(np.mean(squares)),
                  float(np.mean(curvatures)), float(np.std(curvatures, ddof=1) / math.sqrt(n)))


def dtype_agreement(config: RunConfig, dtype: str, mus: list[float],
                    batches: list[tuple[list[list[int]], np.ndarray]], first_seed: int) -> list[dict]:
    """Per mu: correlation of the per-example two-point estimates between float32 and ``dtype`` forwards."""
    from seedtune.shared.task.placement import placement
    from seedtune.shared.engine.update import ScoredView

    views = {}
    for name in ("float32", dtype):
        task = load_task_model(config.model, config.task)
        selection = select_trainable(task, config)
        device, precision = placement(dataclasses.replace(config.model, dtype=name))
        views[name] = ScoredView.placed(task, selection, config.zo.direction, device, precision)
    rows = []
    for mu in mus:
        est = {name: np.concatenate([projected_gradients(view, ids, labels, seed=first_seed + k, mu=mu,
                                                         microbatch=config.model.microbatch)[0]
                                     for k, (ids, labels) in enumerate(batches)])
               for name, view in views.items()}
        a, b = est["float32"].astype(np.float64), est[dtype].astype(np.float64)
        rows.append({"model": config.model.name, "dtype": dtype, "mu": mu, "estimates": int(a.size),
                     "correlation": float(np.corrcoef(a, b)[0, 1]),
                     "relative_error": float(np.sqrt(np.mean((a - b) ** 2)) / max(np.std(a), 1e-30)),
                     "float32_std": float(np.std(a)), "trainable_entries": views[dtype].selection.size})
    return rows


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2e}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--config", help="run config (TOML); its model, batch, clip, mu and privacy apply")
    parser.add_argument("-s", "--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--selection", action="append", default=[],
                        help="all | patterns:P1,P2 | prune:FRACTION[:P1,P2] (repeatable; default: the config's)")
    parser.add_argument("--seeds", type=int, default=8, help="directions (and batches) per selection")
    parser.add_argument("--grad-examples", type=int, default=256, help="dev examples for the gradient")
    parser.add_argument("--json", action="store_true", help="one JSON line per selection")
    parser.add_argument("--compare-dtype", choices=["bfloat16", "float16"],
                        help="compare the two-point estimates of this forward dtype with float32's instead")
    parser.add_argument("--mus", type=float, nargs="+", default=[1e-3], help="mu values for --compare-dtype")
    args = parser.parse_args(argv)
    if args.seeds < 2:
        parser.error("--seeds must be >= 2 (standard errors need two samples)")

    base = load_config(args.config, dict(parse_override(o) for o in args.set))
    if base.task.kind != "classification":
        parser.error(f"zo_signal measures a classifier's estimate; task {base.task.name!r} is {base.task.kind}")
    base = with_labels(base)
    if base.threads:
        torch.set_num_threads(base.threads)
    task = load_task_model(base.model, base.task)
    train_size = len(load_split(base, "train"))
    plan = plan_privacy(base, train_size)
    noise_var = (plan.noise.std * base.privacy.clip / base.zo.batch_size) ** 2 if plan.noise else 0.0

    dev = load_split(base, "dev", 0)
    need = args.grad_examples + args.seeds * base.zo.batch_size
    if need > len(dev):
        parser.error(f"--grad-examples + seeds x batch = {need} exceeds the dev split's {len(dev)}")
    order = np.random.default_rng(0).permutation(len(dev))[:need]
    ids = task.encode([dev.records[i] for i in order])
    labels = np.asarray(dev.labels)[order]
    b = base.zo.batch_size
    batches = [(ids[args.grad_examples + k * b : args.grad_examples + (k + 1) * b],
                labels[args.grad_examples + k * b : args.grad_examples + (k + 1) * b]) for k in range(args.seeds)]
    if args.compare_dtype:
        for row in dtype_agreement(base, args.compare_dtype, args.mus, batches, first_seed=1_000):
            print(json.dumps(row), flush=True)
        return 0
    half = args.grad_examples // 2
    halves = (mean_gradient(task, ids[:half], labels[:half], base.model.microbatch),
              mean_gradient(task, ids[half : 2 * half], labels[half : 2 * half], base.model.microbatch))
    for spec in args.selection or [base.selection.mode]:
        config = parse_selection(spec, base) if args.selection else base
        result = measure(task, config, spec, halves, batches, noise_var, first_seed=1_000)
        lr, decrease = result.best()
        row = {"model": task.name, **result.__dict__, "lr_star": lr, "loss_decrease_star": decrease,
               "batch_size": b, "clip": base.privacy.clip, "noise_std": plan.noise.std if plan.noise else 0.0,
               "seeds": args.seeds}
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print(f"{spec:28s} entries {result.entries:9d}  |g|^2 {result.grad_norm2:8.3f}  "
                  f"E[s z.g] {result.signal:7.3f} ± {result.signal_se:.3f}  E[s^2] {result.scalar_m2:6.2f}  "
                  f"z'Hz {result.curvature:8.1f} ± {result.curvature_se:.1f}  lr* {_num(lr)}  "
                  f"decrease/step {_num(decrease)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
