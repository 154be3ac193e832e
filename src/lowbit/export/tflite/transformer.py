"""Converters that transformer graphs need: embeddings (GATHER), attention (BATCH_MATMUL), LayerNormalization,
GELU, reductions, and the mask arithmetic exporters leave (CAST, comparisons, logic, SELECT_V2, BROADCAST_TO).

These run in float (int8 where noted); 4-D values here are attention maps and masks, kept in ONNX's order.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from .context import DTYPES, Context
from .layers import fail, fully_connected, hybrid_weight
from .qdq import Graph
from .writer import QuantParams, Tensor

# Converters here with int8 TFLite kernels; the rest run in float inside quantized graphs.
INT8_OK = {"MatMul", "Gather", "Gelu", "Expand", "Elu"}  # Elu: TFLite ELU has an int8 (table) kernel


def operand(ctx: Context, node: onnx.NodeProto, name: str, kind: str) -> int:
    """An input in ONNX's own order: a constant placed here, or an activation."""
    if name in ctx.g.consts:
        return ctx.const(f"{node.name or node.output[0]}_{name}", np.asarray(ctx.g.consts[name]))
    return ctx.get(name, kind, False)


def _emit(
    ctx: Context,
    node: onnx.NodeProto,
    op: str,
    inputs: list[int],
    kind: str = "f",
    options: str | None = None,
    **fields: Any,
) -> int:
    out = ctx.produce(node.output[0], kind, False)
    ctx.op(op, inputs, [out], options, **fields)
    return out


def batch_matmul_kind(kind: str) -> str:
    """Two int8 activations multiply in float: DEQUANTIZE -> float BATCH_MATMUL -> QUANTIZE. LiteRT's int8
    BATCH_MATMUL (XNNPACK and its built-in kernel alike) put 0.36% of a MiniLM attention context's outputs one step
    from ONNX Runtime's QLinearMatMul, up to 0.003 of a step from a half step, and MiniLM amplifies such steps; the
    float product of the same integers gave ONNX Runtime's integers on all (tests/test_tflite_batch_matmul.py)."""
    return "f" if kind == "q" else kind


# Off: two int8 activations multiply as dequantized floats (the exporter before this rule; tests compare the two).
INTEGER_MATMUL = True


def integer_matmul(ctx: Context, node: onnx.NodeProto) -> bool:
    """QLinearMatMul as ONNX Runtime computes it: the int32 sum of (qa - za)(qb - zb), times float32(sa * sb / sy),
    rounded once. Written as CAST -> ADD -za -> float BATCH_MATMUL (the sums are integers below 2**24, so float32
    holds them exactly, in any order) -> MUL -> QUANTIZE to scale 1 with y's zero point -> RESHAPE onto y's tensor
    (the same integers; only the scale they stand for changes). The dequantized product rounds each term and the
    sum in float. False (nothing written) when a sum could reach 2**24."""
    a, b, y = node.input[0], node.input[1], node.output[0]
    qa, qb, qy = ctx.quant(a), ctx.quant(b), ctx.quant(y)
    if qa is None or qb is None or qy is None or any(q.scale.size != 1 for q in (qa, qb, qy)):
        return False
    depth = ctx.shapes[a][-1]
    reach = [max(127 - int(q.zero_point[0]), int(q.zero_point[0]) + 128) for q in (qa, qb)]
    if depth * reach[0] * reach[1] >= 2**24:
        return False
    name = node.name or y
    ints = []
    for v, q in ((a, qa), (b, qb)):
        wide = ctx.fm.add_tensor(Tensor(f"{name}_{v}_float", ctx.shapes[v], "float32"))
        ctx.op("CAST", [ctx.get(v, "q", False)], [wide])
        if int(q.zero_point[0]):
            centered = ctx.fm.add_tensor(Tensor(f"{name}_{v}_centered", ctx.shapes[v], "float32"))
            zero = ctx.const(f"{name}_{v}_zero", np.array([-float(q.zero_point[0])], np.float32))
            ctx.op("ADD", [wide, zero], [centered], "AddOptions", fused_activation_function=0)
            wide = centered
        ints.append(wide)
    shape = ctx.shapes[y]
    acc = ctx.fm.add_tensor(Tensor(f"{name}_sum", shape, "float32"))
    options = {"adj_x": False, "adj_y": False, "asymmetric_quantize_inputs": False}
    ctx.op("BATCH_MATMUL", ints, [acc], "BatchMatMulOptions", **options)
    scale = np.float32(np.float32(qa.scale[0]) * np.float32(qb.scale[0])) / np.float32(qy.scale[0])
    scaled = ctx.fm.add_tensor(Tensor(f"{name}_scaled", shape, "float32"))
    ctx.op("MUL", [acc, ctx.const(f"{name}_multiplier", np.array([scale], np.float32))], [scaled], "MulOptions",
           fused_activation_function=0)  # fmt: skip
    unit = QuantParams(np.array([1.0], np.float32), np.asarray(qy.zero_point[:1]))
    rounded = ctx.fm.add_tensor(Tensor(f"{name}_rounded", shape, "int8", quant=unit))
    ctx.op("QUANTIZE", [scaled], [rounded])
    out = ctx.produce(y, "q", False)
    ctx.op("RESHAPE", [rounded, ctx.const_int(list(shape), f"{name}_shape")], [out])
    return True


def matmul(ctx: Context, node: onnx.NodeProto, a: dict[str, Any], kind: str, act: int) -> None:
    """Constant 2-D weights: FULLY_CONNECTED; two activations (attention scores, context): BATCH_MATMUL."""
    if node.input[1] in ctx.g.consts and ctx.g.consts[node.input[1]].ndim == 2:
        return fully_connected(ctx, node, a, kind, act)
    if act:
        raise fail(node, "internal: BATCH_MATMUL has no fused activation")
    if kind == "q" and INTEGER_MATMUL and integer_matmul(ctx, node):
        return
    kind = batch_matmul_kind(kind)
    ins = [operand(ctx, node, i, kind) for i in node.input[:2]]
    _emit(
        ctx,
        node,
        "BATCH_MATMUL",
        ins,
        kind,
        "BatchMatMulOptions",
        adj_x=False,
        adj_y=False,
        asymmetric_quantize_inputs=False,
    )


def gather(ctx: Context, node: onnx.NodeProto, a: dict[str, Any], kind: str, act: int) -> None:
    data, idx = node.input[0], node.input[1]
    axis = a.get("axis", 0) % len(ctx.shapes.get(data, ctx.g.consts.get(data, np.zeros(0)).shape))
    if data in ctx.g.consts and kind == "f" and ctx.precision == "dynamic" and ctx.g.consts[data].ndim == 2:
        # embedding tables: int8 rows (one scale each) in the file, DEQUANTIZE'd once when the model loads
        q = hybrid_weight(ctx, ctx.g.consts[data].astype(np.float32), f"{node.name}_table_int8", 0)
        table = ctx.fm.add_tensor(ctx._tensor(node.output[0], "f", ctx.fm.tensors[q].shape, f"{node.name}_table"))
        ctx.op("DEQUANTIZE", [q], [table])
    else:
        table = operand(ctx, node, data, kind)
    if idx in ctx.g.consts:
        # TFLite's GATHER has no negative indices. A copy per node: one constant -1 may index axes of other sizes
        # (the romanizer decoder's last prefix token and its last attention row)
        k = np.asarray(ctx.g.consts[idx])
        idx = f"{node.name or node.output[0]}_indices"
        ctx.g.consts[idx] = np.where(k < 0, k + ctx.fm.tensors[table].shape[axis], k)
    _emit(ctx, node, "GATHER", [table, operand(ctx, node, idx, "f")], kind, "GatherOptions", axis=axis, batch_dims=0)


def layer_norm(ctx: Context, node: onnx.NodeProto, a: dict[str, Any], kind: str, act: int) -> None:
    """(x - mean) * rsqrt(var + eps) * gamma + beta over the trailing axes, in six float ops."""
    x, y = node.input[0], node.output[0]
    rank = len(ctx.shapes[x])
    axes = list(range(a.get("axis", -1) % rank, rank))
    name = node.name or y
    xin = ctx.get(x, "f", False)
    axes_t = ctx.const_int(axes, f"{name}_axes")
    reduced = tuple(1 if i in axes else d for i, d in enumerate(ctx.shapes[x]))

    def tmp(label: str, shape: tuple[int, ...]) -> int:
        return ctx.fm.add_tensor(ctx._tensor(y, "f", shape, f"{name}_{label}"))

    mean, diff, var, inv, norm = (
        tmp("mean", reduced),
        tmp("centered", ctx.shapes[x]),
        tmp("var", reduced),
        tmp("rstd", reduced),
        tmp("norm", ctx.shapes[x]),
    )
    ctx.op("MEAN", [xin, axes_t], [mean], "ReducerOptions", keep_dims=True)
    ctx.op("SUB", [xin, mean], [diff], "SubOptions", fused_activation_function=0)
    sq = tmp("squared", ctx.shapes[x])
    ctx.op("MUL", [diff, diff], [sq], "MulOptions", fused_activation_function=0)
    ctx.op("MEAN", [sq, axes_t], [var], "ReducerOptions", keep_dims=True)
    eps = ctx.const(f"{name}_epsilon", np.float32(a.get("epsilon", 1e-5)).reshape(1))
    var_eps = tmp("var_eps", reduced)
    ctx.op("ADD", [var, eps], [var_eps], "AddOptions", fused_activation_function=0)
    ctx.op("RSQRT", [var_eps], [inv])
    ctx.op("MUL", [diff, inv], [norm], "MulOptions", fused_activation_function=0)
    out = norm
    if len(node.input) > 1 and node.input[1]:
        out2 = tmp("scaled", ctx.shapes[x])
        ctx.op("MUL", [out, operand(ctx, node, node.input[1], "f")], [out2], "MulOptions", fused_activation_function=0)
        out = out2
    final = ctx.produce(y, "f", False)
    if len(node.input) > 2 and node.input[2]:
        ctx.op("ADD", [out, operand(ctx, node, node.input[2], "f")], [final], "AddOptions", fused_activation_function=0)
    else:
        ctx.op("RESHAPE", [out, ctx.const_int(list(ctx.shapes[y]), f"{name}_shape")], [final])


def gelu(ctx: Context, node: onnx.NodeProto, a: dict[str, Any], kind: str, act: int) -> None:
    approx = a.get("approximate", "none")
    approx = approx.decode() if isinstance(approx, bytes) else approx
    x, y = node.input[0], node.output[0]
    xin = ctx.get(x, kind)  # elementwise: in whatever layout x has (a 1-D conv chain stays NHWC, chain1d.py)
    out = ctx.produce(y, kind, ctx.nhwc[x])
    if kind == "q" and "table" in a:  # the int8 ONNX's own integers, looked up: x + 128 indexes the table
        shape = ctx.shape(x)
        name = node.name or y
        wide = ctx.fm.add_tensor(Tensor(f"{name}_index_int32", shape, "int32"))
        index = ctx.fm.add_tensor(Tensor(f"{name}_index", shape, "int32"))
        ctx.op("CAST", [xin], [wide])
        offset = ctx.const_int([128], f"{name}_offset")
        ctx.op("ADD", [wide, offset], [index], "AddOptions", fused_activation_function=0)
        table = ctx.const(f"{name}_table", numpy_helper.to_array(a["table"]), quant=ctx.quant(y))
        ctx.op("GATHER", [table, index], [out], "GatherOptions", axis=0, batch_dims=0)
        return
    ctx.op("GELU", [xin], [out], "GeluOptions", approximate=approx == "tanh")


def unary_math(ctx: Context, node: onnx.NodeProto, a: dict[str, Any], kind: str, act: int) -> None:
    op = {
        "Sqrt": "SQRT",
        "Exp": "EXP",
        "Log": "LOG",
        "Neg": "NEG",
        "Abs": "ABS",
        "Not": "LOGICAL_NOT",
        "Reciprocal": None,
        "Elu": "ELU",
    }[node.op_type]
    if node.op_type == "Elu" and not np.isclose(a.get("alpha", 1.0), 1.0):  # TFLite's ELU has alpha 1
        raise fail(node, f"alpha {a['alpha']:g} has no TFLite equivalent (ELU's is 1)")
    x = ctx.get(node.input[0], kind, False)
    if op is None:  # 1 / x
        _emit(
            ctx,
            node,
            "DIV",
            [ctx.const(f"{node.name}_one", np.float32(1).reshape(1)), x],
            kind,
            "DivOptions",
            fused_activation_function=0,
        )
    else:
        _emit(ctx, node, op, [x], kind)


def elementwise(ctx: Context, node: onnx.NodeProto, a: dict[str, Any], kind: str, act: int) -> None:
    """Comparisons, logic, select, pow and max/min over operands in ONNX's order (broadcasting as ONNX)."""
    op = {
        "Equal": "EQUAL",
        "Greater": "GREATER",
        "GreaterOrEqual": "GREATER_EQUAL",
        "Less": "LESS",
        "LessOrEqual": "LESS_EQUAL",
        "And": "LOGICAL_AND",
        "Or": "LOGICAL_OR",
        "Where": "SELECT_V2",
        "Pow": "POW",
        "Max": "MAXIMUM",
        "Min": "MINIMUM",
    }[node.op_type]
    if node.op_type == "Pow" and node.input[1] in ctx.g.consts and float(np.asarray(ctx.g.consts[node.input[1]])) == 2:
        x = ctx.get(node.input[0], kind, False)
        _emit(ctx, node, "MUL", [x, x], kind, "MulOptions", fused_activation_function=0)
        return
    if node.op_type in ("Max", "Min") and len(node.input) != 2:
        raise fail(node, f"{len(node.input)} operands; only two map to {op}")
    _emit(ctx, node, op, [operand(ctx, node, i, kind) for i in node.input], kind)


def cast(ctx: Context, node: onnx.NodeProto, a: dict[str, Any], kind: str, act: int) -> None:
    to = DTYPES.get(a["to"])
    if to is None:
        raise fail(node, f"cast to ONNX type {a['to']} has no TFLite tensor type")
    _emit(ctx, node, "CAST", [ctx.get(node.input[0], "f", False)], "f")


def expand(ctx: Context, node: onnx.NodeProto, a: dict[str, Any], kind: str, act: int) -> None:
    shape = ctx.const_int(list(ctx.shapes[node.output[0]]), f"{node.name}_shape")
    _emit(ctx, node, "BROADCAST_TO", [operand(ctx, node, node.input[0], kind), shape], kind)


def reduce(ctx: Context, node: onnx.NodeProto, a: dict[str, Any], kind: str, act: int) -> None:
    """ReduceSum / ReduceMax / ReduceL2 (as sqrt of the sum of squares) in ONNX's order."""
    x, y = node.input[0], node.output[0]
    rank = len(ctx.shapes[x])
    axes = (
        list(a["axes"])
        if "axes" in a
        else (
            [int(v) for v in ctx.g.consts[node.input[1]]]
            if len(node.input) > 1 and node.input[1]
            else list(range(rank))
        )
    )
    keep = bool(a.get("keepdims", 1))
    axes_t = ctx.const_int(sorted(v % rank for v in axes), f"{node.name or y}_axes")
    xin = ctx.get(x, kind, False)
    if node.op_type == "ReduceL2":
        sq = ctx.fm.add_tensor(ctx._tensor(y, "f", ctx.shapes[x], f"{node.name or y}_squared"))
        ctx.op("MUL", [xin, xin], [sq], "MulOptions", fused_activation_function=0)
        total = ctx.fm.add_tensor(ctx._tensor(y, "f", ctx.shapes[y], f"{node.name or y}_sum"))
        ctx.op("SUM", [sq, axes_t], [total], "ReducerOptions", keep_dims=keep)
        _emit(ctx, node, "SQRT", [total])
        return
    op = {"ReduceSum": "SUM", "ReduceMax": "REDUCE_MAX", "ReduceMin": "REDUCE_MIN", "ReduceProd": "REDUCE_PROD"}
    _emit(ctx, node, op[node.op_type], [xin, axes_t], kind, "ReducerOptions", keep_dims=keep)


def dequantize(ctx: Context, node: onnx.NodeProto, a: dict[str, Any], kind: str, act: int) -> None:
    """DequantizeLinear of integers computed at run time (rows gathered from an int8 table): (q - z) * s."""
    x, y = node.input[0], node.output[0]
    name = node.name or y
    rank = len(ctx.shapes[x])
    scale = np.asarray(ctx.g.consts[node.input[1]], np.float32)
    zp = np.asarray(ctx.g.consts[node.input[2]] if len(node.input) > 2 and node.input[2] else 0, np.float32)
    if scale.size > 1:  # per-axis: shape the parameters to broadcast along that axis
        shape = [1] * rank
        shape[a.get("axis", 1) % rank] = scale.size
        scale, zp = scale.reshape(shape), np.broadcast_to(zp, scale.shape).reshape(shape)
    value = ctx.fm.add_tensor(ctx._tensor(y, "f", ctx.shapes[x], f"{name}_float"))
    ctx.op("CAST", [ctx.get(x, "f", False)], [value])
    if zp.any():
        centered = ctx.fm.add_tensor(ctx._tensor(y, "f", ctx.shapes[x], f"{name}_centered"))
        ctx.op(
            "SUB",
            [value, ctx.const(f"{name}_zero_point", zp.reshape(scale.shape))],
            [centered],
            "SubOptions",
            fused_activation_function=0,
        )
        value = centered
    _emit(
        ctx,
        node,
        "MUL",
        [value, ctx.const(f"{name}_scale", scale.reshape(scale.shape or (1,)))],
        "f",
        "MulOptions",
        fused_activation_function=0,
    )


def fuse_bias(g: Graph, graph_outputs: set[str]) -> None:
    """Float MatMul(x, W) + b (b one value per output column) becomes one FULLY_CONNECTED with a bias, as
    exporters split nn.Linear. Quantized ones stay apart: the MatMul output has its own int8 parameters."""
    producer = {o: n for n in g.nodes for o in n.output}
    uses = Counter(i for n in g.nodes for i in n.input)
    drop = set()
    for add in g.nodes:
        if add.op_type != "Add" or add.output[0] in g.quant:
            continue
        for mm_out, b in ((add.input[0], add.input[1]), (add.input[1], add.input[0])):
            mm = producer.get(mm_out)
            if (
                mm is None
                or mm.op_type != "MatMul"
                or len(mm.input) != 2
                or uses[mm_out] != 1
                or mm_out in graph_outputs
                or mm_out in g.quant
                or b not in g.consts
                or b in g.qconsts
                or mm.input[1] not in g.consts
                or g.consts[mm.input[1]].ndim != 2
            ):
                continue
            if g.consts[b].size != g.consts[mm.input[1]].shape[1] or g.consts[b].shape[-1:] != (g.consts[b].size,):
                continue
            mm.input.append(b)
            mm.output[0] = add.output[0]
            drop.add(id(add))
            break
    g.nodes = [n for n in g.nodes if id(n) not in drop]


CONVERTERS = {
    "MatMul": matmul,
    "Gather": gather,
    "LayerNormalization": layer_norm,
    "Gelu": gelu,
    "Sqrt": unary_math,
    "Exp": unary_math,
    "Elu": unary_math,
    "Log": unary_math,
    "Neg": unary_math,
    "Abs": unary_math,
    "Not": unary_math,
    "Reciprocal": unary_math,
    "Equal": elementwise,
    "Greater": elementwise,
    "GreaterOrEqual": elementwise,
    "Less": elementwise,
    "LessOrEqual": elementwise,
    "And": elementwise,
    "Or": elementwise,
    "Where": elementwise,
    "Pow": elementwise,
    "Max": elementwise,
    "Min": elementwise,
    "Cast": cast,
    "Expand": expand,
    "DequantizeLinear": dequantize,
    "ReduceSum": reduce,
    "ReduceMax": reduce,
    "ReduceMin": reduce,
    "ReduceProd": reduce,
    "ReduceL2": reduce,
}
