"""Small graph edits several passes share."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def take_over_output(graph: ir.Graph, old: ir.Value, new: ir.Value, old_suffix: str) -> None:
    """Make `new` the graph output `old` was, under `old`'s name: the model keeps its output names while the
    tensor inside (now feeding `new`) is renamed with `old_suffix`."""
    name = old.name
    for i, out in enumerate(graph.outputs):
        if out is old:
            graph.outputs[i] = new
    old.name = f"{name}{old_suffix}"
    new.name = name


def new_constant(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """A registered initializer holding `array`, named `name` or, if taken, `name_1`, `name_2`, ...: each fold of a
    chain makes new values (the old ones go unused), and exporters share one constant among many nodes."""
    unique, n = name, 1
    while unique in graph.initializers:
        unique, n = f"{name}_{n}", n + 1
    value = ir.Value(name=unique, const_value=ir.tensor(array))
    value.shape = ir.Shape(array.shape)
    value.dtype = ir.DataType.from_numpy(array.dtype)
    graph.register_initializer(value)
    return value
