"""A graph that computes in float16 (a mixed-precision Keras export, a model halved for GPUs) computes in float32
before quantization.

lowbit's Q/DQ pairs, observers and integer kernels are float32 ones: left in float16, every Conv and MatMul read as
"not float" and nothing was quantized (a tf2onnx morpheme segmenter came out 97% of its size). Widening is exact
for the weights (every float16 value is a float32 value); only the arithmetic gets more precise. The model's
inputs and outputs keep their float16 type, through a Cast at each, so callers feed and read what they did.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

HALF = ir.DataType.FLOAT16
FULL = ir.DataType.FLOAT


def computes_in_float16(model: ir.Model) -> bool:
    """Whether any node of the main graph yields float16 other than a Cast to a graph output (the boundary this
    pass leaves; subgraphs are not looked into: see `widen_float16`)."""
    return any(v.dtype == HALF and not _boundary(node) for node in model.graph for v in node.outputs)


def _boundary(node: ir.Node) -> bool:
    return node.op_type == "Cast" and all(v.is_graph_output() for v in node.outputs)


def widen_float16(model: ir.Model) -> bool:
    """float16 initializers, Casts, ConstantOfShape values and intermediate tensors -> float32. Graphs with
    If/Loop/Scan bodies are left as they are (their float16 values would need the same walk)."""
    graph = model.graph
    bodies = (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
    if any(a.type in bodies for n in graph for a in n.attributes.values()) or not computes_in_float16(model):
        return False
    for value in list(graph.initializers.values()):
        if value.dtype == HALF and value.const_value is not None:
            value.const_value = ir.tensor(value.const_value.numpy().astype(np.float32), name=value.name)
            value.dtype = FULL
    for node in list(graph):
        if node.op_type == "Cast" and node.attributes.get_int("to") == HALF.value and not _boundary(node):
            node.attributes["to"] = ir.AttrInt64("to", FULL.value)
        value_attr = node.attributes.get("value") if node.op_type == "ConstantOfShape" else None
        if value_attr is not None and value_attr.as_tensor().dtype == HALF:
            wide = value_attr.as_tensor().numpy().astype(np.float32)
            node.attributes["value"] = ir.AttrTensor("value", ir.tensor(wide))
        for v in node.outputs:
            if v.dtype == HALF and not v.is_graph_output():
                v.dtype = FULL
    for inp in graph.inputs:
        if inp.dtype == HALF:
            _cast_after(graph, inp)
    for i, out in enumerate(list(graph.outputs)):
        if out.dtype == HALF and out.producer() is not None:
            _cast_before(graph, i, out)
    common.ShapeInferencePass()(model)  # the types of tensors the export declared none for
    for node in list(graph):  # a Cast to float16 of a float32 value is now float32 -> float32: nothing
        x, y = node.inputs[0] if node.inputs else None, node.outputs[0] if node.outputs else None
        if node.op_type == "Cast" and x is not None and y is not None and x.dtype == y.dtype == FULL:
            if not y.is_graph_output() and node.attributes.get_int("to") == FULL.value:
                y.replace_all_uses_with(x)
                graph.remove(node, safe=True)
    return True


def _cast_after(graph: ir.Graph, inp: ir.Value) -> None:
    """inp stays float16; its readers read Cast(inp, float32)."""
    cast = ir.Node("", "Cast", [inp], [ir.AttrInt64("to", FULL.value)], name=f"{inp.name}_float32")
    wide = cast.outputs[0]
    wide.name, wide.dtype, wide.shape = f"{inp.name}_float32", FULL, inp.shape
    for use in list(inp.uses()):
        if use.node is not cast:
            use.node.replace_input_with(use.idx, wide)
    graph.insert_before(next(iter(graph)), cast)


def _cast_before(graph: ir.Graph, index: int, out: ir.Value) -> None:
    """Graph output `out` stays float16, as Cast(its producer's result, now float32)."""
    producer = out.producer()
    assert producer is not None
    name = out.name
    out.name, out.dtype = f"{name}_float32", FULL
    cast = ir.Node("", "Cast", [out], [ir.AttrInt64("to", HALF.value)], name=f"{name}_float16")
    graph.insert_after(producer, cast)
    result = cast.outputs[0]
    result.dtype, result.shape = HALF, out.shape
    graph.outputs[index] = result
    result.name = name
