"""Rewrite the forms exporters spell the same function in into the one op lowbit and ONNX Runtime know.

Older exporters (torch at opset < 14, paddle2onnx, tf2onnx) decompose hard-swish into ``x * Clip(x + 3, 0, 6) / 6``
and hard-sigmoid into ``Clip(x + 3, 0, 6) / 6``. Quantized as they stand, every Add/Clip/Mul/Div is its own
Q/DQ island; as one HardSwish/HardSigmoid they are one activation with one range (and one lookup table in
ONNX Runtime, `ops/activation.py`). Nodes are only merged when the intermediate tensors have no other reader and
are not graph outputs, so nothing else in the graph can observe the difference.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from ..graph.edit import new_constant

SIXTH = 1.0 / 6.0
# Ops whose definitions at opsets 14-17 compute what their opset-13 ones did for the inputs an opset-13 model gives
# them (those opsets widened their types or added an attribute whose default is the old behaviour). Not RoiAlign:
# opset 16 changed its default coordinate mode.
_SAME_UP_TO_17 = {
    *("Add", "Sub", "Mul", "Div", "Pow", "Relu", "LeakyRelu", "PRelu", "Identity", "Reshape", "Shape", "CumSum"),
    *("GRU", "LSTM", "RNN", "If", "Loop", "Scan", "Where", "GreaterOrEqual", "LessOrEqual"),
    *("ScatterElements", "ScatterND"),
}


def _const(v: ir.Value | None) -> np.ndarray | None:
    return None if v is None or v.const_value is None else v.const_value.numpy()


def _scalar(v: ir.Value | None, want: float, rtol: float = 1e-6) -> bool:
    """v is a one-element float constant close to want (one element: broadcasting it changes no shape)."""
    c = _const(v)
    return c is not None and c.size == 1 and c.dtype.kind == "f" and bool(np.isclose(c.item(), want, rtol, 0.0))


def _private(v: ir.Value | None) -> ir.Node | None:
    """The producer of v if v is read by exactly one node and is no graph output (so it can be merged away)."""
    if v is None or v.producer() is None or v.is_graph_output() or len(v.uses()) != 1:
        return None
    return v.producer()


def _other(node: ir.Node, v: ir.Value) -> ir.Value | None:
    """The other input of a two-input node, given one of them."""
    a, b = node.inputs[0], node.inputs[1]
    return b if a is v else a


def _shifted_clip(v: ir.Value | None) -> tuple[ir.Value, list[ir.Node]] | None:
    """v = Clip(x + 3, 0, 6) (the numerator of a hard-sigmoid): (x, [Add, Clip]), intermediates private."""
    clip = _private(v)
    if clip is None or clip.op_type != "Clip" or len(clip.inputs) != 3:
        return None
    if not (_scalar(clip.inputs[1], 0.0, 0.0) and _scalar(clip.inputs[2], 6.0, 0.0)):
        return None
    add = _private(clip.inputs[0])
    if add is None or add.op_type != "Add":
        return None
    for i in (0, 1):
        if _scalar(add.inputs[1 - i], 3.0, 0.0) and _const(add.inputs[i]) is None:
            x = add.inputs[i]
            assert x is not None
            return x, [add, clip]
    return None


def _sixth_of(mul: ir.Node) -> ir.Value | None:
    """The non-constant operand of Mul(y, 1/6)."""
    if mul.op_type != "Mul" or len(mul.inputs) != 2:
        return None
    for i in (0, 1):
        if _scalar(mul.inputs[1 - i], SIXTH) and _const(mul.inputs[i]) is None:
            return mul.inputs[i]
    return None


def _replace(graph: ir.Graph, old: list[ir.Node], op: str, x: ir.Value, attrs: list[ir.Attr]) -> ir.Node:
    """Put op(x) where the chain old (last node makes the result) was; the result keeps its tensor and node name."""
    last = old[-1]
    new = ir.Node("", op, [x], attrs, name=last.name)
    graph.insert_before(last, new)
    result = last.outputs[0]
    ir.convenience.replace_all_uses_with(result, new.outputs[0], replace_graph_outputs=True)
    name, result.name = result.name, None
    graph.remove(old, safe=True)
    new.outputs[0].name = name
    new.outputs[0].type, new.outputs[0].shape = result.type, result.shape
    return new


def _div_to_mul(graph: ir.Graph) -> bool:
    changed = False
    for div in list(graph):
        c = _const(div.inputs[1]) if div.op_type == "Div" and len(div.inputs) == 2 else None
        if c is None or c.dtype != np.float32 or not np.all(np.isfinite(c)) or np.any(c == 0):
            continue  # integer Div truncates: never a Mul
        with np.errstate(over="ignore"):
            r = (np.float32(1.0) / c).astype(np.float32)
        # x * fl(1/c) differs from fl(x / c) by about one float32 ulp (two roundings instead of one), 1e-7 of the
        # value and far below any 8-bit quantization step; a reciprocal that overflows or is subnormal loses more.
        if not np.all(np.isfinite(r)) or np.any(np.abs(r) < np.finfo(np.float32).tiny):
            continue
        divisor = div.inputs[1]
        assert divisor is not None
        # Unique even when nodes have no names and one divisor serves many Divs (paddle2onnx shares its scalars).
        value = new_constant(graph, f"{divisor.name}_reciprocal_{div.name or div.outputs[0].name}", r)
        x = div.inputs[0]
        assert x is not None
        mul = ir.Node("", "Mul", [x, value], name=div.name)
        graph.insert_before(div, mul)
        _swap_result(graph, div, mul)
        changed = True
    return changed


def _swap_result(graph: ir.Graph, old: ir.Node, new: ir.Node) -> None:
    result = old.outputs[0]
    ir.convenience.replace_all_uses_with(result, new.outputs[0], replace_graph_outputs=True)
    name, result.name = result.name, None
    new.outputs[0].type, new.outputs[0].shape = result.type, result.shape
    graph.remove(old, safe=True)
    new.outputs[0].name = name


def opset_ok(model: ir.Model, target: int) -> bool:
    """Whether declaring opset `target` (at most 17) leaves every node of this opset-13+ model computing what it did."""
    have = model.opset_imports.get("", 0)
    if have >= target:
        return True
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain not in ("", "ai.onnx"):
            continue
        try:
            same = (
                onnx.defs.get_schema(node.op_type, have).since_version
                == onnx.defs.get_schema(node.op_type, target).since_version
            )
        except onnx.defs.SchemaError:
            return False
        # BatchNormalization 14 forbids the training outputs opset 13 allowed in inference.
        bn_ok = node.op_type == "BatchNormalization" and len(node.outputs) == 1
        if not (same or node.op_type in _SAME_UP_TO_17 or bn_ok):
            return False
    return True


def canonicalize(model: ir.Model) -> bool:
    """Div by a constant -> Mul by its reciprocal; decomposed hard-sigmoid -> HardSigmoid; decomposed hard-swish ->
    HardSwish (the model's opset is raised to 14 when that changes no node's meaning; otherwise it stays
    Mul(x, HardSigmoid(x)))."""
    graph = model.graph
    changed = _div_to_mul(graph)
    hard_sigmoid = [ir.AttrFloat32("alpha", SIXTH), ir.AttrFloat32("beta", 0.5)]
    for mul in list(graph):
        if mul.graph is None:  # removed by an earlier match
            continue
        y = _sixth_of(mul)
        if y is None:
            continue
        inner = _private(y)
        if inner is not None and inner.op_type == "Mul":  # (x * Clip(x + 3, 0, 6)) / 6
            for i in (0, 1):
                found = _shifted_clip(inner.inputs[1 - i])
                if found is not None and found[0] is inner.inputs[i]:
                    x, chain = found
                    new = _replace(graph, [*chain, inner, mul], "HardSigmoid", x, hard_sigmoid)
                    _hard_swish_from(graph, new, x)
                    changed = True
                    break
            continue
        found = _shifted_clip(y)
        if found is not None:  # Clip(x + 3, 0, 6) / 6
            _replace(graph, [*found[1], mul], "HardSigmoid", found[0], hard_sigmoid)
            changed = True
    # x * HardSigmoid(x) with hard-swish's constants, from the rewrite above or from the model itself.
    swish = opset_ok(model, 14)
    for mul in list(graph):
        if mul.graph is None or mul.op_type != "Mul" or len(mul.inputs) != 2 or not swish:
            continue
        for i in (0, 1):
            hs = _private(mul.inputs[1 - i])
            if hs is None or hs.op_type != "HardSigmoid" or hs.inputs[0] is not mul.inputs[i]:
                continue
            alpha, beta = hs.attributes.get_float("alpha", 0.2), hs.attributes.get_float("beta", 0.5)
            if np.isclose(alpha, SIXTH, 1e-6, 0.0) and np.isclose(beta, 0.5, 1e-6, 0.0):
                gated = mul.inputs[i]
                assert gated is not None
                _replace(graph, [hs, mul], "HardSwish", gated, [])
                model.opset_imports[""] = max(14, model.opset_imports.get("", 0))
                changed = True
                break
    return changed


def _hard_swish_from(graph: ir.Graph, hs: ir.Node, x: ir.Value) -> None:
    """(x * Clip(x + 3, 0, 6)) / 6 was matched as one HardSigmoid node: make it x * HardSigmoid(x) (the loop at the
    end of canonicalize then makes it a HardSwish when the opset allows)."""
    result = hs.outputs[0]
    gate = ir.Node("", "HardSigmoid", [x], list(hs.attributes.values()), name=f"{hs.name}_gate")
    graph.insert_before(hs, gate)
    mul = ir.Node("", "Mul", [x, gate.outputs[0]], name=hs.name)
    graph.insert_before(hs, mul)
    gate.outputs[0].type, gate.outputs[0].shape = result.type, result.shape
    _swap_result(graph, hs, mul)
