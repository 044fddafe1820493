"""Regenerate the Python stubs next to the .proto sources.

    python protos/generate.py          # write protos/*_pb2*.py
    python protos/generate.py --check  # exit 1 if the checked-in stubs are stale

The sources are compiled under the virtual path ``visionserve/protos`` so that the
generated modules import each other as ``visionserve.protos.X_pb2``.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def generate(out_root: Path) -> list[Path]:
    from grpc_tools import protoc  # only needed by developers: `pip install grpcio-tools`

    sources = sorted(HERE.glob("*.proto"))
    include = protoc.__file__.rsplit("/", 1)[0] + "/_proto"
    args = ["protoc", f"-I{include}", f"-Ivisionserve/protos={HERE}",
            f"--python_out={out_root}", f"--pyi_out={out_root}", f"--grpc_python_out={out_root}"]
    args += [f"visionserve/protos/{s.name}" for s in sources]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted((out_root / "visionserve" / "protos").glob("*_pb2*.py*"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        stale = []
        for produced in generate(Path(tmp)):
            target = HERE / produced.name
            if args.check:
                if not target.exists() or not filecmp.cmp(produced, target, shallow=False):
                    stale.append(target.name)
            else:
                target.write_bytes(produced.read_bytes())
        if stale:
            print(f"stale generated stubs: {', '.join(stale)}; run python protos/generate.py")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
