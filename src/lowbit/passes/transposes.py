"""Move layout Transposes down through layout-blind ops until they meet their inverse, then drop both.

tf2onnx converts an NHWC Keras/TFLite graph by wrapping every Conv in Transpose(NHWC->NCHW) ... Transpose(NCHW->NHWC)
and relies on its own optimizer to cancel the pairs. When that optimizer fails (tf2onnx 1.16 does on Keras
MobileNetV3: its Add handler chokes on the hard-swish's scalar `+ 3`) or is switched off, every Relu, hard-swish,
residual Add, Pad and squeeze-excitation mean runs in NHWC between two Transposes. Quantized, each Transpose is one
more int8 node, the Pads no longer reach the convs they feed, the means are not GlobalAveragePool, and the hard-swish
spans a Transpose: the int8 model ran at 1.15x float. With the Transposes cancelled it is the graph PyTorch exports.

A node moves when every input is either the output of a Transpose with one permutation or a constant (permuted to
match), and each such Transpose feeds only nodes that move or undo it: then the original Transposes die and at most
one new Transpose follows the node, so the count never grows.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

# Ops whose every data input is read elementwise (with numpy broadcasting): the layout does not matter to them.
_UNARY = {
    "Relu", "Clip", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "LeakyRelu", "Elu", "Selu", "Neg", "Abs", "Exp",
    "Sqrt", "Softplus", "Erf", "Identity", "Gelu", "Reciprocal", "Floor", "Ceil", "Round",
}  # fmt: skip
_BINARY = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "PRelu"}
_REDUCE = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum"}


def _perm(node: ir.Node) -> list[int] | None:
    if node.op_type != "Transpose" or node.domain != "":
        return None
    attr = node.attributes.get("perm")
    return None if attr is None else [int(p) for p in attr.as_ints()]


def _const(v: ir.Value | None) -> np.ndarray | None:
    return None if v is None or v.const_value is None else v.const_value.numpy()


def _transpose_of(v: ir.Value | None) -> tuple[ir.Node, list[int]] | None:
    node = v.producer() if v is not None else None
    perm = _perm(node) if node is not None else None
    return None if perm is None or node is None else (node, perm)


def _data_inputs(node: ir.Node) -> list[int]:
    """Indices of the inputs the layout applies to (Clip's bounds and Pad's pads are not data)."""
    if node.op_type in _BINARY:
        return list(range(len(node.inputs)))
    return [0]


def _movable(node: ir.Node, perm: list[int]) -> bool:
    if node.domain != "" or len(node.outputs) != 1:
        return False
    op = node.op_type
    if op in _UNARY or op in _BINARY:
        if op == "Clip":
            return all(_const(v) is not None for v in node.inputs[1:] if v is not None)
        return True
    if op == "Pad":
        return (
            len(node.inputs) >= 2
            and _const(node.inputs[1]) is not None
            and _const(node.inputs[1]).size == 2 * len(perm)  # type: ignore[union-attr]
            and (len(node.inputs) < 4 or node.inputs[3] is None)
        )
    if op in _REDUCE:
        axes = node.attributes.get("axes")
        return (
            node.attributes.get_int("keepdims", 1) == 1
            and axes is not None  # opset < 18 (the form tf2onnx writes); no axes means every axis: nothing to move
            and len(node.inputs) == 1
        )
    return False


def _undoes(node: ir.Node, perm: list[int]) -> bool:
    q = _perm(node)
    return q is not None and len(q) == len(perm) and [perm[i] for i in q] == list(range(len(perm)))


def _feeds_only_movers(transpose: ir.Node, perm: list[int]) -> bool:
    out = transpose.outputs[0]
    if out.is_graph_output():
        return False
    uses = list(out.uses())
    return bool(uses) and all(
        (_movable(u.node, perm) and _inputs_fit(u.node, perm)) or _undoes(u.node, perm) for u in uses
    )


def _inputs_fit(node: ir.Node, perm: list[int], depth: int = 8) -> bool:
    """Every data input is a constant that can be permuted or a Transpose(perm) (now, or once the movers above it
    have moved: the hard-swish's `x * (Clip(x + 3) / 6)` reads x and a value computed from x). A reader whose
    other input is a plain tensor cannot move, so moving its siblings would leave the Transpose and add another."""
    for i in _data_inputs(node):
        v = node.inputs[i]
        found = _transpose_of(v)
        c = _const(v)
        if (found is not None and found[1] == perm) or (c is not None and c.ndim <= len(perm)):
            continue
        producer = v.producer() if v is not None else None
        if (
            depth == 0
            or producer is None
            or found is not None
            or not _movable(producer, perm)
            or not _inputs_fit(producer, perm, depth - 1)
        ):
            return False
    return True


def _new_const(graph: ir.Graph, array: np.ndarray, name: str) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(array), name=name))
    value.shape = ir.Shape(array.shape)
    graph.register_initializer(value)
    return value


def _move(graph: ir.Graph, node: ir.Node, perm: list[int], count: list[int]) -> None:
    """Rewrite node to read the untransposed tensors; a Transpose(perm) after it gives its consumers what they read."""
    rank = len(perm)
    inverse = [int(i) for i in np.argsort(perm)]
    for i in _data_inputs(node):
        v = node.inputs[i]
        found = _transpose_of(v)
        if found is not None and found[1] == perm:
            node.replace_input_with(i, found[0].inputs[0])
            continue
        c = _const(v)
        assert c is not None and v is not None
        c = c.reshape((1,) * (rank - c.ndim) + c.shape)  # broadcasting aligns trailing axes: make it full rank
        count[0] += 1
        node.replace_input_with(i, _new_const(graph, c.transpose(inverse), f"{v.name}_untransposed_{count[0]}"))
    if node.op_type == "Pad":
        pads = _const(node.inputs[1])
        assert pads is not None
        begins, ends = pads[:rank], pads[rank:]
        new = np.zeros_like(pads)
        for j, p in enumerate(perm):  # output axis j of the Transpose is axis p of its input
            new[p], new[rank + p] = begins[j], ends[j]
        count[0] += 1
        node.replace_input_with(1, _new_const(graph, new, f"{node.name or 'pad'}_pads_untransposed_{count[0]}"))
    if node.op_type in _REDUCE:
        axes = [int(a) % rank for a in node.attributes["axes"].as_ints()]
        node.attributes["axes"] = ir.AttrInt64s("axes", sorted(perm[a] for a in axes))
    out = node.outputs[0]
    count[0] += 1
    after = ir.Node("", "Transpose", [out], [ir.AttrInt64s("perm", perm)], name=f"{node.name}_transpose_{count[0]}")
    graph.insert_after(node, after)
    # Every reader of the node's output (and the graph output, by name) now reads the Transpose after it.
    tensor_name = out.name
    for use in list(out.uses()):
        if use.node is not after:
            use.node.replace_input_with(use.idx, after.outputs[0])
    if out.is_graph_output():
        outputs = graph.outputs
        outputs[outputs.index(out)] = after.outputs[0]
    out.name = f"{tensor_name}_untransposed"
    after.outputs[0].name = tensor_name  # ranges, plans and reports refer to the tensor by its name
    after.outputs[0].type = out.type
    out.shape = None  # shape inference sets it again, in the untransposed layout
    after.outputs[0].shape = None


def _cancel(graph: ir.Graph) -> bool:
    """Transpose(q) of Transpose(p) where q undoes p: readers of the second read the first one's input."""
    changed = False
    for node in list(graph):
        q = _perm(node)
        found = _transpose_of(node.inputs[0]) if q is not None else None
        source = found[0].inputs[0] if found is not None else None
        if found is None or source is None or not _undoes(node, found[1]) or node.outputs[0].is_graph_output():
            continue
        node.outputs[0].replace_all_uses_with(source)
        graph.remove(node, safe=True)
        if not list(found[0].outputs[0].uses()) and not found[0].outputs[0].is_graph_output():
            graph.remove(found[0], safe=True)
        changed = True
    return changed


def sink_transposes(model: ir.Model) -> bool:
    """Cancel layout Transpose pairs across layout-blind ops (see the module docstring). Returns whether it changed
    the graph; the float function is unchanged."""
    graph = model.graph
    changed = _cancel(graph)
    count = [0]
    # Each sweep moves every Transpose it meets one or more nodes down (in graph order a moved Transpose reaches
    # the next node in the same sweep); a Transpose stops at an op it cannot cross, so this ends.
    for _ in range(len(graph) + 1):
        moved = False
        for node in list(graph):
            perm = _candidate(node)
            if perm is not None:
                _move(graph, node, perm, count)
                moved = changed = True
        _cancel(graph)
        _drop_dead(graph)
        if not moved:
            break
    return changed


def _candidate(node: ir.Node) -> list[int] | None:
    """The permutation to move through node, when every data input is a Transpose of it (feeding only movers) or a
    constant, and at least one is a Transpose."""
    if node.op_type not in _UNARY | _BINARY | _REDUCE | {"Pad"} or node.domain != "":
        return None
    perms = [found[1] for found in (_transpose_of(node.inputs[i]) for i in _data_inputs(node)) if found is not None]
    if not perms or not _movable(node, perms[0]) or not _inputs_fit(node, perms[0]):
        return None
    for i in _data_inputs(node):
        found = _transpose_of(node.inputs[i])
        if found is not None and not _feeds_only_movers(found[0], perms[0]):
            return None
    return perms[0]


def _drop_dead(graph: ir.Graph) -> None:
    for node in list(graph):
        if node.op_type == "Transpose" and not node.outputs[0].is_graph_output() and not list(node.outputs[0].uses()):
            graph.remove(node, safe=True)


__all__ = ["sink_transposes"]
