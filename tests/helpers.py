"""Test helpers: sample sentences and a fresh-interpreter runner."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

SENTENCES = ["a great , moving film", "dull and lifeless", "the best thing i saw this year", "painfully bad",
             "charming", "an utter waste of two hours of anyone 's time"]
LABELS = np.array([1, 0, 1, 0, 1, 0])



def run_python(code: str) -> str:
    """Run code in a fresh interpreter and return its stdout (for cross-process determinism checks)."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()
