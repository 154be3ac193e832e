"""Keep each int32 bias on its layer's accumulator grid after the target moved an input scale.

A quantized layer's int32 bias is stored with scale = input scale x weight scale: that is the grid ONNX Runtime's
QLinearConv / QGemm and LiteRT's kernels add it on, whatever scale its DequantizeLinear says. The target adjusts
some input scales after the biases were quantized (an Add's output nudged by ~1e-7, a Sigmoid's output fixed at
1/256), so the bias would be read on another grid than the one it was rounded for: 0.4% off after a calibrated
Sigmoid scale became 1/256, and the integer kernels then disagree with the QDQ model's simulation.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ..graph.index import GraphIndex
from ..plan import Plan


def rescale_biases(proto: onnx.ModelProto, plan: Plan) -> list[str]:
    """Requantize, in place, every bias whose stored scale is no longer its layer's input scale x weight scale:
    the same real values (as nearly as int32 steps of the new scale allow) on the grid the kernels use. Updates
    the plan's bias parameters; returns the layers changed."""
    g = GraphIndex(proto.graph)
    by_name = {n.name: n for n in proto.graph.node if n.name}
    users: dict[str, int] = {}
    for n in proto.graph.node:
        for i in n.input:
            users[i] = users.get(i, 0) + 1
    changed = []
    for key, p in plan.tensors.items():
        node_name, _, idx = key.rpartition(":")
        node = by_name.get(node_name)
        if p.kind != "bias" or node is None or not idx.isdigit() or len(node.input) <= int(idx):
            continue
        found = [_dq(g, node.input[i]) for i in (0, 1, int(idx))]
        if any(f is None for f in found):
            continue
        (_, s_in), (_, s_w), (b_dq, s_b) = found  # type: ignore[misc]
        if s_in.size != 1:
            continue
        # as apply.py computes it: float64 product, stored as float32
        want = (np.float64(s_in.reshape(())) * s_w.astype(np.float64)).astype(np.float32)
        want = np.broadcast_to(want, s_b.shape)
        if np.array_equal(want, s_b):
            continue
        q = numpy_helper.to_array(g.inits[b_dq.input[0]]).astype(np.float64)
        new_q = np.clip(np.rint(q * s_b.astype(np.float64) / want.astype(np.float64)), -(2**31), 2**31 - 1)
        _store(proto, g, users, b_dq, 0, new_q.astype(np.int32))
        _store(proto, g, users, b_dq, 1, np.ascontiguousarray(want))
        p.scale = [float(v) for v in want.reshape(-1)]
        changed.append(node_name)
    return changed


def _dq(g: GraphIndex, tensor: str) -> tuple[onnx.NodeProto, np.ndarray] | None:
    """The DequantizeLinear making `tensor` and its scale, if the scale is an initializer."""
    dq = g.producer_node(tensor)
    if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 2 or dq.input[1] not in g.inits:
        return None
    return dq, numpy_helper.to_array(g.inits[dq.input[1]])


def _store(
    proto: onnx.ModelProto, g: GraphIndex, users: dict[str, int], dq: onnx.NodeProto, i: int, array: np.ndarray
) -> None:
    """Write `array` as the DequantizeLinear's input i: in place when only it reads that initializer, else as a new
    one named after the DequantizeLinear (a shared zero bias or scale keeps its other readers' values)."""
    name = dq.input[i]
    if users.get(name, 0) != 1:
        name = f"{dq.name or dq.output[0]}_{'q' if i == 0 else 'scale'}_rescaled"
        proto.graph.initializer.append(numpy_helper.from_array(array, name))
        g.inits[name] = proto.graph.initializer[-1]
        users[dq.input[i]] -= 1
        users[name] = 1
        dq.input[i] = name
        return
    g.inits[name].CopyFrom(numpy_helper.from_array(array, name))
