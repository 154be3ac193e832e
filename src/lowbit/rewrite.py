"""Apply a plan to a prepared float graph: QuantizeLinear/DequantizeLinear pairs (QDQ form)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .numerics import pack_int4, qtype, quantize
from .plan import TensorParams

MS_DOMAIN = "com.microsoft"


def _init(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    v = ir.Value(name=name, const_value=ir.tensor(array, name=name), shape=ir.Shape(array.shape))
    v.dtype = ir.DataType.from_numpy(array.dtype)
    graph.register_initializer(v)
    return v


def _domain(model: ir.Model, dtype: str) -> str:
    """16-bit QDQ needs opset 21; older models use ONNX Runtime's com.microsoft operators instead."""
    if dtype in ("int16", "uint16") and model.opset_imports.get("", 1) < 21:
        model.opset_imports.setdefault(MS_DOMAIN, 1)
        return MS_DOMAIN
    return ""


def _qdq_params(graph: ir.Graph, name: str, p: TensorParams) -> tuple[ir.Value, ir.Value]:
    scale, zp = p.arrays()
    t = qtype(p.dtype)
    return _init(graph, f"{name}_s", scale.astype(np.float32)), _init(graph, f"{name}_zp", zp.astype(t.np_dtype))


def _dq_node(model: ir.Model, name: str, q: ir.Value, p: TensorParams) -> ir.Node:
    s, z = _qdq_params(model.graph, name, p)
    inputs = [q, s, z]
    if p.kind == "bias" and not np.any(p.zero_point):
        # Zero points default to 0; int32 biases save 4 bytes per channel (weights keep theirs: ORT's QGemm fusion needs them).
        model.graph.initializers.pop(z.name)
        inputs = [q, s]
    attrs = {"axis": ir.AttrInt64("axis", p.axis)} if p.axis is not None else {}
    return ir.Node(_domain(model, p.dtype), "DequantizeLinear", inputs, attrs, name=f"{name}_DQ")


def constant_dq(model: ir.Model, name: str, array: np.ndarray | None, q: np.ndarray, p: TensorParams) -> ir.Value:
    """A quantized initializer and the DequantizeLinear that feeds the float op."""
    t = qtype(p.dtype)
    stored = _init(model.graph, f"{name}_q", q.astype(t.np_dtype))
    if p.dtype in ("int4", "uint4"):
        stored.const_value = ir.PackedTensor(pack_int4(q), ir.DataType.INT4 if p.dtype == "int4" else ir.DataType.UINT4, shape=ir.Shape(q.shape))
        stored.dtype = stored.const_value.dtype
    node = _dq_node(model, name, stored, p)
    node.outputs[0].name = f"{name}_dq"
    node.outputs[0].dtype = ir.DataType.FLOAT
    node.outputs[0].shape = ir.Shape(q.shape)
    model.graph.append(node)
    return node.outputs[0]


def insert_qdq(model: ir.Model, value: ir.Value, p: TensorParams) -> None:
    """value -> Q -> DQ, and every consumer (and graph output) reads the DQ result."""
    graph = model.graph
    name = value.name
    uses = list(value.uses())
    s, z = _qdq_params(graph, name, p)
    dom = _domain(model, p.dtype)
    qn = ir.Node(dom, "QuantizeLinear", [value, s, z], name=f"{name}_Q")
    qn.outputs[0].name = f"{name}_q"
    qn.outputs[0].dtype = ir.DataType.from_numpy(np.dtype(qtype(p.dtype).np_dtype))
    qn.outputs[0].shape = value.shape
    dn = ir.Node(dom, "DequantizeLinear", [qn.outputs[0], s, z], name=f"{name}_DQ")
    out = dn.outputs[0]
    out.dtype, out.shape = ir.DataType.FLOAT, value.shape
    for use in uses:
        use.node.replace_input_with(use.idx, out)
    if value.is_graph_output():
        # The graph keeps its output names; the float tensor inside gets a new one.
        for i, o in enumerate(graph.outputs):
            if o is value:
                graph.outputs[i] = out
        value.name = f"{name}_float"
        out.name = name
    else:
        out.name = f"{name}_dq"
    graph.append(qn)
    graph.append(dn)


def quantize_constant(model: ir.Model, value: ir.Value, p: TensorParams) -> None:
    """A constant that an op treats as an activation (Add with a constant): stored quantized."""
    array = value.const_value.numpy()
    scale, zp = p.arrays()
    q = quantize(array, scale, zp, p.dtype, axis=p.axis)
    out = constant_dq(model, value.name, array, q, p)
    for use in list(value.uses()):
        if use.node.op_type != "DequantizeLinear":
            use.node.replace_input_with(use.idx, out)


def fuse_activation(graph: ir.Graph, node_name: str) -> None:
    """Remove a Relu/Clip whose work the producer's output quantization now does."""
    node = graph.node(node_name)
    src, dst = node.inputs[0], node.outputs[0]
    name = dst.name
    dst.replace_all_uses_with(src, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    dst.name = None
    src.name = name
