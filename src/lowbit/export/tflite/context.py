"""Conversion state: which TFLite tensors stand for each ONNX value, in which layout and number type.

Every ONNX value may have up to four TFLite representations: float or int8 ("f"/"q"), in ONNX's own dimension
order or NHWC. A value is produced once, in the representation its producer computes; a consumer that needs
another one gets it through QUANTIZE / DEQUANTIZE / TRANSPOSE, made once and cached. 4-D activations live in
NHWC from the graph input on, so convolutional graphs need no TRANSPOSE inside.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from ...errors import LowbitError
from .qdq import Graph
from .writer import FlatModel, Operator, QuantParams, Tensor

TO_NHWC = (0, 2, 3, 1)
TO_NCHW = (0, 3, 1, 2)
FP16_MAX = 65504.0
# ONNX element type -> TFLite tensor type of a float-kind value (float16 values are computed in float32)
DTYPES: dict[int, str] = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float32",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.BOOL: "bool",
    onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.UINT8: "uint8",
}


def nhwc_axis(axis: int, rank: int) -> int:
    """Where an NCHW axis lands in NHWC."""
    axis = axis + rank if axis < 0 else axis
    return TO_NHWC.index(axis) if rank == 4 else axis


# Off: float readers take the unrounded float (the exporter before this rule; tests compare the two).
RAW_FLOAT_ROUNDED = True


class Context:
    def __init__(
        self,
        graph: Graph,
        shapes: dict[str, tuple[int, ...]],
        precision: str = "float32",
        dtypes: dict[str, int] | None = None,
    ) -> None:
        self.g = graph
        self.shapes = shapes
        self.dtypes = dtypes or {}  # ONNX element types: tells int64 indices and bool masks from float values
        self.precision = precision  # float32, float16 (fp16 constants), dynamic (int8 weights), int8 (QDQ)
        self.fm = FlatModel()
        self.reps: dict[str, dict[tuple[str, bool], int]] = {}
        # quantized values an operator wrote in float: their float readers get DEQUANTIZE(QUANTIZE(value)), as the
        # ONNX model's Q/DQ pair gives them, not the unrounded float (see get)
        self.raw_float: set[str] = set()
        self.nhwc: dict[str, bool] = {}
        self.float_nodes: list[str] = []  # nodes that run in float inside a quantized graph
        self.transposes: list[str] = []  # values transposed inside the graph (should stay empty for CNNs)
        self.as_onnx: list[str] = []  # 4-D inputs/outputs declared as the ONNX model has them (channels-last there)
        self.fallbacks: list[str] = []  # quantized in ONNX, float in TFLite (the user allowed it)
        self.quantized = False  # the model has Q/DQ pairs
        self.allow_fallback = False
        self.opsets: dict[str, int] = {}  # the ONNX model's, for an If branch made a model of its own
        self.ir_version = 8

    # -- values -------------------------------------------------------------------------------------
    def shape(self, name: str, nhwc: bool | None = None) -> tuple[int, ...]:
        shape = self.shapes[name]
        nhwc = self.nhwc.get(name, False) if nhwc is None else nhwc
        return tuple(shape[i] for i in TO_NHWC) if nhwc and len(shape) == 4 else tuple(shape)

    def quant(self, name: str) -> QuantParams | None:
        return self.g.quant.get(name)

    def produce(self, name: str, kind: str, nhwc: bool) -> int:
        """The TFLite tensor an operator writes `name` into."""
        self.nhwc[name] = nhwc and len(self.shapes[name]) == 4
        nhwc = self.nhwc[name]
        idx = self.fm.add_tensor(self._tensor(name, kind, self.shape(name, nhwc)))
        self.reps.setdefault(name, {})[(kind, nhwc)] = idx
        if kind == "f" and self.quant(name) is not None and RAW_FLOAT_ROUNDED:
            self.raw_float.add(name)
        return idx

    def alias(self, name: str, kind: str, nhwc: bool, idx: int) -> None:
        """`name` is tensor `idx` already, in layout `nhwc`: a Transpose between the two layouts is a change of view
        (NHWC of Transpose(x, 0,3,1,2) is x as it is), so no operator is written."""
        self.nhwc[name] = nhwc
        self.reps.setdefault(name, {})[(kind, nhwc)] = idx
        if kind == "f" and self.quant(name) is not None and RAW_FLOAT_ROUNDED:
            self.raw_float.add(name)

    def _tensor(self, name: str, kind: str, shape: tuple[int, ...], label: str | None = None) -> Tensor:
        if kind == "q":
            qp = self.quant(name)
            if qp is None:
                raise LowbitError(f"internal: {name} has no quantization parameters")
            return Tensor(label or name, shape, "int8", quant=qp)
        dtype = DTYPES.get(self.dtypes.get(name, onnx.TensorProto.FLOAT))
        if dtype is None:
            raise LowbitError(f"value {name}: ONNX element type {self.dtypes[name]} has no TFLite tensor type")
        return Tensor(label or name, shape, dtype)

    def get(self, name: str, kind: str, nhwc: bool | None = None) -> int:
        """`name` as a float ("f") or int8 ("q") tensor; nhwc None means in whatever layout it has."""
        if name in self.g.consts:
            raise LowbitError(f"internal: constant {name} must be placed by its consumer")
        if name not in self.reps:
            raise LowbitError(f"internal: {name} used before it was produced")
        have = self.nhwc[name]
        want = have if nhwc is None or len(self.shapes[name]) != 4 else nhwc
        reps = self.reps[name]
        if kind == "f" and name in self.raw_float:
            # A float reader of a value the ONNX model quantizes (softmax probabilities, a LayerNorm output read by a
            # float residual Add) sees it rounded, as ONNX Runtime does after QuantizeLinear/DequantizeLinear.
            if ("dq", want) not in reps:
                dst = self.fm.add_tensor(self._tensor(name, "f", self.shape(name, want), f"{name}_dq"))
                self.op("DEQUANTIZE", [self.get(name, "q", want)], [dst])
                reps[("dq", want)] = dst
            return reps[("dq", want)]
        if (kind, want) in reps:
            return reps[(kind, want)]
        if (kind, have) not in reps:
            other = "f" if kind == "q" else "q"
            src = reps[(other, have)]
            dst = self.fm.add_tensor(self._tensor(name, kind, self.shape(name, have), f"{name}_{kind}"))
            self.op("QUANTIZE" if kind == "q" else "DEQUANTIZE", [src], [dst])
            reps[(kind, have)] = dst
        if want == have:
            return reps[(kind, have)]
        perm = TO_NHWC if want else TO_NCHW
        dst = self.fm.add_tensor(
            self._tensor(name, kind, self.shape(name, want), f"{name}_{'nhwc' if want else 'nchw'}")
        )
        self.op("TRANSPOSE", [reps[(kind, have)], self.const_int(perm, f"{name}_perm")], [dst])
        self.transposes.append(name)
        reps[(kind, want)] = dst
        return dst

    # -- constants ----------------------------------------------------------------------------------
    def const(self, name: str, data: np.ndarray, quant: QuantParams | None = None) -> int:
        data = np.ascontiguousarray(data).reshape(np.shape(data))  # ascontiguousarray makes 0-d arrays 1-d
        dtype = str(data.dtype)
        if dtype == "float64":
            data, dtype = data.astype(np.float32), "float32"
        if dtype == "float32" and self.precision == "float16" and np.all(np.abs(data) <= FP16_MAX):
            # TFLite's float16 form: the constant stored fp16, DEQUANTIZE'd to float32 once when the model loads
            half = self.fm.add_tensor(
                Tensor(f"{name}_fp16", tuple(data.shape), "float16", data=data.astype(np.float16))
            )
            out = self.fm.add_tensor(Tensor(name, tuple(data.shape), "float32"))
            self.op("DEQUANTIZE", [half], [out])
            return out
        return self.fm.add_tensor(Tensor(name, tuple(data.shape), dtype, data=data, quant=quant))

    def const_int(self, values: Any, name: str) -> int:
        return self.const(name, np.asarray(values, np.int32))

    # -- operators ----------------------------------------------------------------------------------
    def op(self, op: str, inputs: list[int], outputs: list[int], options: str | None = None, **fields: Any) -> None:
        self.fm.add_op(Operator(op, inputs, outputs, options, fields))
