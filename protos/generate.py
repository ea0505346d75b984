"""Generates the Python stubs of the quota.v1 contract into api/v1/ (quota_sidecar.api.v1).

grpcio-tools writes the modules (`quota_pb2.py`, `quota_pb2_grpc.py`) and
mypy-protobuf their type stubs (`.pyi`): protoc's own `--pyi_out` types the
messages only, while mypy-protobuf also types the service stubs, sync and
asyncio, so a caller's `stub.CheckSend(request)` is checked against the
contract. `python protos/generate.py` rewrites the committed stubs; `--check`
regenerates them into a temporary folder and exits 1 when they differ from the
committed ones, so CI proves that the stubs match the protos.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import sys
import sysconfig
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
TARGET = ROOT / "api" / "v1"
SOURCES = ["quota/v1/quota.proto"]
GENERATED = ["quota_pb2.py", "quota_pb2.pyi", "quota_pb2_grpc.py", "quota_pb2_grpc.pyi"]
PACKAGE = "quota_sidecar.api.v1"


def generate(out: Path) -> None:
    include = str(Path(protoc.__file__).parent / "_proto")
    # mypy-protobuf installs its protoc plugins as scripts beside this interpreter's.
    scripts = Path(sysconfig.get_path("scripts"))
    with tempfile.TemporaryDirectory() as raw:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTOS}",
            f"-I{include}",
            f"--python_out={raw}",
            f"--grpc_python_out={raw}",
            f"--plugin=protoc-gen-mypy={scripts / 'protoc-gen-mypy'}",
            f"--mypy_out=quiet:{raw}",
            f"--plugin=protoc-gen-mypy_grpc={scripts / 'protoc-gen-mypy_grpc'}",
            f"--mypy_grpc_out=quiet:{raw}",
            *SOURCES,
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        for name in GENERATED:
            text = (Path(raw) / "quota" / "v1" / name).read_text()
            # The stubs live inside the quota_sidecar namespace, not at a bare
            # top-level `quota` package that could collide in site-packages.
            text = re.sub(r"^from quota\.v1 import ", f"from {PACKAGE} import ", text, flags=re.M)
            (out / name).write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed stubs are stale")
    args = parser.parse_args()
    if not args.check:
        generate(TARGET)
        return 0
    with tempfile.TemporaryDirectory() as fresh:
        generate(Path(fresh))
        stale = [n for n in GENERATED if not filecmp.cmp(Path(fresh) / n, TARGET / n, shallow=False)]
    if stale:
        print(f"stubs out of date with protos/: {', '.join(stale)}; run python protos/generate.py")
        return 1
    print("stubs match protos/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
