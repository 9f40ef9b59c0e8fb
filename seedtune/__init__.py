"""seedtune's entry points: the ``seedtune`` command (:mod:`seedtune.cli`).

This package sits above ``client/`` and ``server/``: it is the one place that imports both, so that neither
side depends on the other and ``shared/`` depends on neither (docs/engine.md, "Module map").
"""
