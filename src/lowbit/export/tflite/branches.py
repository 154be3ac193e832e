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


def _branch_model(ctx: Context, graph: onnx.GraphProto, live: list[str], consts: list[str]) -> onnx.ModelProto:
    g = ctx.g
    inputs = [
        helper.make_tensor_value_info(v, ctx.dtypes.get(g.name(v), onnx.TensorProto.FLOAT), ctx.shapes[g.name(v)])
        for v in live
    ]
    inits = list(graph.initializer) + [numpy_helper.from_array(g.consts[g.name(v)], v) for v in consts]
    body = helper.make_graph(list(graph.node), graph.name or "branch", inputs, list(graph.output), inits)
    model = helper.make_model(body, opset_imports=[helper.make_opsetid(d, v) for d, v in ctx.opsets.items()])
    model.ir_version = ctx.ir_version
    return model


def if_(ctx: Context, node: onnx.NodeProto, a: dict[str, Any], kind: str, act: int) -> None:
    from .convert import build_branch

    g = ctx.g
    branches = [a["then_branch"], a["else_branch"]]
    free = list(dict.fromkeys(v for b in branches for v in _reads(b)))
    consts = [v for v in free if g.name(v) in g.consts]
    live = [v for v in free if g.name(v) not in g.consts]
    for v in live:
        if g.name(v) not in ctx.shapes:
            raise fail(node, f"a branch reads {v}, whose shape is unknown")
    cond = ctx.get(g.name(node.input[0]), "f")
    operands = [ctx.get(g.name(v), "f", len(ctx.shapes[g.name(v)]) == 4) for v in live]
    indices, out_shapes = [], []
    for branch in branches:
        sub = build_branch(_branch_model(ctx, branch, live, consts), ctx)
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
    """Inputs given a value at export (a VAD's sample rate) become constants, and an If whose condition then
    depends on constants only gets that condition as a constant, so `inline_constant_ifs` takes its branch."""
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
    known = {t.name for t in proto.graph.initializer}
    cone: list[onnx.NodeProto] = []
    for node in proto.graph.node:  # topological: each node's inputs are known before it
        if node.op_type != "If" and all(i in known for i in node.input if i):
            cone.append(node)
            known.update(node.output)
    conds = [n.input[0] for n in proto.graph.node if n.op_type == "If" and n.input[0] in known - inits]
    conds = [c for c in dict.fromkeys(conds) if c not in {t.name for t in proto.graph.initializer}]
    if not conds:
        return
    import onnxruntime as ort

    graph = helper.make_graph(cone, "cond", [], [helper.make_empty_tensor_value_info(c) for c in conds],
                              list(proto.graph.initializer))  # fmt: skip
    model = helper.make_model(graph, opset_imports=list(proto.opset_import))
    model.ir_version = proto.ir_version
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the cone leaves most initializers unused: ORT would warn about each
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    for c, v in zip(conds, sess.run(None, {})):
        proto.graph.initializer.append(numpy_helper.from_array(np.asarray(v), f"{c}_value"))
        for node in proto.graph.node:
            if node.op_type == "If" and node.input[0] == c:
                node.input[0] = f"{c}_value"


CONVERTERS = {"If": if_}
