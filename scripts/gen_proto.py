"""Regenerate the Python code for proto/ into src/dataops/v1/.

    python scripts/gen_proto.py            # write src/dataops/v1/*_pb2*.py
    python scripts/gen_proto.py --out DIR  # write elsewhere (the staleness test does)

The output depends only on proto/ and the pinned grpcio-tools version (pyproject's
`test` extra), so tests/test_contract.py (test_generated_code_is_current) can regenerate
and compare byte for byte.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc

    # Only our contract: proto/google holds googleapis protos vendored for other
    # languages' clients; Python gets them from googleapis-common-protos, and
    # generating them here would shadow that package's `google.rpc` modules.
    sources = sorted(p.relative_to(PROTO_DIR).as_posix() for p in (PROTO_DIR / "dataops").rglob("*.proto"))
    well_known = resources.files("grpc_tools") / "_proto"
    out.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    package_dir = out / "dataops" / "v1"
    init = package_dir / "__init__.py"
    init.write_text('"""Generated from proto/dataops/v1 by scripts/gen_proto.py; do not edit."""\n')
    return sorted(package_dir.glob("*.py*"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "src")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
