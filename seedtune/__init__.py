"""seedtune: private zeroth-order finetuning of language models (and of your own torch models).

The design card's folders are subpackages: ``seedtune.shared`` (what both sides import), ``seedtune.client``
(trainers and federated nodes), ``seedtune.server`` (the federation's server, replay) and
``seedtune.simulations`` (scenarios and benchmarks); ``seedtune.cli`` is the ``seedtune`` command. An installed
wheel holds them under ``seedtune/`` (pyproject.toml's package-dir); in a source checkout they stay at the top
of the tree, and this package's search path takes them from there, so that either way they import as
``seedtune.<folder>`` and no generic top-level name (``client``, ``shared``) is claimed.
"""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent
if not (_HERE / "shared").is_dir() and (_HERE.parent / "shared" / "__init__.py").is_file():
    __path__.append(str(_HERE.parent))  # noqa: F821  (a package's __path__; a source checkout)
