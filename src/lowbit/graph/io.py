"""Model files in and out: one loader with clear errors for bad files, atomic writes, never over the input.

Every user-supplied model is read by `load_proto` (or `load_model`, its onnx-ir form). Raw protobuf is kept on
purpose where it is only read or handed on, never edited: sessions get serialized bytes (runtimes/ort.py), the
lint, the report's layer pairing and the integer emulator walk `graph.node` (evaluate/lint.py, evaluate/
report_data.py, runtimes/emulate.py), the TFLite converter reads protobuf nodes (export/tflite), and
`data.input_specs` reads only the graph inputs (no checker, no external weights). Passes and the quantizer
edit onnx-ir models from `load_model`. ORT's own optimized-graph dump (lint) is not user input and is read
with plain onnx.load. Walks over raw protobuf that need producers and readers share `graph.index.GraphIndex`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from ..errors import LowbitError
from .write import Payload, write_together


def load_proto(
    model: str | os.PathLike | onnx.ModelProto, *, check: bool = True, external_data: bool = True
) -> onnx.ModelProto:
    """The one reader of user-supplied models: a path or a ModelProto in, a checked ModelProto out.

    Every problem is a one-line LowbitError: a wrong argument type, missing file, corrupt or truncated file, no
    graph nodes, external data onnx refuses (outside the model's folder, absolute, missing, a symlink), ONNX
    checker failure. `check=False` skips the checker (it reads every weight) for callers that only look at the
    graph's inputs; `external_data=False` leaves external weights unread.
    """
    if isinstance(model, onnx.ModelProto):
        if not model.graph.node:
            raise LowbitError("the in-memory model holds no graph nodes; pass a complete ONNX model")
        if check:
            _check(model, "the in-memory model")
        return model
    if not isinstance(model, (str, os.PathLike)):
        raise LowbitError(f"model must be a path to an .onnx file or an onnx.ModelProto, got {type(model).__name__}")
    p = Path(model)
    if not p.is_file():
        raise LowbitError(f"model not found: {p}; check the path")
    refuse_ort_format(p)
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as e:
        raise LowbitError(
            f"{p} is not a readable ONNX model (corrupt, truncated or not a valid ONNX model file): {_first_line(e)}"
        ) from None
    if not proto.graph.node:
        raise LowbitError(f"{p} holds no graph nodes (corrupt, truncated or not an ONNX model)")
    external = _has_external_data(proto)
    if external:
        # Before the checker: its messages about external files read like corruption, and they name no fix.
        _check_external_locations(proto, p)
    if check:
        # By path, so models with external data (> 2 GB) are checked too.
        _check(str(p), str(p))
    if external and external_data:
        try:
            onnx.load_external_data_for_model(proto, str(p.parent))
        except (OSError, ValueError, RuntimeError) as e:
            raise LowbitError(
                f"{p} keeps its weights in external data files that cannot be read ({_first_line(e)}); "
                "keep them beside the model"
            ) from None
    return proto


def load_model(model: str | os.PathLike | onnx.ModelProto) -> ir.Model:
    """`load_proto` as an onnx-ir model (what lowbit's passes edit); external weights stay lazy, on disk.

    An in-memory ModelProto is copied first: onnx-ir shares tensor buffers with the proto it reads, and the
    caller's model must not change."""
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(load_proto(model))
        refuse_non_tensor_io(copy.graph, "the in-memory model")
        return _from_proto(copy, "the in-memory model")
    proto = load_proto(model, external_data=False)  # the path-based checker also finds missing external files
    refuse_non_tensor_io(proto.graph, str(model))
    if not _has_external_data(proto):
        return _from_proto(proto, str(model))
    return ir.load(str(model))


def _from_proto(proto: onnx.ModelProto, name: str) -> ir.Model:
    try:
        return ir.from_proto(proto)
    except Exception as e:  # onnx-ir's SerdeError chain: the innermost cause names what it could not read
        while e.__cause__ is not None and isinstance(e.__cause__, Exception):
            e = e.__cause__
        raise LowbitError(f"{name} holds a graph lowbit cannot read: {_first_line(e)}") from None


def refuse_non_tensor_io(graph: onnx.GraphProto, name: str) -> None:
    """A graph input or output that is a sequence or a map, not a tensor, in one line with the fix.

    Converted scikit-learn classifiers end in a ZipMap (a sequence of maps); onnx-ir cannot hold that type, and
    there is no tensor for lowbit to calibrate, compare or quantize there. Checked before anything else reads
    the graph, so the user gets this sentence rather than a deserializer's traceback."""
    for kind, values in (("input", graph.input), ("output", graph.output)):
        for v in values:
            which = v.type.WhichOneof("value")
            if which not in (None, "tensor_type"):
                what = which.removesuffix("_type")
                hint = (
                    "; a converted scikit-learn classifier: convert it without ZipMap "
                    "(skl2onnx options={'zipmap': False})"
                    if any(n.op_type == "ZipMap" for n in graph.node)
                    else ""
                )
                raise LowbitError(
                    f"{name}: graph {kind} '{v.name}' is a {what}, not a tensor; lowbit quantizes graphs whose "
                    f"inputs and outputs are tensors: re-export it so they are{hint}"
                )


def external_files(model: object) -> list[Path]:
    """The external data files a model file refers to (none for an in-memory model or one that cannot be read:
    the loader says what is wrong with it)."""
    if not isinstance(model, (str, os.PathLike)) or not Path(model).is_file():
        return []
    try:
        proto = onnx.load(str(model), load_external_data=False)
    except Exception:  # any unreadable file: load_proto reports it with its own message
        return []
    found: dict[str, None] = {}
    for t in proto.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            found.update({e.value: None for e in t.external_data if e.key == "location"})
    return [Path(model).parent / loc for loc in found]


def refuse_ort_format(path: str | os.PathLike) -> None:
    """One line for a `.ort` file where an ONNX graph is read: ORT format is a flatbuffer ONNX Runtime loads,
    not ONNX protobuf (quantize, diagnose, report, lint, export need the ONNX model)."""
    if Path(path).suffix.lower() == ".ort":
        raise LowbitError(
            f"{path} is an ORT-format model; this needs the ONNX model it was exported from "
            "(.ort files run only in lowbit eval and bench)"
        )


def check_writable(output: str | os.PathLike) -> None:
    """Refuse, before any long work, an output path that is a folder or lies in a folder we cannot write.

    Probes with a real temporary file rather than os.access: that also catches read-only file systems, ACLs and
    root on a read-only mount, which permission bits do not show."""
    out = Path(output)
    if out.is_dir():
        raise LowbitError(f"output {out} is a folder; name a file inside it, e.g. -o {out / 'model.int8.onnx'}")
    folder = out.parent
    if not folder.is_dir():
        raise LowbitError(f"output folder {folder} does not exist or is not a folder; create it first")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".probe", dir=folder)
    except OSError as e:
        raise LowbitError(
            f"cannot write to output folder {folder} ({e.strerror or type(e).__name__}); "
            "choose a writable folder with -o or fix its permissions"
        ) from None
    os.close(fd)
    Path(probe).unlink(missing_ok=True)


def _check_external_locations(proto: onnx.ModelProto, p: Path) -> None:
    """The external-data rules onnx enforces, each as a message naming the fix."""
    folder = p.parent.resolve()
    for t in proto.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in t.external_data if e.key == "location"), "")
        where = f"{p}: weight '{t.name}' is stored in external file '{location}'"
        if not location:
            raise LowbitError(f"{p}: weight '{t.name}' has external data without a location; re-save the model")
        if os.path.isabs(location):
            raise LowbitError(
                f"{where}, an absolute path, which onnx refuses; move the file beside the model and re-save it "
                "with a relative location (onnx.save(..., location='weights.bin'))"
            )
        target = p.parent / location
        if not target.resolve().is_relative_to(folder):
            raise LowbitError(
                f"{where}, outside the model's folder, which onnx refuses; move it into {p.parent} and re-save "
                "the model with a relative location"
            )
        if target.is_symlink():
            raise LowbitError(f"{where}, a symbolic link, which onnx refuses; replace the link by the file itself")
        if not target.is_file():
            raise LowbitError(
                f"{where}, which is missing or not a regular file; keep the model's external data files beside it"
            )


def model_name(model: object) -> str:
    """How messages and results name a model argument."""
    if isinstance(model, (str, os.PathLike)):
        return str(model)
    if isinstance(model, onnx.ModelProto):
        return "<in-memory model>"
    return f"the {type(model).__name__} passed in"


def _check(model: str | onnx.ModelProto, name: str) -> None:
    from .external import FILE_BYTES, has_external, write_external

    try:
        if isinstance(model, onnx.ModelProto) and not has_external(model) and model.ByteSize() >= FILE_BYTES:
            # The in-memory checker serializes the model (a second copy; refused past 2 GB): check a file instead.
            with tempfile.TemporaryDirectory(prefix="lowbit-check-") as folder:
                onnx.checker.check_model(str(write_external(model, Path(folder) / "model.onnx")))
        else:
            onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, onnx.onnx_cpp2py_export.checker.ValidationError) as e:
        raise LowbitError(f"{name} fails the ONNX checker (corrupt or truncated?): {_first_line(e)}") from None


def _has_external_data(proto: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def save_model(model: ir.Model | onnx.ModelProto, path: str | Path, external: bool = False) -> Path:
    """Serialize and write atomically; as `path` + `path.data` (written together) when `external` or when the
    model is too large to serialize (`graph.external`)."""
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    write_together(model_files(proto, Path(path), external))
    return Path(path)


def model_files(
    proto: onnx.ModelProto, path: Path, external: bool = False, on_model: Callable[[bytes], None] | None = None
) -> list[tuple[Path, Payload]]:
    """The files that hold `proto` at `path`, for `write_together`: the model alone, or (when `external` or the
    model is too large to serialize) its data file first and the model last. `on_model(model_bytes)` is called
    with the `.onnx` bytes before they are written (a plan records their hash)."""
    from .external import data_path, external_form, use_external

    if not use_external(proto, external):
        data = model_bytes(proto)
        if on_model is not None:
            on_model(data)
        return [(path, data)]
    skeleton: list[bytes] = []

    def write_data(f: BinaryIO) -> None:
        skeleton.append(external_form(proto, f, data_path(path).name).SerializeToString())
        if on_model is not None:
            on_model(skeleton[0])

    def write_model(f: BinaryIO) -> None:
        f.write(skeleton[0])

    return [(data_path(path), write_data), (path, write_model)]


def model_bytes(model: ir.Model | onnx.ModelProto) -> bytes:
    """The bytes `save_model` writes for a model held whole in one file."""
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    return proto.SerializeToString()


def model_size(path: str | Path) -> int:
    return Path(path).stat().st_size
