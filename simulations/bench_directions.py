"""Benchmark: seeded direction generation against memory speed, in one process.

    python -m seedtune.simulations.bench_directions --json [--sizes 227140 1350000 22700000] [--repeats 5]

Prints one JSON line per (runtime, kind, size): entries/s of ``direction_torch`` and ``direction_numpy`` for the
Rademacher and Gaussian kinds, generated in :data:`shared.engine.directions.CHUNK`-sized pieces as every caller does,
beside an axpy reference measured in the same process on the same number of float32 entries
(``w.add_(z, alpha=c)`` in torch, ``w += c * z`` in numpy) and their ratio. The default sizes are MiniLM's and
SmolLM2's 1% trainable sets and every weight of MiniLM. Timings are medians; calls are alternated so that a
noisy neighbour slows both sides alike.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from typing import Callable

import numpy as np

from seedtune.shared.engine.directions import CHUNK, DIRECTION_KINDS, direction_numpy, direction_torch

SIZES = (227_140, 1_350_000, 22_700_000)


def chunked(generate: Callable[[int, int], object], size: int) -> Callable[[], None]:
    """Generate entries [0, size) of one direction chunk by chunk, as TrainableView does."""
    def run() -> None:
        for lo in range(0, size, CHUNK):
            generate(lo, min(CHUNK, size - lo))
    return run


def median_seconds(calls: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median wall time of each call, the calls alternated within each repeat (one warm-up each first)."""
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def torch_rows(size: int, repeats: int) -> list[dict]:
    import torch

    w, z = torch.zeros(size), torch.ones(size)
    def axpy() -> None:
        w.add_(z, alpha=1e-3)

    calls: dict[str, Callable[[], None]] = {"axpy": axpy}
    for kind in DIRECTION_KINDS:
        calls[kind] = chunked(functools.partial(direction_torch, 12345, kind=kind), size)
    seconds = median_seconds(calls, repeats)
    return [row("torch", kind, size, seconds, torch.get_num_threads()) for kind in DIRECTION_KINDS]


def numpy_rows(size: int, repeats: int) -> list[dict]:
    w, z = np.zeros(size, dtype=np.float32), np.ones(size, dtype=np.float32)

    def axpy() -> None:
        np.add(w, np.float32(1e-3) * z, out=w)

    calls: dict[str, Callable[[], None]] = {"axpy": axpy}
    for kind in DIRECTION_KINDS:
        calls[kind] = chunked(functools.partial(direction_numpy, 12345, kind=kind), size)
    seconds = median_seconds(calls, repeats)
    return [row("numpy", kind, size, seconds, 1) for kind in DIRECTION_KINDS]


def row(runtime: str, kind: str, size: int, seconds: dict[str, float], threads: int) -> dict:
    rate, axpy = size / seconds[kind], size / seconds["axpy"]
    return {"runtime": runtime, "kind": kind, "entries": size, "threads": threads,
            "seconds": round(seconds[kind], 5), "entries_per_s": round(rate),
            "axpy_entries_per_s": round(axpy), "over_axpy": round(rate / axpy, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="one JSON line per row (the only output format)")
    parser.add_argument("--sizes", nargs="+", type=int, default=list(SIZES))
    parser.add_argument("--runtimes", nargs="+", choices=("torch", "numpy"), default=["torch", "numpy"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if any(size <= 0 for size in args.sizes):
        parser.error(f"--sizes must be positive, got {args.sizes}")
    for size in args.sizes:
        for runtime in args.runtimes:
            for r in (torch_rows if runtime == "torch" else numpy_rows)(size, args.repeats):
                print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
