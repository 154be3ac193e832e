"""Evaluate nodes whose inputs are all constants (exporters leave shape arithmetic such as padding sizes)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx.reference import ReferenceEvaluator

# Folding a node that makes a large tensor from a small one (Expand, Tile, ConstantOfShape of a big shape)
# would bloat the file; such nodes stay (a result larger than this and than each of its inputs).
MAX_FOLDED_ELEMENTS = 1 << 16
NEVER_FOLD = {
    "QuantizeLinear",
    "DequantizeLinear",
    "RandomNormal",
    "RandomUniform",
    "RandomNormalLike",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
}


def _constant(v: ir.Value | None) -> np.ndarray | None:
    if v is None or v.const_value is None:
        return None
    return v.const_value.numpy()


def _evaluate(node: ir.Node, arrays: list[np.ndarray | None], opset: int) -> list[np.ndarray]:
    names = [f"in{i}" if a is not None else "" for i, a in enumerate(arrays)]
    proto = onnx.helper.make_node(node.op_type, names, [f"out{i}" for i in range(len(node.outputs))])
    proto.attribute.extend(ir.serde.serialize_attribute(a) for a in node.attributes.values())
    inputs = [
        onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
        for n, a in zip(names, arrays)
        if a is not None
    ]
    outputs = [onnx.helper.make_empty_tensor_value_info(o) for o in proto.output]
    graph = onnx.helper.make_graph([proto], "fold", inputs, outputs)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    feeds = {n: a for n, a in zip(names, arrays) if a is not None}
    results = ReferenceEvaluator(model).run(None, feeds)
    assert isinstance(results, list)  # a dict only with intermediate=True
    return results


def fold_constants(model: ir.Model) -> bool:
    graph = model.graph
    opset = model.opset_imports.get("", 17)
    changed = False
    for node in list(graph):
        if node.domain not in ("", "ai.onnx") or node.op_type in NEVER_FOLD or not node.inputs:
            continue
        if any(a.type == ir.AttributeType.GRAPH for a in node.attributes.values() if isinstance(a, ir.Attr)):
            continue
        source = node.inputs[0]
        if (
            node.op_type == "Identity"
            and source is not None
            and source.const_value is not None
            and not node.outputs[0].is_graph_output()
        ):
            # A weight a later layer reuses (PyTorch exports tied weights as an Identity of the first reader's
            # initializer, however large): every reader reads the initializer itself, no copy, as a weight.
            node.outputs[0].replace_all_uses_with(source)
            graph.remove(node, safe=True)
            changed = True
            continue
        arrays = [_constant(v) for v in node.inputs]
        if any(a is None and v is not None for a, v in zip(arrays, node.inputs)):
            continue
        try:
            results = _evaluate(node, arrays, opset)
        except Exception:  # an op the reference evaluator cannot run stays as it is
            continue
        # No larger than the largest constant input is no bloat: a weight computed from constants (weight norm,
        # as the dynamo exporter writes wav2vec2's positional conv: g * v / ||v||) becomes the weight it is.
        grown = max([MAX_FOLDED_ELEMENTS] + [a.size for a in arrays if a is not None])
        if any(np.asarray(r).size > grown for r in results):
            continue
        for out, result in zip(list(node.outputs), results):
            array = np.asarray(result)
            name = out.name
            value = ir.Value(const_value=ir.tensor(array), shape=ir.Shape(array.shape))
            value.dtype = ir.DataType.from_numpy(array.dtype)
            out.replace_all_uses_with(value, replace_graph_outputs=True)
            out.name = None
            value.name = name
            graph.register_initializer(value)
        graph.remove(node, safe=True)
        changed = True
    return changed
