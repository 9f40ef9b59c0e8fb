#!/usr/bin/env bash
# The prepared GPU check (issue 19; simulations/gpu_check.py): bench_step for MiniLM and SmolLM2 in float32 and
# bfloat16 with peak GPU memory, direction streams CUDA vs CPU vs numpy, a bfloat16 run's ledger replayed on
# the CPU to the same digest, and a SmolLM2 SST-2 run at epsilon 3 with the steps the remaining time allows.
# Prints one JSON line per check and a summary line; exit 1 if the directions or the replay differ.
#
#   bash scripts/gpu_check.sh                 # DEVICE=cuda, BUDGET_S=420 (under 8 minutes with set-up)
#   DEVICE=cpu QUICK=1 bash scripts/gpu_check.sh   # the same code on tiny models (what CI runs, via a test)
#
# Needs a CUDA build of torch: with the CPU pin of scripts/setup.sh in .venv, install seedtune into an
# environment that already has one (README, "GPUs and edge devices"). Environment: PYTHON (.venv/bin/python,
# else python3), DEVICE, BUDGET_S, QUICK, OUT (run folders; default a temporary folder), SEEDTUNE_DATA.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
ARGS=(--device "${DEVICE:-cuda}" --budget-s "${BUDGET_S:-420}")
[ "${QUICK:-0}" = 1 ] && ARGS+=(--quick)
[ -n "${OUT:-}" ] && ARGS+=(--out "$OUT")
exec "$PY" -m seedtune.simulations.gpu_check "${ARGS[@]}"
