"""Fold a zero constant Pad on the spatial dims into the Conv it feeds (exporters of "same" padding emit one)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def _const(v: ir.Value | None) -> np.ndarray | None:
    return None if v is None or v.const_value is None else v.const_value.numpy()


def _spatial_pads(pad: ir.Node, rank: int) -> list[int] | None:
    if pad.attributes.get_string("mode", "constant") != "constant":
        return None
    pads = _const(pad.inputs[1]) if len(pad.inputs) > 1 else None
    if pads is None or pads.size != 2 * rank or np.any(pads < 0):
        return None
    value = _const(pad.inputs[2]) if len(pad.inputs) > 2 and pad.inputs[2] is not None else None
    if value is not None and np.any(value != 0):
        return None
    if len(pad.inputs) > 3 and pad.inputs[3] is not None:
        return None  # explicit axes: rare, leave it
    begins, ends = pads[:rank], pads[rank:]
    if begins[0] or begins[1] or ends[0] or ends[1]:
        return None  # padding batch or channels cannot become conv padding
    return [int(p) for p in begins[2:]] + [int(p) for p in ends[2:]]


def fold_pad(model: ir.Model) -> bool:
    graph = model.graph
    changed = False
    for pad in list(graph):
        if pad.op_type != "Pad" or pad.outputs[0].is_graph_output():
            continue
        uses = tuple(pad.outputs[0].uses())
        if not uses or any(u.node.op_type != "Conv" or u.idx != 0 for u in uses):
            continue
        w = _const(uses[0].node.inputs[1])
        if w is None:
            continue
        extra = _spatial_pads(pad, w.ndim)
        if extra is None:
            continue
        if any(u.node.attributes.get_string("auto_pad", "NOTSET") != "NOTSET" for u in uses):
            continue
        for use in uses:
            conv = use.node
            old = conv.attributes.get_ints("pads", [0] * len(extra))
            conv.attributes["pads"] = ir.AttrInt64s("pads", [a + b for a, b in zip(old, extra)])
            conv.replace_input_with(0, pad.inputs[0])
        graph.remove(pad, safe=True)
        changed = True
    return changed
