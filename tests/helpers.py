"""Test helpers: sample sentences and a fresh-interpreter runner."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

SENTENCES = ["a great , moving film", "dull and lifeless", "the best thing i saw this year", "painfully bad",
             "charming", "an utter waste of two hours of anyone 's time"]
LABELS = np.array([1, 0, 1, 0, 1, 0])

# A user's own six-class questions (TREC-like), for the task tests
QUESTIONS = [("How far is the moon?", "NUM"), ("Who wrote Hamlet?", "HUM"), ("What is a fjord?", "DESC"),
             ("Where is Lima?", "LOC"), ("What does NASA stand for?", "ABBR"), ("What is a good pet?", "ENTY")]


def write_csv(path, rows, header="text,label"):
    """A CSV file of (text, label) rows with a header, as a user would bring it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + "\n" + "".join(f"\"{t}\",{y}\n" for t, y in rows), encoding="utf-8")
    return path



def run_python(code: str) -> str:
    """Run code in a fresh interpreter and return its stdout (for cross-process determinism checks)."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()
