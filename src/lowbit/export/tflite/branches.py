"""`If` on a run-time condition (a VAD's sample rate) -> TFLite's IF with one subgraph per branch.

An ONNX branch reads outer values by name; a TFLite subgraph gets them as inputs. So each branch becomes a model
of its own: its inputs are the outer values either branch reads (the same list for both, as IF passes the same
tensors to whichever runs), outer constants become its initializers, and it is converted like any model
(`convert.build_branch`). The IF op passes float tensors (4-D maps NHWC) both ways; inside, a branch runs int8
as its Q/DQ pairs say, with a QUANTIZE / DEQUANTIZE at its edges where the values are int8 (what the QDQ model
computes, one rounding each). (An `If` on a constant is inlined before conversion: `rewrite.inline_constant_ifs`.)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...errors import LowbitError
from .context import Context
from .layers import fail
from .qdq import Graph


def _reads(graph: onnx.GraphProto) -> list[str]:
    """Values a branch reads from outside (nested subgraphs included), in order of first use."""
    inner = {t.name for t in graph.initializer} | {i.name for i in graph.input}
    seen: dict[str, None] = {}
    for node in graph.node:
        names = list(node.input)
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                names += _reads(a.g)
        for n in names:
            if n and n not in inner:
                seen.setdefault(n, None)
        inner.update(node.output)
    return list(seen)


def expose_reads(g: Graph) -> None:
    """Each If's outer values become inputs after its condition: passes that count uses (fusing an activation,
    dropping a Reshape nothing reads) and rename values then see what the branches read."""
    for node in g.nodes:
        if node.op_type != "If":
            continue
        branches = [helper.get_attribute_value(a) for a in node.attribute if a.name in ("then_branch", "else_branch")]
        names = list(dict.fromkeys(v for b in branches for v in _reads(b)))
        node.name = node.name or node.output[0]
        g.reads[node.name] = names
        node.input.extend(g.name(v) for v in names)


def _branch_model(ctx: Context, graph: onnx.GraphProto, pairs: list[tuple[str, str]]) -> onnx.ModelProto:
    """The branch as a model: each (name in the branch, outer value) an input, or an initializer if constant."""
    g = ctx.g
    inputs = [
        helper.make_tensor_value_info(v, ctx.dtypes.get(outer, onnx.TensorProto.FLOAT), ctx.shapes[outer])
        for v, outer in pairs
        if outer not in g.consts
    ]
    inits = list(graph.initializer) + [numpy_helper.from_array(g.consts[o], v) for v, o in pairs if o in g.consts]
    body = helper.make_graph(list(graph.node), graph.name or "branch", inputs, list(graph.output), inits)
    model = helper.make_model(body, opset_imports=[helper.make_opsetid(d, v) for d, v in ctx.opsets.items()])
    model.ir_version = ctx.ir_version
    return model


def if_(ctx: Context, node: onnx.NodeProto, a: dict[str, Any], kind: str, act: int) -> None:
    from .convert import build_branch

    g = ctx.g
    branches = [a["then_branch"], a["else_branch"]]
    pairs = list(zip(g.reads[node.name], node.input[1:]))  # (name in the branches, the value now)
    for v, outer in pairs:
        if outer not in g.consts and outer not in ctx.shapes:
            raise fail(node, f"a branch reads {v}, whose shape is unknown")
    c = node.input[0]  # a condition folded from fixed sizes is a constant: IF takes it as one
    cond = ctx.const(f"{c}_cond", np.asarray(g.consts[c]).astype(bool).reshape(1)) if c in g.consts else ctx.get(c, "f")
    operands = [ctx.get(o, "f", len(ctx.shapes[o]) == 4) for _, o in pairs if o not in g.consts]
    indices, out_shapes = [], []
    for branch in branches:
        sub = build_branch(_branch_model(ctx, branch, pairs), ctx)
        prefix = f"{node.name or node.output[0]}/{branch.name or 'branch'}"
        ctx.float_nodes += [f"{prefix}/{n}" for n in sub.float_nodes]
        ctx.fallbacks += [f"{prefix}/{n}" for n in sub.fallbacks]
        ctx.transposes += sub.transposes
        ctx.fm.subgraphs.append(sub.fm)
        if sub.quantized and not ctx.quantized:  # a model whose whole body sits in an If is an int8 model
            ctx.quantized, ctx.precision = True, sub.precision
        indices.append(len(ctx.fm.subgraphs))  # subgraph 0 is the main one
        out_shapes.append([sub.shapes[sub.g.name(o.name)] for o in branch.output])
    for y, a, b in zip(node.output, *out_shapes):
        if tuple(a) != tuple(b):  # the graph after the If has one set of fixed sizes
            raise fail(
                node,
                f"its branches give {y} sizes {tuple(a)} and {tuple(b)}, and a .tflite has fixed sizes; fix the "
                "input its condition reads with --value NAME=V to export the branch that value takes",
            )
    outs = [ctx.produce(y, "f", True) for y in node.output]
    ctx.op("IF", [cond, *operands], outs, "IfOptions", then_subgraph_index=indices[0], else_subgraph_index=indices[1])


def fix_inputs(proto: onnx.ModelProto, values: dict[str, Any]) -> None:
    """Inputs given a value at export (a VAD's sample rate) become constants (`resolve_conditions` then settles an
    If on them)."""
    inits = {t.name for t in proto.graph.initializer}
    inputs = {vi.name: vi for vi in proto.graph.input if vi.name not in inits}
    for name, value in values.items():
        if name not in inputs:
            raise LowbitError(f"--value {name}: the model has no input {name} (inputs: {', '.join(inputs)})")
        vi = inputs[name]
        arr = np.asarray(value, helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))
        dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
        if arr.ndim != len(dims) or any(d is not None and d != n for d, n in zip(dims, arr.shape)):
            raise LowbitError(f"--value {name}: a value of shape {arr.shape} for an input of shape {dims}")
        proto.graph.input.remove(vi)
        proto.graph.initializer.append(numpy_helper.from_array(arr, name))


def resolve_conditions(proto: onnx.ModelProto) -> bool:
    """An If whose condition is computed from constants only gets it as a constant (evaluated in ONNX Runtime),
    so `inline_constant_ifs` takes its branch. Returns whether any changed."""
    inits = {t.name for t in proto.graph.initializer}
    known = set(inits)
    producer: dict[str, onnx.NodeProto] = {}
    for node in proto.graph.node:  # topological: each node's inputs are known before it
        pure = node.op_type != "If" and not any(a.type == onnx.AttributeProto.GRAPH for a in node.attribute)
        if pure and all(i in known for i in node.input if i):
            known.update(node.output)
            producer.update((o, node) for o in node.output)
    conds = list(dict.fromkeys(n.input[0] for n in proto.graph.node if n.op_type == "If" and n.input[0] in known))
    conds = [c for c in conds if c not in inits]
    if not conds:
        return False
    needed: dict[int, onnx.NodeProto] = {}  # only what the conditions are computed from
    todo = list(conds)
    while todo:
        node = producer.get(todo.pop())
        if node is not None and id(node) not in needed:
            needed[id(node)] = node
            todo += [i for i in node.input if i]
    cone = [n for n in proto.graph.node if id(n) in needed]
    used = {i for n in cone for i in n.input}
    import onnxruntime as ort

    graph = helper.make_graph(cone, "cond", [], [helper.make_empty_tensor_value_info(c) for c in conds],
                              [t for t in proto.graph.initializer if t.name in used])  # fmt: skip
    model = helper.make_model(graph, opset_imports=list(proto.opset_import))
    model.ir_version = proto.ir_version
    try:
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        values = sess.run(None, {})
    except Exception:  # noqa: BLE001 - not computable here: the If stays, and converts as an IF
        return False
    for c, v in zip(conds, values):
        proto.graph.initializer.append(numpy_helper.from_array(np.asarray(v), f"{c}_value"))
        for node in proto.graph.node:
            if node.op_type == "If" and node.input[0] == c:
                node.input[0] = f"{c}_value"
    return True


def settle_on_sizes(proto: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> bool:
    """With every size fixed, an If on a shape (Silero's "is the input 2-D or 3-D") has a constant condition:
    Shape nodes become constants and such Ifs keep their taken branch. Returns whether an If went."""
    from .rewrite import inline_constant_ifs

    if not any(n.op_type == "If" for n in proto.graph.node):
        return False
    for k, node in enumerate(proto.graph.node):
        if node.op_type == "Shape" and node.input[0] in shapes:
            a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
            value = np.asarray(shapes[node.input[0]], np.int64)[a.get("start", 0) : a.get("end")]
            const = helper.make_node(
                "Constant", [], [node.output[0]], name=node.name, value=numpy_helper.from_array(value)
            )
            proto.graph.node[k].CopyFrom(const)
    changed = False
    while resolve_conditions(proto) | inline_constant_ifs(proto):
        changed = True
    return changed


CONVERTERS = {"If": if_}
