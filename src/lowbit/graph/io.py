"""Model files in and out: clear errors for bad files, atomic writes, never over the input."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from ..errors import LowbitError


def load_model(path: str | Path) -> ir.Model:
    """Load and check an ONNX model; a corrupt, truncated or missing file is a one-line LowbitError."""
    p = Path(path)
    if not p.is_file():
        raise LowbitError(f"model file not found: {p}")
    try:
        proto = onnx.load(str(p))
    except (DecodeError, ValueError, RuntimeError, OSError) as e:
        raise LowbitError(f"{p} is not a readable ONNX model (corrupt or truncated?): {_first_line(e)}") from None
    if not proto.graph.node:
        raise LowbitError(f"{p} holds no graph nodes (corrupt, truncated or not an ONNX model)")
    try:
        # Path-based check so models with external data (> 2 GB) are checked too.
        onnx.checker.check_model(str(p))
    except (onnx.checker.ValidationError, onnx.onnx_cpp2py_export.checker.ValidationError) as e:
        raise LowbitError(f"{p} fails the ONNX checker (corrupt or truncated?): {_first_line(e)}") from None
    return ir.from_proto(proto) if not _has_external_data(proto) else ir.load(str(p))


def _has_external_data(proto: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def same_file(a: str | Path, b: str | Path) -> bool:
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return a.samefile(b)
    return a.resolve() == b.resolve()


def check_output_path(output: str | Path, inputs: list[str | Path]) -> Path:
    out = Path(output)
    for src in inputs:
        if same_file(out, src):
            raise LowbitError(f"output {out} is the input model; choose another path with -o")
    if out.suffix.lower() != ".onnx":
        raise LowbitError(f"output {out} must end in .onnx")
    if not out.parent.exists():
        raise LowbitError(f"output folder {out.parent} does not exist; create it first")
    return out


def atomic_write_bytes(data: bytes, path: str | Path) -> None:
    """Write to a temporary file in the target folder, then rename: readers never see half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs should be as readable as any file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model(model: ir.Model | onnx.ModelProto, path: str | Path) -> Path:
    """Serialize and write atomically (models under 2 GB; larger ones need external data)."""
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    data = proto.SerializeToString()
    atomic_write_bytes(data, path)
    return Path(path)


def model_size(path: str | Path) -> int:
    return Path(path).stat().st_size
