"""Benchmark: the private ZO step on ONNX Runtime against torch, per model, on this CPU.

    python -m seedtune.simulations.bench_runtimes --json [--models minilm smollm2] [--batch-size 32] [--seq-len 64]

For each model: export the base model with its pruned trainable set (``seedtune export-onnx``, cached under
``--export-dir``), then run ``simulations.bench_step`` once on torch and once on ONNX Runtime, each in a
fresh process so that peak memory is the runtime's own (the ONNX Runtime process imports no torch). Prints
one JSON line per model with both rows and the ratios. Step times are compared in a third process that
loads both runtimes and alternates their steps (the median of per-pair ratios), because absolute times from
two processes run one after the other on a shared machine are not comparable.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from seedtune.simulations.bench_step import fixed_batch, onnx_case, step_parser, timed_calls, torch_case


def _json_line(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def interleaved_step_ratio(name: str, model: str, batch_size: int, seq_len: int, fraction: float,
                           repeats: int) -> dict:
    """ONNX Runtime step time / torch step time, alternating the two in one process."""
    cases = [torch_case(name, seq_len, fraction), onnx_case(model)]
    steps = [timed_calls(view, fixed_batch(task, batch_size, seq_len))[1] for task, view, _ in cases]
    for step in steps:
        step()  # warm-up
    ratios = []
    for _ in range(repeats):
        times = []
        for step in steps:
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        ratios.append(times[1] / times[0])
    return {"onnx_over_torch_step_time": round(statistics.median(ratios), 3),
            "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)]}


def compare(name: str, batch_size: int, seq_len: int, fraction: float, repeats: int, export_dir: Path) -> dict:
    model = export_dir / f"{name}-len{seq_len}-frac{fraction:g}" / "model.onnx"
    if not model.is_file():
        _json_line([sys.executable, "-m", "seedtune.cli", "export-onnx", "--out", str(model), "-s",
                    f"model.name={name}", "-s", f"model.max_length={seq_len}", "-s", f"selection.fraction={fraction}"])
    bench = [sys.executable, "-m", "seedtune.simulations.bench_step", "--json", "--models", name, "--batch-size",
             str(batch_size), "--seq-len", str(seq_len), "--fraction", str(fraction), "--repeats", str(repeats)]
    torch_row = _json_line(bench)
    onnx_row = _json_line(bench + ["--onnx-model", str(model)])
    timing = _json_line([sys.executable, "-m", "seedtune.simulations.bench_runtimes", "--interleave", str(model), "--models",
                         name, "--batch-size", str(batch_size), "--seq-len", str(seq_len), "--fraction",
                         str(fraction), "--repeats", str(repeats)])
    if onnx_row["trainable_entries"] != torch_row["trainable_entries"]:
        raise SystemExit(f"{model} holds another trainable set than torch selects; delete it to export again")
    return {
        "model": name, "batch_size": batch_size, "seq_len": seq_len,
        "torch_zo_step_s": torch_row["zo_step_s"], "onnx_zo_step_s": onnx_row["zo_step_s"],
        **timing,
        "torch_peak_rss_mb": torch_row["peak_rss_mb"], "onnx_peak_rss_mb": onnx_row["peak_rss_mb"],
        "onnx_over_torch_peak_memory": round(onnx_row["peak_rss_mb"] / torch_row["peak_rss_mb"], 3),
        "torch": torch_row, "onnxruntime": onnx_row,
    }


def main(argv: list[str] | None = None) -> int:
    parser = step_parser(__doc__)
    parser.add_argument("--export-dir", type=Path, default=Path("results/onnx"), help="where exports are cached")
    parser.add_argument("--interleave", metavar="MODEL.onnx", help=argparse.SUPPRESS)  # the timing process
    args = parser.parse_args(argv)
    if args.interleave:
        row = interleaved_step_ratio(args.models[0], args.interleave, args.batch_size, args.seq_len, args.fraction,
                                     args.repeats)
        print(json.dumps(row), flush=True)
        return 0
    for name in args.models:
        row = compare(name, args.batch_size, args.seq_len, args.fraction, args.repeats, args.export_dir)
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
