"""seedtune: private zeroth-order finetuning of language models (and of your own torch models).

    import seedtune
    trainer = seedtune.PrivateZO(model, loss_fn, num_examples, steps=300, epsilon=3.0, clip=1.0, ledger="run.sqlite")
    trainer.fit(); trainer.epsilon

and seedtune.train, .replay, .verify, .export, .load_model: the command line's commands as functions.

The design card's folders are subpackages: ``seedtune.shared`` (what both sides import), ``seedtune.client``
(trainers and federated nodes), ``seedtune.server`` (the federation's server, replay) and
``seedtune.simulations`` (scenarios and benchmarks); ``seedtune.cli`` is the ``seedtune`` command. An installed
wheel holds them under ``seedtune/`` (pyproject.toml's package-dir). In a source checkout they stay at the top
of the tree and ``seedtune/<folder>`` is a link to each, which Python, mypy and editors follow; a tree without
the links (a Flower app bundle leaves links out) gets the finder below instead. Either way they import as
``seedtune.<folder>`` and no generic top-level name (``client``, ``shared``) is claimed.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

_FOLDERS = ("shared", "client", "server", "simulations")
_HERE = Path(__file__).resolve().parent


class _CheckoutFolders(importlib.abc.MetaPathFinder):
    """In a source tree without the links: ``seedtune.<folder>`` is the tree's top-level folder, for these four
    names only (the rest of the checkout, tests/ or examples/, stays outside the package)."""

    def find_spec(self, name, path=None, target=None):
        package, _, folder = name.partition(".")
        if package != "seedtune" or folder not in _FOLDERS:
            return None
        init = _HERE.parent / folder / "__init__.py"
        return importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])


if not (_HERE / "shared").is_dir() and (_HERE.parent / "shared" / "__init__.py").is_file():
    sys.meta_path.insert(0, _CheckoutFolders())

# The public API (seedtune.api), loaded on first use: importing seedtune.shared (which every module does) must
# not load the trainer and the server with it (the house's dependencies flow one way).
__all__ = ["PrivateZO", "train", "replay", "verify", "export", "load_model"]


def __getattr__(name: str):
    if name in __all__:
        from seedtune import api

        return getattr(api, name)
    raise AttributeError(f"module 'seedtune' has no attribute {name!r}")
