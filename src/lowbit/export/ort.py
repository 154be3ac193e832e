"""ORT-format export: the `.ort` flatbuffer ONNX Runtime Mobile loads, and its required-operators config.

The conversion is ONNX Runtime's own tool, `onnxruntime.tools.convert_onnx_models_to_ort` (the documented way to
make ORT-format models; it also writes the operator config a reduced-size build takes with
`--include_ops_by_config`). lowbit runs it in a temporary folder beside the output and then writes both files
together, atomically, under the user's names.

Settings, and why:
- optimization style "Fixed": the graph is optimized (level "all") once, at conversion, and the result saved,
  so a phone's CPU execution provider runs exactly the graph tested here: for a QDQ model the fused integer
  kernels (QLinearConv, QGemm, ...) that ONNX Runtime also builds when it loads the ONNX file. "Runtime"
  (for NNAPI/CoreML, which need the QDQ nodes kept) saves the fusions to be replayed at load instead; ONNX
  Runtime 1.32 fails to convert lowbit's QDQ models that way (bias DequantizeLinear nodes), and its replay is
  off unless the app sets `session.enable_saved_runtime_optimizations`.
- target platform "arm": phones. It allows int8 (not only uint8) activations in the QDQ fusions, as ONNX
  Runtime on ARM does by default, and leaves out the x86-only NCHWc layout; the file runs on x86 too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import onnx

from ..errors import LowbitError
from ..evaluate.jsonable import dumps, jsonable
from ..graph.io import load_proto, model_name
from ..graph.write import check_paths, write_together

OPTIMIZATION_STYLE = "Fixed"
TARGET_PLATFORM = "arm"


@dataclasses.dataclass
class OrtExportResult:
    """The `.ort` bytes (`data`), the operator config text, and what is in them; `to_dict()`/`to_json()`
    summarize it without the bytes."""

    data: bytes
    config: str
    quantized: bool
    ops: dict[str, list[str]]  # "domain;opset" -> operator types, as in the config
    path: Path | None = None  # where export_ort wrote the model
    config_path: Path | None = None  # and the config
    model: str = ""  # the ONNX model it came from

    def to_dict(self) -> dict[str, Any]:
        return jsonable(
            {
                "model": self.model,
                "output": str(self.path) if self.path is not None else None,
                "config": str(self.config_path) if self.config_path is not None else None,
                "format": "ort",
                "quantized": self.quantized,
                "optimization": f"{OPTIMIZATION_STYLE.lower()} (level all, target {TARGET_PLATFORM})",
                "size_bytes": len(self.data),
                "ops": self.ops,
            }
        )

    def to_json(self, indent: int | None = 2) -> str:
        return dumps(self.to_dict(), indent=indent)


def config_path_for(output: str | Path) -> Path:
    """`MODEL.required_operators.config` beside `MODEL.ort` (ONNX Runtime's own naming)."""
    return Path(output).with_suffix(".required_operators.config")


def parse_config(text: str) -> dict[str, list[str]]:
    """The operator config's lines `domain;opset;Op1,Op2` as {"domain;opset": [ops]}; comments skipped."""
    ops: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        domain, opset, names = (line.split(";", 2) + ["", ""])[:3]
        ops.setdefault(f"{domain};{opset}", []).extend(n for n in names.split(",") if n)
    return ops


def export_ort(model: str | Path | onnx.ModelProto, output: str | Path) -> OrtExportResult:
    """Convert `model` (float or lowbit's QDQ/dynamic/float16 ONNX) to ORT format; write `output` (`.ort`)
    and `MODEL.required_operators.config` beside it, together and atomically. Never writes over the input."""
    out = Path(output)
    config = config_path_for(out)
    source = model if isinstance(model, onnx.ModelProto) else Path(model)
    check_paths([("-o", out), ("operator config", config)], [("input model", source)])
    if out.suffix.lower() != ".ort":
        raise LowbitError(f"output {out} must end in .ort")
    if not out.parent.is_dir():
        raise LowbitError(f"output folder {out.parent} does not exist; create it first")
    proto = load_proto(model)  # one-line errors for missing, corrupt or non-ONNX input
    quantized = any(
        n.op_type in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear") for n in proto.graph.node
    )

    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        folder = Path(tmp)
        if isinstance(model, onnx.ModelProto) or not _tool_takes(Path(model)):
            # The tool converts files named *.onnx (not *.optimized.onnx); anything else goes in as a copy.
            src = folder / "in" / "model.onnx"
            src.parent.mkdir()
            src.write_bytes(proto.SerializeToString())
        else:
            src = Path(model)
        data, text = _convert(src, folder / "out", model_name(model))
    text = "\n".join(f"# - {out}" if line.startswith("# - ") else line for line in text.splitlines()) + "\n"
    write_together([(config, text.encode()), (out, data)])  # the model last: a .ort on disk has its config
    return OrtExportResult(
        data=data,
        config=text,
        quantized=quantized,
        ops=parse_config(text),
        path=out,
        config_path=config,
        model=model_name(model),
    )


def _tool_takes(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(".onnx") and not name.endswith(".optimized.onnx")


def _convert(src: Path, folder: Path, name: str) -> tuple[bytes, str]:
    """Run ONNX Runtime's converter on `src` into `folder`: the .ort bytes and the config text."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    folder.mkdir()
    tool_log = logging.getLogger("ort_format_model.utils")
    level = tool_log.level
    tool_log.setLevel(logging.WARNING)  # it logs "Created config in <temporary folder>" at INFO
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its progress lines name the temporary folder
            convert_onnx_models_to_ort(
                src,
                output_dir=folder,
                optimization_styles=[OptimizationStyle[OPTIMIZATION_STYLE]],
                target_platform=TARGET_PLATFORM,
            )
    except Exception as e:  # ORT raises its own exception types (Fail, InvalidGraph, NotImplemented, ...)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LowbitError(f"ONNX Runtime cannot convert {name} to ORT format ({first})") from None
    finally:
        tool_log.setLevel(level)
    models = sorted(folder.rglob("*.ort"))
    configs = sorted(folder.glob("*.required_operators.config"))
    if len(models) != 1 or len(configs) != 1:
        found = ", ".join(os.path.relpath(p, folder) for p in folder.rglob("*")) or "nothing"
        raise LowbitError(f"ONNX Runtime's converter wrote {found} for {name}, not one .ort and its config")
    return models[0].read_bytes(), configs[0].read_text()


__all__ = ["export_ort", "OrtExportResult", "config_path_for", "parse_config"]
