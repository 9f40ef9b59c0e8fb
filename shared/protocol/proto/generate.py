"""Regenerate (or, with ``--check``, verify) the Python code for protos/*.proto.

    python -m seedtune.shared.protocol.proto.generate          # rewrite shared/protocol/proto/*_pb2.py(i)
    python -m seedtune.shared.protocol.proto.generate --check  # exit 1 if the committed files differ from fresh output

Needs grpcio-tools (the ``dev`` extra), pinned so that the output is byte-stable.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
PROTO_DIR = ROOT / "protos"
OUT_DIR = Path(__file__).resolve().parent


def generate(out_dir: Path) -> list[Path]:
    from grpc_tools import protoc

    protos = sorted(PROTO_DIR.glob("*.proto"))
    if not protos:
        raise FileNotFoundError(f"no .proto files in {PROTO_DIR}")
    args = ["protoc", f"-I{PROTO_DIR}", f"--python_out={out_dir}", f"--pyi_out={out_dir}", *map(str, protos)]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return sorted(p for p in out_dir.iterdir() if p.name.endswith(("_pb2.py", "_pb2.pyi")))


def stale_files() -> list[str]:
    """Names of generated files whose committed content differs from what protoc makes now."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name: p.read_bytes() for p in generate(Path(tmp))}
    current = {p.name: p.read_bytes() for p in OUT_DIR.iterdir() if p.name.endswith(("_pb2.py", "_pb2.pyi"))}
    return sorted(name for name in fresh.keys() | current.keys() if fresh.get(name) != current.get(name))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare, write nothing")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print(f"out of date: {', '.join(stale)}; run python -m seedtune.shared.protocol.proto.generate",
                  file=sys.stderr)
            return 1
        print("generated protobuf code is up to date")
        return 0
    for path in generate(OUT_DIR):
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
