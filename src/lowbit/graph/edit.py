"""Small graph edits several passes share."""

from __future__ import annotations

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
