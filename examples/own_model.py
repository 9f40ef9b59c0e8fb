"""Private zeroth-order training of your own torch model with seedtune: a small MLP regressor and an MSE loss.

A data holder with 20,000 private sensor records (8 readings -> one target) trains the model at (3, 1e-5)-DP,
keeps the run's ledger, and rebuilds the trained weights from it on a fresh copy of the base model, as anyone
holding the ledger and the base weights could. Run it from the checkout (or with seedtune installed):

    python examples/own_model.py --out runs/own-model
    python examples/own_model.py --out runs/own-model-frame --frame   # a full Hadamard frame per step

Prints one JSON line: the epsilon spent, the held-out error before and after, and whether the replay matched.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

import seedtune


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic records: a smooth nonlinear target of 8 readings, plus measurement noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = torch.tanh(x[:, :4].sum(1) / 2) + 0.5 * x[:, 4] - 0.25 * x[:, 5] * x[:, 6] + 0.1 * torch.randn(n, generator=g)
    return x, y


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/own-model", help="folder for the run's ledger (must be new)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--frame", action="store_true",
                        help="K directions per step: a full Hadamard frame over the model's 321 weights (K = 512, "
                             "513 forward passes a step), which makes each step DP-SGD from forward passes")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.manual_seed(0)

    x_train, y_train = make_data(20_000, seed=1)  # private: only the loss function below reads it
    x_test, y_test = make_data(2_000, seed=2)  # held-out (public here: synthetic)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    base = copy.deepcopy(model)  # the base weights, for the replay below

    def loss_fn(m: nn.Module, index: np.ndarray) -> torch.Tensor:
        """One squared error per example of the batch: what the step clips and noises."""
        idx = torch.from_numpy(index)
        return (m(x_train[idx]).squeeze(-1) - y_train[idx]) ** 2

    def test_mse(m: nn.Module) -> float:
        with torch.no_grad():
            return float(((m(x_test).squeeze(-1) - y_test) ** 2).mean())

    before = test_mse(model)
    ledger = Path(args.out) / "ledger.sqlite"
    with seedtune.PrivateZO(model, loss_fn, num_examples=len(x_train), steps=args.steps, epsilon=args.epsilon,
                            delta=1e-5, clip=2.0, batch_size=500, lr=0.02, mu=1e-3, ledger=ledger,
                            **({"direction": "hadamard", "directions": 0} if args.frame else {})) as trainer:
        summary = trainer.fit(progress=not args.no_progress)
    after = test_mse(model)

    replayed = seedtune.replay(ledger, model=base)  # base now holds the trained weights, rebuilt from the ledger
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), base.state_dict().values()))
    result = {"epsilon": summary["epsilon"], "delta": summary["delta"], "steps": summary["steps"],
              "test_mse_before": round(before, 4), "test_mse_after": round(after, 4),
              "replay_matches": same, "ledger": str(ledger), "ledger_head": replayed["ledger_head"],
              "verified_entries": seedtune.verify(ledger, unanchored=True)["entries"]}  # no run folder: no anchor
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
