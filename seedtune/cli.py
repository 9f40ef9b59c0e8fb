"""seedtune: private zeroth-order finetuning of language models.

Train a model on your data with differential privacy (train; every config key: seedtune config --defaults),
rebuild the finetuned model from a run's ledger (replay), check a ledger's history (verify), export it for
ONNX Runtime nodes (export-onnx), choose the noise for a privacy target (noise-search) and keep a data holder's
privacy ledger (holder init / status / backup). A federation runs
through Flower: bash scripts/simulate.sh on one machine, flwr run . against a deployment (README).
Each command: seedtune CMD -h.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import re
import sys
from typing import Any, NoReturn

from seedtune.shared.task.config import ConfigError, load_config, parse_override


def _overrides(args: argparse.Namespace) -> dict:
    return dict(parse_override(o) for o in args.set)


def _train(args: argparse.Namespace) -> int:
    from seedtune import api

    print(json.dumps(api.train(args.config, _overrides(args), out=args.out, progress=not args.no_progress,
                               resume=args.resume, unanchored=args.unanchored)), flush=True)
    return 0


def _config(args: argparse.Namespace) -> int:
    from seedtune.shared.task.config import RunConfig, describe

    if args.defaults and (args.config or args.set):
        raise ConfigError("config --defaults prints the defaults alone; drop -c/-s, or drop --defaults")
    config = RunConfig() if args.defaults else load_config(args.config, _overrides(args))
    print(describe(config), end="")
    return 0


def _replay(args: argparse.Namespace) -> int:
    from seedtune import api

    print(json.dumps(api.replay(args.ledger, args.out)), flush=True)
    return 0


def _export_onnx(args: argparse.Namespace) -> int:
    from seedtune import api

    print(json.dumps(api.export(args.ledger, args.out, args.config, _overrides(args))), flush=True)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from seedtune import api

    print(json.dumps(api.verify(args.ledger, unanchored=args.unanchored, server_key=args.server_key)), flush=True)
    return 0


def _noise_search(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from seedtune.shared.privacy.noise_search import Target, accounted_epsilon, p_small, quick, search

    targets = [Target(e, args.delta, args.sample_rate, s) for s in args.steps for e in args.epsilon]
    rows = []
    desc = "noise search (with LMO: minutes per configuration)" if args.lmo else "noise calibration"
    for target in tqdm(targets, desc=desc, unit="config", disable=args.no_progress):
        found = search(target) if args.lmo else quick(target)
        row: dict[str, Any] = {"epsilon": target.epsilon, "delta": target.delta, "sample_rate": target.sample_rate,
               "steps": target.steps}
        for family, noise in found.items():
            row[family] = {"std": noise.std, "params": noise.describe(), "p_small": p_small(noise),
                           "accounted_epsilon": accounted_epsilon(noise, target)}
        if "auto" in found:
            row["auto_family"] = found["auto"].family
            row["auto_variance_vs_gaussian"] = (found["auto"].std / found["gaussian"].std) ** 2
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
    if not args.json:
        families = [f for f in ("gaussian", "laplace", "lmo") if all(f in r for r in rows)]
        print(f"noise std per unit of clip C at the same guarantee (delta {args.delta}, q {args.sample_rate:.4g}); "
              f"epsilon as accounted (PLD)" + ("" if "lmo" in families else "; --lmo adds the LMO search (slow)"))
        auto = all("auto_family" in r for r in rows)
        print(f"{'epsilon':>7} {'steps':>6} " + " ".join(f"{f:>9}" for f in families)
              + (f"  {'auto':<9} {'var/gauss':>9}" if auto else ""))
        for r in rows:
            print(f"{r['epsilon']:>7g} {r['steps']:>6} " + " ".join(f"{r[f]['std']:>9.4f}" for f in families)
                  + (f"  {r['auto_family']:<9} {r['auto_variance_vs_gaussian']:>9.3f}" if auto else ""))
    return 0


def _holder(args: argparse.Namespace) -> int:
    from seedtune.client.privacy_ledger import PrivacyLedger, default_path, init
    from seedtune.shared.protocol.identity import IdentityError, load_public

    path = args.ledger or default_path()
    if args.action == "init":
        init(path).close()
        print(json.dumps({"privacy_ledger": str(path), "created": True}), flush=True)
        return 0
    ledger = PrivacyLedger(path)
    try:
        if args.action == "forget-server":
            if not args.server_key:
                raise ConfigError("holder forget-server needs --server-key, the server's public key (.pub) whose "
                                  "pinned ledger to forget")
            try:
                public = load_public(args.server_key, "--server-key")
            except IdentityError as exc:
                raise ConfigError(str(exc)) from exc
            removed = ledger.forget_server(public, args.holder)
            print(json.dumps({"privacy_ledger": str(path), "server_key": public, "holder": args.holder,
                              "pins_removed": removed}), flush=True)
        elif args.action == "backup":
            if not args.dest:
                raise ConfigError("holder backup needs DEST, the new file to copy the ledger to")
            ledger.backup(args.dest)
            print(json.dumps({"privacy_ledger": str(path), "backup": args.dest}), flush=True)
        else:
            print(json.dumps({"privacy_ledger": str(path), "delta": args.delta,
                              "budgets": ledger.summary(args.delta)}), flush=True)
    finally:
        ledger.close()
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, with the closest subcommand or option suggested for a mistyped one."""

    def error(self, message: str) -> NoReturn:
        choices = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        unknown = re.search(r"unrecognized arguments: (\S+)", message)
        if choices:
            known = re.findall(r"'([^']*)'", choices.group(2))
            close = difflib.get_close_matches(choices.group(1), known, n=1)
        elif unknown:
            known = [o for action in self._actions for o in action.option_strings]
            for sub in self._subparsers._group_actions if self._subparsers else []:
                known += [o for p in getattr(sub, "choices", {}).values() for a in p._actions for o in a.option_strings]
            close = difflib.get_close_matches(unknown.group(1), known, n=1)
        else:
            close = []
        super().error(message + (f"; did you mean {close[0]!r}?" if close else ""))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="seedtune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="centralized DP zeroth-order training; prints a JSON summary line")
    p.add_argument("--config", "-c", action="append", default=[],
                   help="TOML config file; repeat to layer them, e.g. -c configs/trec.toml -c configs/smollm2_eps3.toml "
                   "(later files win; defaults fill anything they omit)")
    p.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. -s privacy.epsilon=1 -s model.name=smollm2 (every key, its "
                   "default and meaning: seedtune config --defaults)")
    p.add_argument("--out", help="run folder (default runs/train-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out from its ledger "
                   "(the same configuration and training data, refused otherwise; the privacy accounting continues)")
    p.add_argument("--unanchored", action="store_true", help="with --resume: accept a ledger that its run folder's "
                   "metrics.jsonl does not anchor (deleted or emptied); refused without this, since a ledger that "
                   "lost steps cannot be told from a whole one")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_train)

    p = sub.add_parser("config", help="print a run's configuration as TOML, every key with its meaning (with "
                       "--defaults: the defaults; with -c/-s: what train would use)")
    p.add_argument("--defaults", action="store_true", help="the defaults, ignoring any config file")
    p.add_argument("--config", "-c", action="append", default=[], help="TOML config file(s), layered as train does")
    p.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.set_defaults(func=_config)

    p = sub.add_parser("replay", help="rebuild the finetuned model from its ledger; prints a JSON line")
    p.add_argument("ledger", help="ledger.sqlite of a federated run or of a seedtune train run")
    p.add_argument("--out", help="write the model as a Hugging Face folder here")
    p.set_defaults(func=_replay)

    p = sub.add_parser("export-onnx", help="the model (base + ledger) as ONNX with its trainable entries as an "
                       "input, checked against torch; prints a JSON line")
    p.add_argument("ledger", nargs="?", help="ledger.sqlite of a federated run (omit to export a base model)")
    p.add_argument("--out", required=True, help="the .onnx file to write (sidecar files go beside it)")
    p.add_argument("--config", "-c", help="without LEDGER: the run config whose base model and trainable set to "
                   "export (for ONNX Runtime nodes joining that federation)")
    p.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.set_defaults(func=_export_onnx)

    p = sub.add_parser("verify", help="check a ledger's hash chains and round bookkeeping, and that it still "
                       "reaches the last round its run folder's metrics.jsonl anchors; prints a JSON line")
    p.add_argument("ledger", help="ledger.sqlite of a federated run or of a seedtune train run")
    p.add_argument("--unanchored", action="store_true", help="check a ledger with rounds but no anchor beside it "
                   "(the chains alone; the output then says \"unanchored\": true); refused without this")
    p.add_argument("--server-key", help="the federation server's public key (.pub): every round must be signed by "
                   "it (signed_rounds in the output); without it signatures are not checked (null)")
    p.set_defaults(func=_verify)

    p = sub.add_parser("holder", help="a data holder's privacy ledger on this node: init (create it, once), status "
                       "(each budget's releases, steps and epsilon), backup DEST (a consistent copy, safe while "
                       "nodes run), forget-server --server-key PUB (unpin the ledger followed from that server, "
                       "so that its next ledger may be followed; budgets stay)")
    p.add_argument("action", choices=["init", "status", "backup", "forget-server"])
    p.add_argument("dest", nargs="?", help="backup: the new file to write")
    p.add_argument("--ledger", help="the privacy ledger file (default $SEEDTUNE_PRIVACY_LEDGER, else "
                   "$XDG_DATA_HOME/seedtune/privacy-ledger.sqlite, i.e. ~/.local/share/...)")
    p.add_argument("--delta", type=float, default=1e-5, help="status: the delta epsilons are given at")
    p.add_argument("--server-key", help="forget-server: the server's public key (.pub)")
    p.add_argument("--holder", help="forget-server: only this holder's pin (default: every holder's)")
    p.set_defaults(func=_holder)

    p = sub.add_parser("noise-search", help="the noise of the private scalar at a guarantee: Gaussian and Laplace "
                       "calibrated (seconds per configuration), and with --lmo the least-variance search over LMO "
                       "mixtures too (minutes per configuration, cached)")
    p.add_argument("--epsilon", type=float, nargs="+", default=[1.0, 3.0])
    p.add_argument("--steps", type=int, nargs="+", default=[1000])
    p.add_argument("--lmo", action="store_true", help="also search the LMO family and pick privacy.noise = 'auto' "
                   "(slow: minutes per configuration; the result is cached)")
    p.add_argument("--sample-rate", type=float, default=64 / 50000)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--json", action="store_true", help="one JSON line per configuration instead of a table")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_noise_search)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from seedtune.shared.protocol.ledger import LedgerError
    from seedtune.shared.protocol.chain import ChainError
    from seedtune.shared.engine.follower import ReplicaError
    from seedtune.shared.task.loading import ModelLoadError
    from seedtune.shared.task.tasks import DataError
    from seedtune.client.privacy_ledger import PrivacyLedgerError

    try:
        return args.func(args)
    except (ConfigError, DataError, FileNotFoundError, ModelLoadError, LedgerError, ChainError, ReplicaError,
            PrivacyLedgerError) as exc:
        print(f"seedtune: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
