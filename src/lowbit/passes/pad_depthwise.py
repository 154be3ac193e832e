"""Depthwise convolutions widened to a channel count ONNX Runtime's fast int8 kernel takes (onnxruntime target).

ORT's symmetric int8 depthwise kernel (MLAS ConvSym, x86) needs the channel count to be a multiple of 16; other
counts run the generic kernel with an int32 buffer and a separate requantization pass. One 3x3 depthwise conv, 1
thread, thread CPU time (bench/ort_profile.py's measure): 72 channels 80 us, 80 channels 62 us; 88 -> 96: 83 -> 58 us;
120 -> 128 (5x5): 56 -> 37 us. So every tensor that carries those channels gets zero channels appended: the conv
that produces them gets zero weight rows (and zero bias), the convs that read them zero weight columns, and what lies
between (activations, squeeze-excite pooling and gates, Mul/Add of two such tensors) computes on the extra channels
values that nothing reads. The float outputs are unchanged; any reader that would see the extra channels (a graph
output, a reshape, a concat, a Gemm) leaves the group as it is.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

UNARY = {"Relu", "Clip", "HardSwish", "HardSigmoid", "Sigmoid", "Tanh", "LeakyRelu", "GlobalAveragePool"}
BINARY = {"Add", "Mul"}


def _weight(node: ir.Node) -> np.ndarray | None:
    w = node.inputs[1] if node.op_type == "Conv" and len(node.inputs) > 1 else None
    return None if w is None or w.const_value is None else w.const_value.numpy()


def _depthwise(node: ir.Node) -> bool:
    w = _weight(node)
    group = node.attributes.get_int("group", 1)
    return w is not None and w.ndim == 4 and w.shape[1] == 1 and group == w.shape[0] > 1


def _channels(v: ir.Value) -> int | None:
    shape = v.shape
    if shape is None or len(shape) != 4 or not isinstance(shape[1], int):
        return None
    return shape[1]


def _scalar_const(v: ir.Value | None) -> bool:
    return v is not None and v.const_value is not None and v.const_value.numpy().size == 1


class _Group:
    """The tensors that carry one depthwise conv's channels, and the convs at its edges."""

    def __init__(self, channels: int) -> None:
        self.channels = channels
        self.values: set[ir.Value] = set()
        self.produce: set[ir.Node] = set()  # group-1 convs writing the channels: zero weight rows
        self.read: set[ir.Node] = set()  # group-1 convs reading them: zero weight columns
        self.depthwise: set[ir.Node] = set()

    def grow(self, start: ir.Value) -> bool:
        """Add `start` and everything tied to it; False when a tie cannot take extra channels."""
        todo = [start]
        while todo:
            v = todo.pop()
            if v in self.values:
                continue
            if _channels(v) != self.channels or v.is_graph_output() or v.is_graph_input():
                return False
            self.values.add(v)
            found = self._producer(v)
            if found is None:
                return False
            todo += found
            for use in v.uses():
                more = self._reader(use.node, use.idx)
                if more is None:
                    return False
                todo += more
        return True

    def _producer(self, v: ir.Value) -> list[ir.Value] | None:
        p = v.producer()
        if p is None:
            return None
        if p.op_type == "Conv" and _depthwise(p):
            self.depthwise.add(p)
            return [p.inputs[0]] if p.inputs[0] is not None else None
        if p.op_type == "Conv" and _weight(p) is not None and p.attributes.get_int("group", 1) == 1:
            if len(p.inputs) > 2 and p.inputs[2] is not None and p.inputs[2].const_value is None:
                return None  # a computed bias cannot be widened
            self.produce.add(p)
            return []
        if p.op_type in UNARY and p.inputs[0] is not None:
            return [p.inputs[0]]
        if p.op_type in BINARY and len(p.inputs) == 2:
            return [x for x in p.inputs if x is not None and not _scalar_const(x)]
        return None

    def _reader(self, node: ir.Node, idx: int) -> list[ir.Value] | None:
        if node.op_type == "Conv" and idx == 0 and _depthwise(node):
            if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].const_value is None:
                return None
            self.depthwise.add(node)
            return [node.outputs[0]]
        if node.op_type == "Conv" and idx == 0 and _weight(node) is not None:
            if node.attributes.get_int("group", 1) != 1:
                return None
            self.read.add(node)
            return []
        if node.op_type in UNARY and idx == 0:
            return [node.outputs[0]]
        if node.op_type in BINARY:
            return [node.outputs[0]] + [x for x in node.inputs if x is not None and not _scalar_const(x)]
        return None


def _replace(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray) -> None:
    old = node.inputs[index]
    assert old is not None
    name, n = f"{old.name}_padded", 1
    while name in graph.initializers:
        name, n = f"{old.name}_padded_{n}", n + 1
    value = ir.Value(name=name, const_value=ir.tensor(array))
    value.shape = ir.Shape(array.shape)
    value.dtype = old.dtype or ir.DataType.FLOAT
    graph.register_initializer(value)
    node.replace_input_with(index, value)


def _pad(a: np.ndarray, axis: int, extra: int) -> np.ndarray:
    widths = [(0, extra if i == axis else 0) for i in range(a.ndim)]
    return np.pad(a, widths)


def pad_depthwise(model: ir.Model, multiple: int = 16) -> bool:
    """Widen every depthwise conv's channel group to a multiple of `multiple` where the whole group can take it."""
    graph = model.graph
    changed = False
    for node in list(graph):
        if not _depthwise(node) or node.inputs[0] is None:
            continue
        c = _channels(node.inputs[0])
        if c is None or c % multiple == 0:
            continue
        group = _Group(c)
        if not group.grow(node.inputs[0]) or not group.produce:
            continue
        extra = -c % multiple
        for conv in group.produce:
            _replace(graph, conv, 1, _pad(_weight(conv), 0, extra))  # type: ignore[arg-type]
            if len(conv.inputs) > 2 and conv.inputs[2] is not None and conv.inputs[2].const_value is not None:
                _replace(graph, conv, 2, _pad(conv.inputs[2].const_value.numpy(), 0, extra))
        for conv in group.depthwise:
            _replace(graph, conv, 1, _pad(_weight(conv), 0, extra))  # type: ignore[arg-type]
            if len(conv.inputs) > 2 and conv.inputs[2] is not None and conv.inputs[2].const_value is not None:
                _replace(graph, conv, 2, _pad(conv.inputs[2].const_value.numpy(), 0, extra))
            conv.attributes["group"] = ir.AttrInt64("group", c + extra)
        for conv in group.read - group.produce:
            _replace(graph, conv, 1, _pad(_weight(conv), 1, extra))  # type: ignore[arg-type]
        for conv in group.read & group.produce:  # reads and writes the group: its rows are widened already
            _replace(graph, conv, 1, _pad(_weight(conv), 1, extra))  # type: ignore[arg-type]
        for v in group.values:
            assert v.shape is not None
            v.shape = ir.Shape([d if i != 1 else c + extra for i, d in enumerate(v.shape)])
        changed = True
    return changed
