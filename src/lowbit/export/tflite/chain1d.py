"""Keep 1-D conv chains in the expanded 2-D layout.

`expand_1d` (and `batchnorm` on 3-D maps) wrap each op in Reshape (N, C, L) -> (N, C, L, 1) and back. Between
two such ops the 3-D value costs a RESHAPE and a TRANSPOSE on each side in the .tflite, because the 2-D kernels
run in NHWC. This pass moves the squeezing Reshape down past elementwise ops, Concat and Slice (they run on the
4-D value instead: the added axis is last, so their axes and constant operands keep their meaning), then drops
every expanding Reshape whose input is a squeeze of the same 4-D value. What is left: one expand where a chain
starts and one squeeze where it ends.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import helper

from .qdq import Graph, QTensor
from .rewrite import Names, new_value, same

# ops whose converters keep whatever layout their activation inputs have
_UNARY = {"Relu", "Clip", "Sigmoid", "Tanh", "HardSwish", "Gelu", "Identity"}
_BINARY = {"Add", "Sub", "Mul", "Div"}
_MOVES = {"Reshape", "Squeeze", "Unsqueeze"}


def _squeezed(shapes: dict, node: onnx.NodeProto) -> bool:
    """A Reshape-like node (N, C, L, 1) -> (N, C, L)."""
    x, y = node.input[0], node.output[0]
    return (
        node.op_type in _MOVES
        and len(shapes.get(x, ())) == 4
        and shapes[x][-1] == 1
        and tuple(shapes[x][:-1]) == tuple(shapes.get(y, ()))
    )


def _expanded(shapes: dict, node: onnx.NodeProto) -> bool:
    """A Reshape-like node (N, C, L) -> (N, C, L, 1)."""
    x, y = node.input[0], node.output[0]
    return node.op_type in _MOVES and len(shapes.get(x, ())) == 3 and tuple(shapes.get(y, ())) == (*shapes[x], 1)


def _same_quant(g: Graph, a: str, b: str) -> bool:
    qa, qb = g.quant.get(a), g.quant.get(b)
    return (qa is None and qb is None) or (qa is not None and qb is not None and same(qa, qb))


def _lift_const(g: Graph, names: Names, name: str) -> str:
    """A constant operand of a 3-D op, for the 4-D one: a trailing axis (broadcasting stays right-aligned)."""
    data = g.consts[name]
    if data.ndim == 0 or data.size == 1:
        return name
    new = names(f"{name}_4d")
    g.consts[new] = data[..., None]
    if name in g.qconsts:
        qt = g.qconsts[name]
        g.qconsts[new] = QTensor(qt.data[..., None], qt.quant)
    return new


def _liftable(g: Graph, shapes: dict, node: onnx.NodeProto, squeeze_of: dict[str, str]) -> bool:
    if len(node.output) != 1 or len(shapes.get(node.output[0], ())) != 3:
        return False
    live = [i for i in node.input if i and i not in g.consts]
    if not live or not all(i in squeeze_of for i in live):
        return False
    if node.op_type in _UNARY or node.op_type in _BINARY or node.op_type == "Concat":
        return all(len(shapes.get(i, ())) <= 3 for i in node.input if i in g.consts)
    if node.op_type == "Slice":  # bounds as constant inputs (opset 10+)
        return len(node.input) >= 3 and all(i in g.consts for i in node.input[1:] if i)
    return False


def keep_expanded(g: Graph, shapes: dict, dtypes: dict, graph_outputs: set[str]) -> int:
    """Rewrite `g` in place; returns how many expanding Reshapes were dropped."""
    names = Names(g, shapes)
    squeeze_of: dict[str, str] = {}  # 3-D value -> the 4-D value it squeezes
    out: list[onnx.NodeProto] = []
    for node in g.nodes:
        if _squeezed(shapes, node) and _same_quant(g, node.input[0], node.output[0]):
            squeeze_of[node.output[0]] = node.input[0]
        if not _liftable(g, shapes, node, squeeze_of):
            out.append(node)
            continue
        for k, i in enumerate(node.input):
            if i in squeeze_of:
                node.input[k] = squeeze_of[i]
            elif i in g.consts and node.op_type in _UNARY | _BINARY:
                node.input[k] = _lift_const(g, names, i)
        if node.op_type == "Concat":
            for a in node.attribute:
                if a.name == "axis":
                    a.i %= 3
        if node.op_type == "Slice" and len(node.input) > 3 and node.input[3]:
            axes = names(f"{node.input[3]}_4d")
            g.consts[axes] = np.asarray(g.consts[node.input[3]]) % 3
            node.input[3] = axes
        y = node.output[0]
        y4 = new_value(g, shapes, dtypes, names(f"{y}_2d"), y, (*shapes[y], 1))
        node.output[0] = y4
        target = names(f"{y}_squeeze_shape")
        g.consts[target] = np.asarray(shapes[y], np.int64)
        out += [node, helper.make_node("Reshape", [y4, target], [y], name=f"{node.name or y}_squeeze")]
        squeeze_of[y] = y4
    # an expand of a squeezed value is the 4-D value itself
    rename: dict[str, str] = {}
    kept = []
    for node in out:
        x = node.input[0] if node.input else ""
        if (
            _expanded(shapes, node)
            and x in squeeze_of
            and node.output[0] not in graph_outputs
            and _same_quant(g, squeeze_of[x], node.output[0])
        ):
            rename[node.output[0]] = squeeze_of[x]
            continue
        kept.append(node)
    for node in kept:
        for k, i in enumerate(node.input):
            node.input[k] = rename.get(i, i)
    # squeezes nothing reads any more
    while True:
        uses = Counter(i for n in kept for i in n.input)
        dead = [n for n in kept if _squeezed(shapes, n) and not uses[n.output[0]] and n.output[0] not in graph_outputs]
        if not dead:
            break
        kept = [n for n in kept if not any(n is d for d in dead)]
    g.nodes = kept
    return len(rename)
