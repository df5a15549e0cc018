"""Regenerates the Python stubs of ``open_inference_grpc.proto``: ``python -m robustgate.protos.generate``.

The stubs are checked in (a fresh install needs no compiler); ``tests/test_protos.py`` regenerates
them into a temporary folder and fails when the checked-in copies differ. The proto is compiled
as ``robustgate/protos/open_inference_grpc.proto`` so that the generated ``_grpc`` module imports
its messages as ``robustgate.protos.open_inference_grpc_pb2``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTO_NAME = "open_inference_grpc.proto"
GENERATED = ("open_inference_grpc_pb2.py", "open_inference_grpc_pb2.pyi", "open_inference_grpc_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Compiles the proto with grpcio-tools' bundled protoc; returns the written files."""
    from grpc_tools import protoc  # dev dependency, pinned in pyproject.toml
    import grpc_tools

    with tempfile.TemporaryDirectory() as tmp:
        include = Path(tmp)
        (include / "robustgate" / "protos").mkdir(parents=True)
        shutil.copy(PROTO_DIR / PROTO_NAME, include / "robustgate" / "protos" / PROTO_NAME)
        well_known = Path(grpc_tools.__file__).parent / "_proto"
        args = [
            "grpc_tools.protoc",
            f"-I{include}",
            f"-I{well_known}",
            f"--python_out={include}",
            f"--pyi_out={include}",
            f"--grpc_python_out={include}",
            f"robustgate/protos/{PROTO_NAME}",
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO_NAME}")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for name in GENERATED:
            text = (include / "robustgate" / "protos" / name).read_text()
            if name == GENERATED[0]:
                text = private_pool(text)
            (out_dir / name).write_text(text)
            written.append(out_dir / name)
        return written


def private_pool(pb2: str) -> str:
    """Registers the messages in a descriptor pool of their own instead of protobuf's default pool.

    tritonclient (``grpc_service.proto``) and MLServer (``dataplane.proto``) register the same
    ``inference.*`` message names in the default pool, so with the default pool our stubs and
    tritonclient cannot be imported in one process (``duplicate symbol
    'inference.ServerLiveRequest'``). Wire compatibility needs only the field numbers and the
    service path, both unchanged. The pool is ``open_inference_grpc_pb2.DESCRIPTOR.pool``."""
    default = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
    if default not in pb2:
        raise RuntimeError("unexpected protoc output: no default-pool registration to replace")
    return pb2.replace(default, "DESCRIPTOR = _descriptor_pool.DescriptorPool().AddSerializedFile(", 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTO_DIR, help="where to write the stubs (default: beside the proto)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
