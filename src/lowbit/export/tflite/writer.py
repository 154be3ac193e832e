"""A TFLite model as plain data, and its serialization to a flatbuffer ("TFL3", schema version 3).

The schema's generated builders come from the `tflite` package; nothing here depends on TensorFlow.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import flatbuffers
import numpy as np

from ...errors import LowbitError

SCHEMA_VERSION = 3
FILE_IDENTIFIER = b"TFL3"
# The signature TensorFlow's converter writes and ai-edge-quantizer / Android's `runSignature` look up by default.
SIGNATURE_KEY = "serving_default"
# Oldest runtime that reads what we write (per-channel int8 and HARD_SWISH need TFLite 2.x kernels).
MIN_RUNTIME_VERSION = "2.3.0"

# Operators whose kernels register from a later version than 1.
OP_VERSIONS = {"BROADCAST_TO": 2}

TENSOR_TYPES = {  # numpy dtype name -> tflite.TensorType
    "float32": 0,
    "float16": 1,
    "int32": 2,
    "uint8": 3,
    "int64": 4,
    "int16": 7,
    "int8": 9,
    "bool": 6,
}


def _module(name: str) -> Any:
    # `import tflite` star-imports every table, so same-named helpers (Start, End...) shadow each other;
    # the per-table modules keep them apart.
    return importlib.import_module(f"tflite.{name}")


def builtin_code(op: str) -> int:
    return getattr(_module("BuiltinOperator").BuiltinOperator, op)


@dataclass
class QuantParams:
    """TFLite per-tensor (one scale) or per-channel (`axis` set) affine quantization."""

    scale: np.ndarray
    zero_point: np.ndarray
    axis: int = 0


@dataclass
class Tensor:
    name: str
    shape: tuple[int, ...]
    dtype: str
    data: np.ndarray | None = None
    quant: QuantParams | None = None


@dataclass
class Operator:
    op: str  # BuiltinOperator name, e.g. "CONV_2D"
    inputs: list[int]
    outputs: list[int]
    options: str | None = None  # BuiltinOptions name, e.g. "Conv2DOptions"
    fields: dict[str, Any] = field(default_factory=dict)  # snake_case option fields


@dataclass
class FlatModel:
    tensors: list[Tensor] = field(default_factory=list)
    operators: list[Operator] = field(default_factory=list)
    inputs: list[int] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)
    metadata: dict[str, bytes] = field(default_factory=dict)
    description: str = "lowbit"
    # Signature names of `inputs` / `outputs`, in order (the ONNX graph's); empty: the tensors' own names.
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)
    # Further subgraphs (an IF's branches), numbered from 1 in this order; only the main model's list is written.
    subgraphs: list[FlatModel] = field(default_factory=list)

    def add_tensor(self, t: Tensor) -> int:
        self.tensors.append(t)
        return len(self.tensors) - 1

    def add_op(self, op: Operator) -> None:
        self.operators.append(op)


def _camel(snake: str) -> str:
    return "".join(part.capitalize() for part in snake.split("_"))


def _int_vector(b: flatbuffers.Builder, values: Sequence[int], elem: str = "int32") -> int:
    return b.CreateNumpyVector(np.asarray(values, dtype=elem))


def _byte_buffer(b: flatbuffers.Builder, data: bytes) -> int:
    # 16-byte aligned so kernels may read weights in place (XNNPACK and the int8 kernels assume it).
    b.StartVector(1, len(data), 16)
    b.head -= len(data)
    b.Bytes[b.head : b.head + len(data)] = data
    return b.EndVector()


def _quant(b: flatbuffers.Builder, q: QuantParams) -> int:
    m = _module("QuantizationParameters")
    scale = b.CreateNumpyVector(np.asarray(q.scale, np.float32).ravel())
    zp = b.CreateNumpyVector(np.asarray(q.zero_point, np.int64).ravel())
    m.Start(b)
    m.AddScale(b, scale)
    m.AddZeroPoint(b, zp)
    m.AddQuantizedDimension(b, int(q.axis))
    return m.End(b)


def _options(b: flatbuffers.Builder, name: str, fields: dict[str, Any]) -> int:
    m = _module(name)
    vectors = {k: _int_vector(b, v) for k, v in fields.items() if isinstance(v, (list, tuple))}
    m.Start(b)
    for k, v in fields.items():
        getattr(m, "Add" + _camel(k))(b, vectors.get(k, v))
    return m.End(b)


def serialize(model: FlatModel) -> bytes:
    """The model as a .tflite flatbuffer: the main subgraph with its `serving_default` signature, then any
    branch subgraphs; buffer 0 empty by convention."""
    b = flatbuffers.Builder(1024)
    buffers: list[bytes | None] = [None]
    # Constants with the same bytes share one buffer: an unrolled LSTM's weights are used once per time step
    # (the captcha CRNN's float .tflite was 274 MB, its ONNX 19 MB). LiteRT only reads constant buffers.
    seen: dict[bytes, int] = {}
    codes: list[str] = []
    subgraphs = [
        _subgraph(b, fm, buffers, seen, codes, "main" if k == 0 else f"branch_{k}")
        for k, fm in enumerate([model, *model.subgraphs])
    ]

    signature = _signature(b, model)

    oc = _module("OperatorCode")
    code_offsets = []
    for name in codes:
        code = builtin_code(name)
        oc.Start(b)
        oc.AddDeprecatedBuiltinCode(b, min(code, 127))  # readers older than 2.4 look only here
        oc.AddBuiltinCode(b, code)
        oc.AddVersion(b, OP_VERSIONS.get(name, 1))
        code_offsets.append(oc.End(b))

    meta = {"min_runtime_version": MIN_RUNTIME_VERSION.encode().ljust(16, b"\0"), **model.metadata}
    meta_offsets = []
    for name, data in meta.items():
        buffers.append(data)
        s = b.CreateString(name)
        md = _module("Metadata")
        md.Start(b)
        md.AddName(b, s)
        md.AddBuffer(b, len(buffers) - 1)
        meta_offsets.append(md.End(b))

    buffer_offsets = []
    bm = _module("Buffer")
    for content in buffers:
        vec = _byte_buffer(b, content) if content else None
        bm.Start(b)
        if vec is not None:
            bm.AddData(b, vec)
        buffer_offsets.append(bm.End(b))

    mm = _module("Model")
    codes_vec = _table_vector(b, mm.StartOperatorCodesVector, code_offsets)
    sgs_vec = _table_vector(b, mm.StartSubgraphsVector, subgraphs)
    bufs_vec = _table_vector(b, mm.StartBuffersVector, buffer_offsets)
    meta_vec = _table_vector(b, mm.StartMetadataVector, meta_offsets)
    sigs_vec = _table_vector(b, mm.StartSignatureDefsVector, [signature])
    desc = b.CreateString(model.description)
    mm.Start(b)
    mm.AddVersion(b, SCHEMA_VERSION)
    mm.AddOperatorCodes(b, codes_vec)
    mm.AddSubgraphs(b, sgs_vec)
    mm.AddDescription(b, desc)
    mm.AddBuffers(b, bufs_vec)
    mm.AddMetadata(b, meta_vec)
    mm.AddSignatureDefs(b, sigs_vec)
    b.Finish(mm.End(b), file_identifier=FILE_IDENTIFIER)
    return bytes(b.Output())


def _subgraph(
    b: flatbuffers.Builder, model: FlatModel, buffers: list, seen: dict[bytes, int], codes: list[str], name: str
) -> int:
    tensor_offsets = []
    for t in model.tensors:
        buf_index = 0
        if t.data is not None:
            blob = np.ascontiguousarray(t.data).tobytes()
            if blob not in seen:
                buffers.append(blob)
                seen[blob] = len(buffers) - 1
            buf_index = seen[blob]
        tname = b.CreateString(t.name)
        shape = _int_vector(b, list(t.shape))
        quant = _quant(b, t.quant) if t.quant is not None else None
        m = _module("Tensor")
        m.Start(b)
        m.AddShape(b, shape)
        m.AddType(b, TENSOR_TYPES[t.dtype])
        m.AddBuffer(b, buf_index)
        m.AddName(b, tname)
        if quant is not None:
            m.AddQuantization(b, quant)
        tensor_offsets.append(m.End(b))

    op_offsets = []
    options_enum = _module("BuiltinOptions").BuiltinOptions
    for op in model.operators:
        if op.op not in codes:
            codes.append(op.op)
        inputs = _int_vector(b, op.inputs)
        outputs = _int_vector(b, op.outputs)
        opts = _options(b, op.options, op.fields) if op.options else None
        m = _module("Operator")
        m.Start(b)
        m.AddOpcodeIndex(b, codes.index(op.op))
        m.AddInputs(b, inputs)
        m.AddOutputs(b, outputs)
        if op.options:  # opts was built
            m.AddBuiltinOptionsType(b, getattr(options_enum, op.options))
            m.AddBuiltinOptions(b, opts)
        op_offsets.append(m.End(b))

    sg = _module("SubGraph")
    tensors_vec = _table_vector(b, sg.StartTensorsVector, tensor_offsets)
    ops_vec = _table_vector(b, sg.StartOperatorsVector, op_offsets)
    in_vec = _int_vector(b, model.inputs)
    out_vec = _int_vector(b, model.outputs)
    sg_name = b.CreateString(name)
    sg.Start(b)
    sg.AddTensors(b, tensors_vec)
    sg.AddOperators(b, ops_vec)
    sg.AddInputs(b, in_vec)
    sg.AddOutputs(b, out_vec)
    sg.AddName(b, sg_name)
    return sg.End(b)


def _signature(b: flatbuffers.Builder, model: FlatModel) -> int:
    """SignatureDef `serving_default` of subgraph 0: each input / output name mapped to its tensor index."""
    sd, tm = _module("SignatureDef"), _module("TensorMap")

    def tensor_maps(indices: list[int], names: list[str], what: str) -> list[int]:
        names = names or [model.tensors[i].name for i in indices]
        if len(names) != len(indices) or len(set(names)) != len(names):
            raise LowbitError(f"internal: signature {what} names {names} do not name tensors {indices} one to one")
        offsets = []
        for name, index in zip(names, indices):
            s = b.CreateString(name)
            tm.Start(b)
            tm.AddName(b, s)
            tm.AddTensorIndex(b, index)
            offsets.append(tm.End(b))
        return offsets

    inputs = _table_vector(b, sd.StartInputsVector, tensor_maps(model.inputs, model.input_names, "input"))
    outputs = _table_vector(b, sd.StartOutputsVector, tensor_maps(model.outputs, model.output_names, "output"))
    key = b.CreateString(SIGNATURE_KEY)
    sd.Start(b)
    sd.AddInputs(b, inputs)
    sd.AddOutputs(b, outputs)
    sd.AddSignatureKey(b, key)
    sd.AddSubgraphIndex(b, 0)
    return sd.End(b)


def _table_vector(b: flatbuffers.Builder, start: Any, offsets: list[int]) -> int:
    start(b, len(offsets))
    for off in reversed(offsets):
        b.PrependUOffsetTRelative(off)
    return b.EndVector()


def read_metadata(data: bytes) -> dict[str, bytes]:
    """Metadata entries of a .tflite file, read back through the schema (used by tests and `lowbit eval`)."""
    model = _module("Model").Model.GetRootAs(data, 0)
    out = {}
    for i in range(model.MetadataLength()):
        md = model.Metadata(i)
        buf = model.Buffers(md.Buffer())
        out[md.Name().decode()] = buf.DataAsNumpy().tobytes() if buf.DataLength() else b""
    return out
