"""The ``seedtune`` command. Subcommands import their implementation lazily so ``--help`` stays fast."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from shared.config import ConfigError, load_config, parse_override


def _train(args: argparse.Namespace) -> int:
    from client.trainer import train

    overrides = dict(parse_override(o) for o in args.set)
    if args.out:
        overrides["out_dir"] = args.out
    config = load_config(args.config, overrides)
    summary = train(config, progress=not args.no_progress)
    print(json.dumps(summary), flush=True)
    return 0


def _replay(args: argparse.Namespace) -> int:
    from server.replay import replay

    print(json.dumps(replay(args.ledger, args.out)), flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seedtune", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="centralized DP zeroth-order training; prints a JSON summary line")
    p.add_argument("--config", "-c", help="TOML config file (defaults are used for anything it omits)")
    p.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. -s privacy.epsilon=1 -s model.name=smollm2")
    p.add_argument("--out", help="run folder (default runs/train-<time>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_train)

    p = sub.add_parser("replay", help="rebuild the finetuned model from its ledger; prints a JSON line")
    p.add_argument("ledger", help="ledger.sqlite of a federated run")
    p.add_argument("--out", help="write the model as a Hugging Face folder here")
    p.set_defaults(func=_replay)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from server.ledger import LedgerError
    from shared.chain import ChainError
    from shared.models import ModelLoadError
    from shared.replica import ReplicaError

    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ModelLoadError, LedgerError, ChainError, ReplicaError) as exc:
        print(f"seedtune: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
