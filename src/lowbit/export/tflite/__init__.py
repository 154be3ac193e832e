"""TFLite (LiteRT) export: lowbit writes the flatbuffer itself, no TensorFlow needed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx

from ...errors import LowbitError
from ...graph.write import atomic_write_bytes, same_file
from .convert import IO_KINDS, PRECISIONS, ExportResult, convert
from .metadata import ImageMetadata
from .writer import read_metadata


def export_tflite(
    model: str | Path | onnx.ModelProto,
    output: str | Path,
    io: str = "float",
    allow_float_fallback: bool = False,
    batch: int = 1,
    precision: str = "auto",
    shapes: dict[str, tuple[int, ...]] | None = None,
    calib: Any = None,
    preprocess: Any = None,
    float_outputs: bool = False,
    values: dict[str, Any] | None = None,
    metadata: ImageMetadata | None = None,
) -> ExportResult:
    """Convert `model` (float, lowbit's float16 or QDQ int8 ONNX) and write `output` atomically; see `convert`."""
    out = Path(output)
    if not isinstance(model, onnx.ModelProto) and same_file(out, model):
        raise LowbitError(f"output {out} is the input model; choose another path with -o")
    if out.suffix.lower() != ".tflite":
        raise LowbitError(f"output {out} must end in .tflite")
    if not out.parent.exists():
        raise LowbitError(f"output folder {out.parent} does not exist; create it first")
    result = convert(
        model,
        io=io,
        allow_float_fallback=allow_float_fallback,
        batch=batch,
        precision=precision,
        shapes=shapes,
        calib=calib,
        preprocess=preprocess,
        float_outputs=float_outputs,
        values=values,
        metadata=metadata,
    )
    atomic_write_bytes(result.data, out)
    result.path = out
    return result


__all__ = ["export_tflite", "convert", "ExportResult", "ImageMetadata", "IO_KINDS", "PRECISIONS", "read_metadata"]
