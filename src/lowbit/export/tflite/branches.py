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

import onnx
from onnx import helper, numpy_helper

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
    indices = []
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
    outs = [ctx.produce(y, "f", True) for y in node.output]
    ctx.op("IF", [cond, *operands], outs, "IfOptions", then_subgraph_index=indices[0], else_subgraph_index=indices[1])


CONVERTERS = {"If": if_}
