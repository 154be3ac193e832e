"""Decomposed layer normalization -> one LayerNormalization node.

PyTorch exports `nn.LayerNorm` below opset 17 (and many transformer exports pin opset 14) as
``(x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps) * gamma + beta``: nine nodes. Quantized as they stand, the
mean, the squares, the variance and the normalized value each get 256 levels of their own (the variance of a
residual stream does not fit them), and ONNX Runtime can no longer fuse the chain into its LayerNorm kernel: the
int8 model is both less accurate and slower than it need be. As one LayerNormalization it is a float op lowbit
leaves float, as it does for models exported at opset 17. Nodes are merged only when every intermediate tensor
has no reader outside the chain and is no graph output.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from .canonicalize import opset_ok

LAYER_NORM_OPSET = 17


def _const(v: ir.Value | None) -> np.ndarray | None:
    return None if v is None or v.const_value is None else v.const_value.numpy()


def _only_reader(v: ir.Value | None, op: str) -> ir.Node | None:
    """The single node reading v, if it is an `op` and v is no graph output."""
    if v is None or v.is_graph_output() or len(v.uses()) != 1:
        return None
    node = next(iter(v.uses())).node
    return node if node.op_type == op else None


def _producer(v: ir.Value | None, op: str) -> ir.Node | None:
    node = None if v is None else v.producer()
    return node if node is not None and node.op_type == op else None


def _mean_axes(node: ir.Node, rank: int) -> tuple[int, ...] | None:
    """A keepdims ReduceMean's axes as negative numbers (attribute below opset 18, input from 18)."""
    if node.attributes.get_int("keepdims", 1) != 1:
        return None
    attr = node.attributes.get("axes")
    axes: list[int] | None = list(attr.as_ints()) if attr is not None else None
    if axes is None and len(node.inputs) > 1:
        found = _const(node.inputs[1])
        axes = None if found is None else [int(a) for a in found.reshape(-1)]
    if not axes:
        return None
    return tuple(sorted(a - rank if a >= 0 else a for a in axes))


def _normalized_shape(x: ir.Value, axes: tuple[int, ...]) -> tuple[int, ...] | None:
    """The static trailing dims LayerNormalization normalizes over, if `axes` are exactly the last len(axes)."""
    if x.shape is None or axes != tuple(range(-len(axes), 0)):
        return None
    dims = [d for d in list(x.shape)[len(x.shape) + axes[0] :] if isinstance(d, int)]
    return tuple(dims) if len(dims) == len(axes) else None


def _affine(v: ir.Value, op: str, shape: tuple[int, ...], rank: int) -> tuple[ir.Node, np.ndarray] | None:
    """The `op` (Mul or Add) reading v with a float constant that broadcasts along the normalized dims `shape`
    only (any dims before them 1, at most `rank` dims, so the result's shape is v's): (node, constant as `shape`)."""
    node = _only_reader(v, op)
    if node is None or len(node.inputs) != 2:
        return None
    other = node.inputs[1] if node.inputs[0] is v else node.inputs[0]
    c = _const(other)
    if c is None or c.dtype != np.float32 or c.ndim > rank:
        return None
    lead = max(c.ndim - len(shape), 0)
    if any(d != 1 for d in c.shape[:lead]):
        return None
    try:
        return node, np.broadcast_to(c.reshape(c.shape[lead:]), shape)
    except ValueError:  # it would widen the normalized dims: not a per-element scale or shift of them
        return None


def _match(div: ir.Node) -> tuple[list[ir.Node], ir.Value, float, tuple[int, ...], int] | None:
    """Div(x - mean(x), Sqrt(mean((x - mean(x))^2) + eps)): (nodes, x, eps, normalized shape, first axis)."""
    d, s = div.inputs[0], div.inputs[1]
    sub, sqrt = _producer(d, "Sub"), _producer(s, "Sqrt")
    if sub is None or sqrt is None or _only_reader(s, "Div") is not div:
        return None
    x, mean = sub.inputs[0], _producer(sub.inputs[1], "ReduceMean")
    if x is None or mean is None or mean.inputs[0] is not x or _only_reader(mean.outputs[0], "Sub") is not sub:
        return None
    add = _producer(sqrt.inputs[0], "Add")
    if add is None or _only_reader(add.outputs[0], "Sqrt") is not sqrt:
        return None
    var = _producer(add.inputs[0], "ReduceMean") or _producer(add.inputs[1], "ReduceMean")
    eps = _const(add.inputs[1] if var is not None and add.inputs[0] is var.outputs[0] else add.inputs[0])
    if var is None or eps is None or eps.size != 1 or _only_reader(var.outputs[0], "Add") is not add:
        return None
    square = var.inputs[0].producer() if var.inputs[0] is not None else None
    if square is None or len(square.outputs[0].uses()) != 1 or square.outputs[0].is_graph_output():
        return None
    two = _const(square.inputs[1]) if square.op_type == "Pow" else None
    pow_two = square.op_type == "Pow" and two is not None and two.size == 1 and two.item() == 2
    squares = square.inputs[0] is d and (pow_two or (square.op_type == "Mul" and square.inputs[1] is d))
    if not squares or d is None or d.is_graph_output() or {u.node for u in d.uses()} != {square, div}:
        return None
    rank = len(x.shape) if x.shape is not None else 0
    axes = _mean_axes(mean, rank) if rank else None
    if axes is None or _mean_axes(var, rank) != axes:
        return None
    shape = _normalized_shape(x, axes)
    if shape is None:
        return None
    return [mean, sub, square, var, add, sqrt, div], x, float(eps.item()), shape, axes[0]


def fuse_layer_norm(model: ir.Model) -> bool:
    """Every decomposed layer norm -> LayerNormalization; the opset is raised to 17 when that changes no node's
    meaning (otherwise nothing is fused)."""
    graph = model.graph
    present = {n.op_type for n in graph}
    if not {"ReduceMean", "Sub", "Sqrt", "Div"} <= present or not opset_ok(model, LAYER_NORM_OPSET):
        return False  # a model with no such chain (a ReduceMean global pool) pays no shape inference here
    common.ShapeInferencePass()(model)  # the normalized dims: exporters often leave intermediate shapes out
    changed = False
    for div in list(graph):
        if div.graph is None or div.op_type != "Div" or (found := _match(div)) is None:
            continue
        nodes, x, eps, shape, axis = found
        last, scale, bias = div.outputs[0], np.ones(shape, np.float32), None
        rank = len(x.shape) if x.shape is not None else 0
        if (mul := _affine(last, "Mul", shape, rank)) is not None:
            nodes.append(mul[0])
            last, scale = mul[0].outputs[0], mul[1]
            if (add := _affine(last, "Add", shape, rank)) is not None:
                nodes.append(add[0])
                last, bias = add[0].outputs[0], add[1]
        name = _node_name(graph, nodes[-1].name or "layer_norm")
        ins = [x, _initializer(graph, f"{name}_scale", scale)]
        if bias is not None:
            ins.append(_initializer(graph, f"{name}_bias", bias))
        attrs = [ir.AttrInt64("axis", axis), ir.AttrFloat32("epsilon", eps)]
        new = ir.Node("", "LayerNormalization", ins, attrs, name=name)
        graph.insert_before(nodes[-1], new)
        ir.convenience.replace_all_uses_with(last, new.outputs[0], replace_graph_outputs=True)
        result_name, last.name = last.name, None
        new.outputs[0].type, new.outputs[0].shape = last.type, last.shape
        graph.remove(nodes, safe=True)
        new.outputs[0].name = result_name
        changed = True
    if changed:
        model.opset_imports[""] = max(LAYER_NORM_OPSET, model.opset_imports.get("", 0))
    return changed


def _node_name(graph: ir.Graph, last: str) -> str:
    """PyTorch's name for the op at opset 17 ('/encoder/layer.0/norm1/LayerNormalization'), unless it is taken."""
    name = f"{last.rsplit('/', 1)[0]}/LayerNormalization" if "/" in last else f"{last}_layer_norm"
    return last if any(n.name == name for n in graph) else name


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    taken, n = set(graph.initializers), 0
    while name in taken:
        n += 1
        name = f"{name}_{n}"
    value = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(array, np.float32), name=name))
    value.shape, value.type = ir.Shape(array.shape), ir.TensorType(ir.DataType.FLOAT)
    graph.register_initializer(value)
    return value
