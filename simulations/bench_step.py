"""Benchmark: one private ZO step against one forward pass, time and peak memory, in one process.

    python -m seedtune.simulations.bench_step --json [--models minilm smollm2] [--batch-size 32] [--seq-len 64]
    python -m seedtune.simulations.bench_step --json --models minilm --onnx-model M.onnx   # on ONNX Runtime, no torch
    python -m seedtune.simulations.bench_step --json --models smollm2 --fraction 0.03 --patterns "*layers.2?.mlp*"
    python -m seedtune.simulations.bench_step --json --models minilm --patterns "*layer.4.*" "*layer.5.*"  # top third
    python -m seedtune.simulations.bench_step --json --models minilm --fraction 1.0 --mezo-reference  # every weight, beside MeZO
    python -m seedtune.simulations.bench_step --json --dtypes float32 bfloat16 --device cpu  # one row per model and dtype
    python -m seedtune.simulations.bench_step --json --models minilm --head --batch-size 256  # the head stage

Prints one JSON line per model. Ratios (step / forward, training peak / inference peak) are measured in the
same process, alternating the timed calls, because absolute times on shared machines are noisy.
Peak memory per phase is the process's VmHWM after resetting it (``/proc/self/clear_refs``), so each phase's
peak includes the loaded model, exactly as a user's process would see it.

A trainable set above layer L (``--patterns``) has the output of layers 0..L-1 for the batch's records computed
once before the timed calls, as a run keeps it when its steps draw each record at least once
(``ScoredView.prepare``; ``prefix_cached`` in the JSON).

``--head``: the head stage's step (selection.mode = "head", a full Hadamard frame of K directions, the batch's
features already cached, as they are after a training run's first pass over its records) against one forward
of the whole model on the same batch.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

from typing import Any, Callable, Sequence

import numpy as np

from seedtune.client.zo_step import privatize, projected_gradients, zo_step
from seedtune.shared.protocol.aggregation import coefficient, update_scale
from seedtune.shared.engine.directions import frame_size, step_seeds
from seedtune.shared.privacy.noise import Noise, SecureRandom
from seedtune.shared.task.config import RunConfig
from seedtune.shared.task.tasks import load_split


def reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """This process's peak resident set size (VmHWM) in MB since start or the last :func:`reset_peak`."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def fixed_batch(task, batch_size: int, seq_len: int) -> list[list[int]]:
    """Real SST-2 text, concatenated so that every row has exactly seq_len tokens."""
    sentences = [r[0] for r in load_split(RunConfig().validate(), "test").records]
    ids = task.encode([" ".join(sentences[i : i + 6]) for i in range(0, 6 * batch_size, 6)])
    if min(len(x) for x in ids) < seq_len:
        raise RuntimeError("benchmark text too short for the requested sequence length")
    return ids


def torch_case(name: str, seq_len: int, fraction: float, patterns: Sequence[str] = (), device: str = "cpu",
               dtype: str = "float32", head: bool = False) -> tuple[Any, Any, dict]:
    import torch

    from seedtune.shared.task.config import ModelConfig
    from seedtune.shared.task.loading import load_task_model
    from seedtune.shared.task.placement import placement
    from seedtune.shared.engine.selection import select_pruned
    from seedtune.shared.engine.update import ScoredView

    config = ModelConfig(name=name, max_length=seq_len, device=device, dtype=dtype)
    config.validate()
    where, precision = placement(config)
    task = load_task_model(config)
    selection = task.head_set() if head else select_pruned(task.module, task.synflow_output, fraction, patterns)
    view = ScoredView.placed(task, selection, "hadamard" if head else "rademacher", where, precision)
    return task, view, {"head_stage": head,
        "runtime": "torch", "device": str(where), "dtype": dtype, "threads": torch.get_num_threads(),
        "trainable_entries": selection.size,
        "trainable_fraction": round(selection.fraction_of(task.module), 6), "patterns": list(patterns),
        "layers_run_once_per_step": view.depth}


def onnx_case(model_path: str) -> tuple[Any, Any, dict]:
    """The same measurement on ONNX Runtime, in a process that never imports torch."""
    from seedtune.client.onnx_runtime import OnnxReplica, OnnxTask
    from seedtune.shared.task.onnx_format import load_trainable

    task = OnnxTask(model_path)
    view = OnnxReplica(task).view
    return task, view, {"runtime": "onnxruntime", "trainable_entries": int(load_trainable(
        task.trainable_path, task.meta).size), "onnx_model": model_path}


def timed_calls(view: Any, ids: list[list[int]], task: Any = None) -> tuple[Callable[[], None], Callable[[], None]]:
    """A forward pass over the batch, and one private ZO step on it (estimate, privatise, apply). With ``task``
    (the head stage): the whole model's forward, and a step over a full Hadamard frame of the view's head."""
    labels = np.arange(len(ids)) % 2
    rng, noise = SecureRandom(), Noise.gaussian(1.0)
    if task is not None:
        directions = frame_size(view.selection.size)
        draws = iter(rng.seed64, None)

        def whole_forward() -> None:
            task.per_example_loss(task.collate(ids, labels))

        def head_step() -> None:
            result = zo_step(view, ids, labels, seeds=step_seeds("hadamard", draws, directions), mu=1e-3,
                             sample_rate=1.0, microbatch=len(ids), rng=rng, clip=1.0, noise=noise)
            lr = update_scale(1.0, directions)
            view.apply_all([(seed, coefficient(lr, s)) for seed, s in zip(result.seeds, result.scalars)])

        return whole_forward, head_step

    def forward() -> None:
        view.per_example_loss(ids, labels)

    def step() -> None:
        seed = rng.seed64()
        g, _ = projected_gradients(view, ids, labels, seed, 1e-3, len(ids))
        scalar, _ = privatize(g, 1.0, len(ids), noise, rng)
        view.apply(seed, float(np.float32(-1e-6 * scalar)))

    return forward, step


def mezo_reference_step(task: Any, ids: list[list[int]]) -> Callable[[], None]:
    """The MeZO / DPZero reference recipe on every weight, for comparison (a baseline, not the product):
    ``torch.manual_seed(seed)`` then ``torch.normal`` per parameter, in place: perturb +mu, forward, -2 mu,
    forward, +mu, then the clipped, noised update regenerating z once more from the seed. (The reference code
    writes ``param.data = param.data + s * z``; in-place ``add_`` is the faster form of the same recipe.)"""
    import torch

    params = list(task.module.parameters())
    batch = task.collate(ids, np.arange(len(ids)) % 2)
    mu, clip, lr = 1e-3, 1.0, 1e-6

    def move(seed: int, scale: float) -> None:
        torch.manual_seed(seed)
        for p in params:
            p.data.add_(torch.normal(0.0, 1.0, size=p.shape, dtype=p.dtype), alpha=scale)

    @torch.no_grad()
    def step() -> None:
        seed = int(np.random.randint(1_000_000_000))
        move(seed, mu)
        plus = task.per_example_loss(batch).double()
        move(seed, -2 * mu)
        minus = task.per_example_loss(batch).double()
        move(seed, mu)
        g = ((plus - minus) / (2 * mu)).clamp(-clip, clip)
        scalar = float((g.sum() + clip * torch.randn((), dtype=torch.float64)) / len(ids))
        move(seed, -lr * scalar)

    return step


def bench(name: str, batch_size: int, seq_len: int, fraction: float, repeats: int,
          onnx_model: str | None = None, patterns: Sequence[str] = (), mezo_reference: bool = False,
          device: str = "cpu", dtype: str = "float32", head: bool = False) -> dict:
    task, view, info = onnx_case(onnx_model) if onnx_model else \
        torch_case(name, seq_len, fraction, patterns, device, dtype, head)
    if task.max_length != seq_len:
        raise SystemExit(f"{onnx_model} was exported with max_length {task.max_length}, not --seq-len {seq_len}")
    ids = fixed_batch(task, batch_size, seq_len)
    if hasattr(view, "prepare"):  # torch: the frozen layers' output per record, as a run keeps it (none for ONNX)
        view.prepare(ids, visits=float("inf"))
        info["prefix_cached"] = getattr(view, "prefixes", None) is not None
    forward, step = timed_calls(view, ids, task if head else None)
    calls = [("forward", forward), ("step", step)]
    if mezo_reference:
        calls.append(("mezo", mezo_reference_step(task, ids)))
    forward()  # warm-up (lazy initialisation); the step's own first-call costs count against training
    exact_peak = reset_peak()
    gpu = str(info.get("device", "cpu")).startswith("cuda")
    peaks: dict[str, float] = {}
    for phase, fn in (("inference", forward), ("training", step)):
        reset_peak()
        if gpu:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        fn(), fn()
        peaks[phase] = peak_rss_mb()
        if gpu:
            torch.cuda.synchronize()
            peaks[f"gpu_{phase}"] = torch.cuda.max_memory_allocated() / 2**20
    inference_peak, training_peak = peaks["inference"], peaks["training"]
    if mezo_reference:
        calls[2][1]()  # its warm-up, after the peaks were taken: the product's peak is measured alone

    times: dict[str, list[float]] = {label: [] for label, _ in calls}
    for _ in range(repeats):
        for label, fn in calls:
            start = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - start)
    forward_s, step_s = statistics.median(times["forward"]), statistics.median(times["step"])
    reference = {}
    if mezo_reference:
        mezo_s = statistics.median(times["mezo"])
        reference = {"mezo_reference_entries": sum(p.numel() for p in task.module.parameters()),
                     "mezo_reference_step_s": round(mezo_s, 4),
                     "mezo_reference_over_forward": round(mezo_s / forward_s, 3)}
    return {
        "model": name,
        **info,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "forward_s": round(forward_s, 4),
        "zo_step_s": round(step_s, 4),
        "step_over_forward": round(step_s / forward_s, 3),
        "peak_rss_mb": round(training_peak, 1),
        "inference_peak_rss_mb": round(inference_peak, 1),
        "train_over_inference_memory": round(training_peak / inference_peak, 3),
        "peak_is_per_phase": exact_peak,
        **({"gpu_peak_mb": round(peaks["gpu_training"], 1), "gpu_inference_peak_mb": round(peaks["gpu_inference"], 1),
            "gpu_train_over_inference_memory": round(peaks["gpu_training"] / peaks["gpu_inference"], 3)}
           if gpu else {}),
        "repeats": repeats,
        **reference,
    }


def step_parser(description: str | None) -> argparse.ArgumentParser:
    """The options every step benchmark shares."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="one JSON line per model (the only output format)")
    parser.add_argument("--models", nargs="+", default=["minilm", "smollm2"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--fraction", type=float, default=0.01, help="pruned trainable fraction")
    parser.add_argument("--repeats", type=int, default=7)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = step_parser(__doc__)
    parser.add_argument("--onnx-model", help="measure this exported model on ONNX Runtime (one model only)")
    parser.add_argument("--patterns", nargs="+", default=[],
                        help="prune within parameters matching these names (torch; e.g. the top layers' MLP, "
                             "whose lower layers then run once per step)")
    parser.add_argument("--mezo-reference", action="store_true",
                        help="also time the MeZO/DPZero reference recipe on every weight, on the same batch")
    parser.add_argument("--device", default="cpu", help="torch: where the forward passes run (auto, cpu, cuda, ...)")
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16", "float16"],
                        help="torch: one row per model and forward dtype (the trainable entries stay float32)")
    parser.add_argument("--head", action="store_true",
                        help="torch: the head stage (the classifier head over a full Hadamard frame, features "
                             "cached) against a whole-model forward")
    args = parser.parse_args(argv)
    if args.head and (args.onnx_model or args.patterns or args.mezo_reference):
        parser.error("--head measures the torch head stage alone: no --onnx-model, --patterns or --mezo-reference")
    if args.mezo_reference and args.onnx_model:
        parser.error("--mezo-reference is a torch recipe; it does not run on ONNX Runtime")
    if args.onnx_model and len(args.models) != 1:
        parser.error("--onnx-model measures one model: give exactly one --models name")
    if args.onnx_model and args.patterns:
        parser.error("--patterns applies to torch models; an exported model carries its own trainable set")
    if args.onnx_model and args.dtypes != ["float32"]:
        parser.error("--dtypes applies to torch models; an ONNX Runtime node runs the exported float32 graph")
    for name in args.models:
        for dtype in args.dtypes:
            row = bench(name, args.batch_size, args.seq_len, args.fraction, args.repeats, args.onnx_model,
                        args.patterns, args.mezo_reference, args.device, dtype, args.head)
            print(json.dumps(row), flush=True)
            gc.collect()  # the next dtype's model loads into the memory this one held
    return 0


if __name__ == "__main__":
    sys.exit(main())
