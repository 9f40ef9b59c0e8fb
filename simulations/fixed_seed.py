"""The same federation twice, bit for bit: a check that a restructuring changed nothing. NOT PRIVATE.

    python -m seedtune.simulations.fixed_seed --out /tmp/a                      # this checkout
    python simulations/fixed_seed.py --checkout /path/to/older/worktree --out /tmp/b
    diff /tmp/a/summary.json /tmp/b/summary.json

Runs the README's main job (the embedded defaults, ``--nodes`` simulated nodes; ``--set key=value`` overrides) in
one process over the in-process transport, with every secret draw taken from a fixed public stream instead of
``os.urandom`` (the noise's CSPRNG key, the direction seeds, node sampling, challenge nonces) and the ledger
header's clock fixed. Its noise is therefore known to anyone: the run is for comparing two checkouts' ledgers,
digests, epsilons and accuracies, never for training a model. It writes ``summary.json`` (the run's summary
without its wall times and paths) under ``--out`` and prints it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

DROPPED = ("wall_s", "ledger")  # the only summary fields that may differ between two identical runs


def fixed_urandom(seed: int):
    """A public stand-in for os.urandom: SHA-256 in counter mode over ``seed``."""
    counter = 0

    def urandom(n: int) -> bytes:
        nonlocal counter
        out = b""
        while len(out) < n:
            counter += 1
            out += hashlib.sha256(seed.to_bytes(8, "little") + counter.to_bytes(8, "little")).digest()
        return out[:n]

    return urandom


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="a folder for the run (emptied first)")
    parser.add_argument("--checkout", default="", help="the source checkout to import seedtune from (default: "
                        "the one this file is in)")
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="RunConfig overrides (values read as JSON where they parse: 5, 0.05, true)")
    args = parser.parse_args(argv)
    checkout = Path(args.checkout or Path(__file__).resolve().parents[1]).resolve()
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"--set {item!r}: expected KEY=VALUE", file=sys.stderr)
            return 2
        try:  # numbers and booleans as JSON reads them ("5", "0.05", "true"); anything else stays a string
            overrides[key] = json.loads(value)
        except ValueError:
            overrides[key] = value
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    os.urandom = random._urandom = fixed_urandom(args.seed)  # type: ignore[attr-defined]
    gmtime = time.gmtime
    time.gmtime = lambda *_: gmtime(0)  # the header's created_utc
    os.environ["SEEDTUNE_ANCHORS"] = str(out / "anchors")
    loaded = sys.modules.get("seedtune")
    if loaded is not None and not Path(loaded.__file__ or "").resolve().is_relative_to(checkout):
        print(f"seedtune is already imported from {loaded.__file__}: run this file as a script "
              f"(python {__file__} --checkout {checkout})", file=sys.stderr)
        return 2
    sys.path.insert(0, str(checkout))
    os.chdir(out)  # the run folder is "run" in both runs: the ledger header pins the configuration, out_dir too
    from seedtune.server.federation import FederatedServer
    from seedtune.shared.task.config import load_config
    from seedtune.simulations.inprocess import InProcessGrid

    config = load_config(None, {"out_dir": "run", **overrides})
    grid = InProcessGrid(args.nodes, privacy_ledger=str(out / "holders.sqlite"))
    summary = FederatedServer(config, grid, "run").run()
    kept = {k: v for k, v in summary.items() if k not in DROPPED}
    (out / "summary.json").write_text(json.dumps(kept, indent=1, sort_keys=True))
    print(json.dumps(kept, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
