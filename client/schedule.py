"""DP-ZOSO's stagewise schedule.

Stage s runs ``stage_steps[s]`` steps with learning rate ``lr * lr_decay**s`` and perturbation scale
``max(mu_min, mu * mu_decay**s)``. The reference code's mu formula is broken; this schedule is monotone
non-increasing by construction (decays in (0, 1] and a floor), which keeps the two-point estimate's bias
(O(mu * smoothness)) shrinking as the step size shrinks. Each stage starts by recording an anchor; the
proximal step pulls the trainable entries towards it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from seedtune.shared.task.config import ScheduleConfig


@dataclass(frozen=True)
class Stage:
    index: int
    first_step: int
    steps: int
    lr: float
    mu: float


def stages(schedule: ScheduleConfig, lr: float, mu: float) -> Iterator[Stage]:
    first = 0
    for s, steps in enumerate(schedule.stage_steps):
        yield Stage(
            index=s,
            first_step=first,
            steps=steps,
            lr=lr * schedule.lr_decay**s,
            mu=max(schedule.mu_min, mu * schedule.mu_decay**s),
        )
        first += steps
