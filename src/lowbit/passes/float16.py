"""float16 mode: chosen nodes compute in fp16; everything else (and the model's inputs and outputs) stays float32.

Casts sit only where a value crosses the region boundary, once per value however many nodes read it; constants
are converted ahead of time instead of cast at run time.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..graph.edit import take_over_output

F32, F16 = ir.DataType.FLOAT, ir.DataType.FLOAT16


def convert_float16(model: ir.Model, names: set[str]) -> int:
    """Convert the nodes named in `names` in place; returns the number of Cast nodes added."""
    graph = model.graph
    region = [n for n in graph if n.name in names]
    produced: set[int] = set()
    for node in region:
        for o in node.outputs:
            if o is not None and o.dtype == F32:
                o.dtype = F16
                produced.add(id(o))
    casts = 0
    halves: dict[str | None, ir.Value] = {}
    for node in region:
        for i, v in enumerate(node.inputs):
            if v is None or v.dtype != F32 or id(v) in produced:
                continue
            if v.name not in halves:
                if v.const_value is not None and not v.is_graph_input():
                    arr = v.const_value.numpy().astype(np.float16)
                    h = ir.Value(
                        name=f"{v.name}_fp16",
                        const_value=ir.tensor(arr, name=f"{v.name}_fp16"),
                        shape=ir.Shape(arr.shape),
                        type=ir.TensorType(F16),
                    )
                    graph.register_initializer(h)
                else:
                    h = _cast(graph, v, F16, f"{v.name}_fp16")
                    casts += 1
                halves[v.name] = h
            node.replace_input_with(i, halves[v.name])
    inside = {n.name for n in region}
    for node in region:
        for o in node.outputs:
            if o is None or id(o) not in produced:
                continue
            outside = [u for u in o.uses() if u.node.name not in inside]
            if not outside and not o.is_graph_output():
                continue
            name = o.name
            back = _cast(graph, o, F32, f"{name}_fp32")
            casts += 1
            for use in outside:
                use.node.replace_input_with(use.idx, back)
            if o.is_graph_output():
                take_over_output(graph, o, back, "_fp16")
    return casts


def _cast(graph: ir.Graph, v: ir.Value, to: ir.DataType, name: str) -> ir.Value:
    n = ir.Node("", "Cast", [v], [ir.AttrInt64("to", int(to))], name=f"{name}_Cast")
    out = n.outputs[0]
    out.name, out.dtype, out.shape = name, to, v.shape
    graph.append(n)
    return out
