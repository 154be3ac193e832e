"""Read an ONNX graph (float or QDQ) into compute nodes plus quantization annotations.

QDQ form says "X is quantized with (s, z)" as X -> QuantizeLinear -> DequantizeLinear -> consumers. TFLite says
it with one int8 tensor carrying (s, z). So the Q/DQ pairs disappear here: the DQ output becomes another name for
X, X gets the parameters, and constant weights behind a DQ keep their integers. uint8 activations become int8
with the zero point shifted by -128: q - z is unchanged, so the real values are exactly the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from ...errors import LowbitError
from .writer import QuantParams


@dataclass
class QTensor:
    """Integer data (TFLite dtype) with its parameters; axis is the ONNX axis for per-channel."""

    data: np.ndarray
    quant: QuantParams

    def real(self) -> np.ndarray:
        shape = [1] * self.data.ndim
        if self.quant.scale.size > 1:
            shape[self.quant.axis] = -1
        s = self.quant.scale.reshape(shape)
        z = self.quant.zero_point.reshape(shape)
        # np.asarray: on 0-d data numpy arithmetic returns a numpy scalar, which ONNX Runtime refuses as a feed
        return np.asarray((self.data.astype(np.float64) - z) * s, np.float32)


@dataclass
class Graph:
    nodes: list[onnx.NodeProto]
    consts: dict[str, np.ndarray] = field(default_factory=dict)  # float (or int) constants by name
    qconsts: dict[str, QTensor] = field(default_factory=dict)  # quantized constants (weights, biases)
    quant: dict[str, QuantParams] = field(default_factory=dict)  # activation name -> TFLite int8 params
    alias: dict[str, str] = field(default_factory=dict)
    fp16: bool = False  # the model stored float16 constants (lowbit's float16 mode)
    # nodes of int8 tensors written in float on purpose (DEQUANTIZE -> float -> QUANTIZE): what the QDQ model
    # computes in ONNX Runtime, with one rounding; not float fallbacks (hard.py)
    float_islands: set[str] = field(default_factory=set)
    # an If's outer values, as its branches name them, in the order `branches.expose_reads` appended them to its
    # inputs (so every pass sees those uses, and renames them)
    reads: dict[str, list[str]] = field(default_factory=dict)
    # values (activations, constants) the ONNX model holds as uint8 (here int8, zero point - 128): a table built in
    # ONNX Runtime (table.py) runs them as uint8 again, ORT's u8 kernels being what the model runs
    uint8: set[str] = field(default_factory=set)

    def name(self, n: str) -> str:
        while n in self.alias:
            n = self.alias[n]
        return n


def _params(node: onnx.NodeProto, consts: dict[str, np.ndarray], what: str) -> tuple[np.ndarray, np.ndarray, str]:
    scale = consts.get(node.input[1])
    if scale is None:
        raise LowbitError(
            f"{node.op_type} {node.name or node.output[0]}: {what} scale is not a constant; "
            "TFLite needs fixed quantization parameters"
        )
    zp = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    dtype = str(zp.dtype) if zp is not None else "uint8"
    zp = np.zeros_like(scale, np.int64) if zp is None else zp.astype(np.int64)
    return np.asarray(scale, np.float32).ravel(), np.asarray(zp).ravel(), dtype


def _activation_params(node: onnx.NodeProto, consts: dict[str, np.ndarray]) -> QuantParams:
    scale, zp, dtype = _params(node, consts, "activation")
    if scale.size != 1:
        raise LowbitError(
            f"{node.op_type} {node.name}: per-channel activation quantization has no TFLite form; "
            "quantize activations per tensor"
        )
    if dtype == "uint8":
        zp = zp - 128
    elif dtype != "int8":
        raise LowbitError(
            f"{node.op_type} {node.name}: {dtype} activations are not exported to TFLite yet; "
            "quantize with --activations uint8 or int8"
        )
    return QuantParams(scale, zp)


def _weight(node: onnx.NodeProto, consts: dict[str, np.ndarray]) -> QTensor:
    q = consts[node.input[0]]
    scale, zp, _ = _params(node, consts, "weight")
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1) if scale.size > 1 else 0
    if axis < 0:
        axis += q.ndim
    if q.dtype.name in ("int4", "uint4"):  # 4-bit weights (ml_dtypes arrays): TFLite gets them in 8-bit tensors
        q = q.astype(np.int8 if q.dtype.name == "int4" else np.uint8)
    if q.dtype == np.uint8:  # shift to int8 as for activations: same real values
        q = (q.astype(np.int16) - 128).astype(np.int8)
        zp = zp - 128
    elif q.dtype not in (np.int8, np.int32):
        raise LowbitError(f"DequantizeLinear {node.name}: {q.dtype} constants are not exported to TFLite yet")
    return QTensor(q, QuantParams(scale, zp, axis))


FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)


def read_graph(proto: onnx.ModelProto, dtypes: dict[str, int] | None = None) -> Graph:
    """dtypes: ONNX element type of each value, where known (tells float16 <-> float32 Casts apart)."""
    consts = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    fp16 = any(v.dtype == np.float16 for v in consts.values())
    # float16 constants are read as float32; the export decides how to store them (--precision)
    consts = {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in consts.items()}
    g = Graph(nodes=[], consts=consts, fp16=fp16)
    dtypes = dtypes or {}
    quantize_of: dict[str, tuple[str, QuantParams]] = {}
    for node in proto.graph.node:
        if node.op_type == "Constant":
            continue
        if node.op_type == "QuantizeLinear":
            quantize_of[node.output[0]] = (g.name(node.input[0]), _activation_params(node, consts))
            if len(node.input) < 3 or not node.input[2] or consts[node.input[2]].dtype == np.uint8:
                g.uint8.add(g.name(node.input[0]))
        elif node.op_type == "DequantizeLinear" and node.input[0] in consts:
            qt = _weight(node, consts)
            g.qconsts[node.output[0]] = qt
            if consts[node.input[0]].dtype == np.uint8:
                g.uint8.add(node.output[0])
            g.consts[node.output[0]] = qt.real()
        elif node.op_type == "DequantizeLinear" and node.input[0] not in quantize_of:
            g.nodes.append(_renamed(node, g))  # integers computed at run time (int8 embedding rows): CAST, scale
        elif node.op_type == "DequantizeLinear":
            source, qp = quantize_of[node.input[0]]
            if source not in g.quant and source not in consts:
                g.quant[source] = qp
                g.alias[node.output[0]] = source
            elif source in g.quant and _same(g.quant[source], qp):
                g.alias[node.output[0]] = source
            else:  # a second quantization of the same tensor: TFLite rescales int8 -> int8
                g.quant[node.output[0]] = qp
                g.nodes.append(onnx.helper.make_node("Identity", [source], [node.output[0]], name=node.name))
        elif (
            node.op_type == "Cast"
            and node.input[0] not in consts
            and dtypes.get(node.input[0]) in FLOATS
            and next(a.i for a in node.attribute if a.name == "to") in FLOATS
        ):
            g.alias[node.output[0]] = g.name(node.input[0])  # float16 <-> float32: TFLite computes in float32
        else:
            node = _renamed(node, g)
            g.nodes.append(node)
    return g


def _same(a: QuantParams, b: QuantParams) -> bool:
    return bool(np.array_equal(a.scale, b.scale) and np.array_equal(a.zero_point, b.zero_point))


def _renamed(node: onnx.NodeProto, g: Graph) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    del copy.input[:]
    copy.input.extend(g.name(i) if i else i for i in node.input)
    return copy


def fold_dynamic(g: Graph) -> bool:
    """lowbit's dynamic form, x -> DynamicQuantizeLinear -> MatMulInteger(int8 W) -> Cast -> Mul(x_scale * w_scale),
    back to one MatMul whose weight keeps its integers: TFLite's hybrid kernel quantizes x itself at run time."""
    producer = {o: n for n in g.nodes for o in n.output}
    users: dict[str, list[onnx.NodeProto]] = {}
    for n in g.nodes:
        for i in n.input:
            users.setdefault(i, []).append(n)

    def only_user(name: str, op: str) -> onnx.NodeProto | None:
        u = users.get(name, [])
        return u[0] if len(u) == 1 and u[0].op_type == op else None

    drop, replace = set(), {}
    for mmi in g.nodes:
        if mmi.op_type != "MatMulInteger" or mmi.input[1] not in g.consts or g.consts[mmi.input[1]].dtype != np.int8:
            continue
        dql = producer.get(mmi.input[0])
        cast = only_user(mmi.output[0], "Cast")
        mul = only_user(cast.output[0], "Mul") if cast is not None else None
        if dql is None or dql.op_type != "DynamicQuantizeLinear" or cast is None or mul is None:
            continue
        scale = producer.get(mul.input[1] if mul.input[0] == cast.output[0] else mul.input[0])
        if scale is None or scale.op_type != "Mul":
            continue
        w_scale = scale.input[1] if scale.input[0] == dql.output[1] else scale.input[0]
        if dql.output[1] not in scale.input or w_scale not in g.consts:
            continue
        q = g.consts[mmi.input[1]]
        s = np.asarray(g.consts[w_scale], np.float32).ravel()
        zp = g.consts[mmi.input[3]] if len(mmi.input) > 3 and mmi.input[3] else np.zeros(s.size)
        weight = f"{mmi.name or mmi.output[0]}_weight"
        g.qconsts[weight] = QTensor(q, QuantParams(s, np.asarray(zp, np.int64).ravel(), 1 if s.size > 1 else 0))
        g.consts[weight] = g.qconsts[weight].real()
        name = (mmi.name or mul.output[0]).removesuffix("_MatMulInteger")
        replace[id(mul)] = onnx.helper.make_node("MatMul", [dql.input[0], weight], [mul.output[0]], name=name)
        drop |= {id(mmi), id(cast), id(scale)}
    if not replace:
        return False
    g.nodes = [replace.get(id(n), n) for n in g.nodes if id(n) not in drop]
    read = {i for n in g.nodes for i in n.input}
    g.nodes = [n for n in g.nodes if n.op_type != "DynamicQuantizeLinear" or any(o in read for o in n.output)]
    return True
