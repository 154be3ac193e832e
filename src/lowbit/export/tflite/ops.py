"""Converters for elementwise ops, activations and data movement, and the table of all converters.

Each converter gets the node, its attributes, the number kind it runs in ("f" float32 or "q" int8) and the
fused activation code, places its constants and emits TFLite operators through the Context.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx

from . import branches, spatial, transformer
from .context import TO_NCHW, TO_NHWC, Context, nhwc_axis
from .layers import conv, fail, fully_connected, mean, pool
from .writer import QuantParams

NONE, RELU, RELU_N1_TO_1, RELU6 = 0, 1, 2, 3


def _uses_nhwc(ctx: Context, names: list[str]) -> bool:
    return any(ctx.nhwc.get(n, False) for n in names if n not in ctx.g.consts)


def _const_operand(ctx: Context, node: onnx.NodeProto, name: str, kind: str, rank: int, nhwc: bool) -> int:
    """A constant operand broadcast to the op's rank and, in NHWC graphs, permuted like the activations."""
    qt = ctx.g.qconsts.get(name) if kind == "q" else None
    data = qt.data if qt is not None else ctx.g.consts[name].astype(np.float32)
    if kind == "q" and qt is None:
        raise fail(node, "a float constant operand in an int8 op")
    data = data.reshape((1,) * (rank - data.ndim) + data.shape) if data.ndim < rank else data
    if nhwc and data.ndim == 4:
        data = data.transpose(TO_NHWC)
    quant = None
    if qt is not None:
        if qt.quant.scale.size != 1:
            raise fail(node, "a per-channel constant operand; TFLite elementwise ops take one scale")
        quant = QuantParams(qt.quant.scale, qt.quant.zero_point)
    return ctx.const(f"{node.name or node.output[0]}_{name}", np.ascontiguousarray(data), quant)


def binary(ctx: Context, node: onnx.NodeProto, a: dict[str, Any], kind: str, act: int) -> None:
    y = node.output[0]
    rank = len(ctx.shapes[y])
    nhwc = rank == 4 and _uses_nhwc(ctx, list(node.input))
    inputs = []
    for name in node.input:
        if name in ctx.g.consts:
            inputs.append(_const_operand(ctx, node, name, kind, rank, nhwc))
        elif nhwc and len(ctx.shapes[name]) != 4 and int(np.prod(ctx.shapes[name])) != 1:
            raise fail(node, "broadcasting a lower-rank tensor against an NHWC map is not exported")
        else:
            inputs.append(ctx.get(name, kind, nhwc))
    op, options = {
        "Add": ("ADD", "AddOptions"),
        "Sub": ("SUB", "SubOptions"),
        "Mul": ("MUL", "MulOptions"),
        "Div": ("DIV", "DivOptions"),
    }[node.op_type]
    out = ctx.produce(y, kind, nhwc)
    ctx.op(op, inputs, [out], options, fused_activation_function=act)


def clip_bounds(ctx: Context, node: onnx.NodeProto, a: dict[str, Any]) -> tuple[float, float]:
    if node.op_type == "Relu":
        return 0.0, float("inf")
    lo, hi = a.get("min", -np.inf), a.get("max", np.inf)
    if len(node.input) > 1 and node.input[1]:
        lo = float(ctx.g.consts[node.input[1]])
    if len(node.input) > 2 and node.input[2]:
        hi = float(ctx.g.consts[node.input[2]])
    return float(lo), float(hi)


def fused_code(bounds: tuple[float, float]) -> int | None:
    return {(0.0, float("inf")): RELU, (0.0, 6.0): RELU6, (-1.0, 1.0): RELU_N1_TO_1}.get(bounds)


def clip(ctx: Context, node: onnx.NodeProto, a: dict[str, Any], kind: str, act: int) -> None:
    x, y = node.input[0], node.output[0]
    code = fused_code(clip_bounds(ctx, node, a))
    xin = ctx.get(x, kind)
    out = ctx.produce(y, kind, ctx.nhwc[x])
    if code is not None:
        ctx.op({RELU: "RELU", RELU6: "RELU6", RELU_N1_TO_1: "RELU_N1_TO_1"}[code], [xin], [out])
        return
    lo, hi = clip_bounds(ctx, node, a)
    name = node.name or y
    if kind == "q":
        _int8_clip(ctx, node, xin, out, lo, hi)
        return
    mid = xin
    if lo > -np.inf:  # one-sided clips (a floor under a divisor) need one op
        mid = out if hi == np.inf else ctx.fm.add_tensor(ctx._tensor(y, kind, ctx.shape(y), f"{name}_max"))
        ctx.op("MAXIMUM", [xin, ctx.const(f"{name}_lo", np.float32(lo).reshape(1))], [mid])
    if hi < np.inf or mid == xin:
        ctx.op("MINIMUM", [mid, ctx.const(f"{name}_hi", np.float32(hi).reshape(1))], [out])


def _int8_clip(ctx: Context, node: onnx.NodeProto, xin: int, out: int, lo: float, hi: float) -> None:
    """Clip(x, lo, hi) in int8 (a floor under a divisor: mean pooling's clamp(min=1e-9)). Quantizing is monotone,
    so Q_y(clip(x, lo, hi)) = clip(Q_y(x), Q_y(lo), Q_y(hi)): requantize to the output's parameters first (if
    they differ), then MAXIMUM / MINIMUM against int8 constants with those parameters, which is what ONNX
    Runtime's DQ -> Clip -> Q computes, exactly."""
    x, y = node.input[0], node.output[0]
    qx, qy = ctx.quant(x), ctx.quant(y)
    assert qx is not None and qy is not None  # kind "q": both quantized
    if qy.scale.size != 1:
        raise fail(node, "a per-channel int8 clip output")
    scale, zp = float(qy.scale[0]), int(qy.zero_point[0])
    bounds = [
        (op, int(np.clip(np.round(np.float32(v) / np.float32(scale)) + zp, -128, 127)))
        for op, v in (("MAXIMUM", lo), ("MINIMUM", hi))
        if np.isfinite(v)
    ]
    # a bound at the end of int8's range clips nothing the int8 type does not clip already
    steps = [(op, b) for op, b in bounds if (op == "MAXIMUM" and b > -128) or (op == "MINIMUM" and b < 127)]
    same = np.array_equal(qx.scale, qy.scale) and np.array_equal(qx.zero_point, qy.zero_point)
    shape = ctx.shape(y)
    label = node.name or y
    cur = xin
    if not same:
        cur = out if not steps else ctx.fm.add_tensor(ctx._tensor(y, "q", shape, f"{label}_requant"))
        # rescaled from float32, as ONNX Runtime does (LiteRT's int8 -> int8 QUANTIZE put 6 of 512 values a step off)
        ctx.op("QUANTIZE", [ctx.get(node.input[0], "f") if REQUANTIZE_IN_FLOAT else xin], [cur])
    if not steps and same:  # the clip is the int8 range itself: a copy
        ctx.op("RESHAPE", [cur, ctx.const_int(list(shape), f"{label}_shape")], [out])
        return
    for k, (op, b) in enumerate(steps):
        dst = out if k == len(steps) - 1 else ctx.fm.add_tensor(ctx._tensor(y, "q", shape, f"{label}_{op.lower()}"))
        const = ctx.const(f"{label}_{op.lower()}_bound", np.array([b], np.int8), QuantParams(qy.scale, qy.zero_point))
        ctx.op(op, [cur, const], [dst])
        cur = dst


def unary(ctx: Context, node: onnx.NodeProto, a: dict[str, Any], kind: str, act: int) -> None:
    x, y = node.input[0], node.output[0]
    op = {"Sigmoid": "LOGISTIC", "HardSwish": "HARD_SWISH", "Tanh": "TANH"}[node.op_type]
    if op == "HARD_SWISH" and kind == "q":
        # DEQUANTIZE -> float HARD_SWISH -> QUANTIZE, as the QDQ model computes it in ONNX Runtime (one rounding).
        # LiteRT 2.3's XNNPACK delegate does not take int8 HARD_SWISH: each one split the graph (MobileNetV3-Small:
        # 20 partitions, 1.3x float latency), and its fixed-point kernel put 1.8% of outputs one step off.
        kind = "f"
    xin = ctx.get(x, kind)
    ctx.op(op, [xin], [ctx.produce(y, kind, ctx.nhwc[x])])


def prelu(ctx: Context, node: onnx.NodeProto, a: dict[str, Any], kind: str, act: int) -> None:
    """PRelu as TFLite's float PRELU, its slope broadcast and laid out like the input. In an int8 graph it runs
    between DEQUANTIZE and QUANTIZE, as the QDQ model computes it (lowbit keeps PRelu float, slope unrounded)."""
    x, slope, y = node.input[0], node.input[1], node.output[0]
    if slope not in ctx.g.consts:
        raise fail(node, "a computed slope")
    rank = len(ctx.shapes[y])
    nhwc = rank == 4 and _uses_nhwc(ctx, [x])
    alpha = _const_operand(ctx, node, slope, "f", rank, nhwc)
    ctx.op("PRELU", [ctx.get(x, "f", nhwc), alpha], [ctx.produce(y, "f", nhwc)])


def softmax(ctx: Context, node: onnx.NodeProto, a: dict[str, Any], kind: str, act: int) -> None:
    x, y = node.input[0], node.output[0]
    rank = len(ctx.shapes[x])
    axis = a.get("axis", -1)
    axis = axis + rank if axis < 0 else axis
    xin = ctx.get(x, kind, False)
    if axis == rank - 1:
        ctx.op("SOFTMAX", [xin], [ctx.produce(y, kind, False)], "SoftmaxOptions", beta=1.0)
        return
    # TFLite's SOFTMAX works on the last axis only: swap the axis there and back (ultralytics' DFL head, a softmax
    # over the 16 bins on axis 1 of [N, 16, 4, A], in every YOLOv8/YOLO11 export; the swap is its own inverse).
    perm = list(range(rank))
    perm[axis], perm[-1] = rank - 1, axis
    swapped = tuple(ctx.shape(x, False)[i] for i in perm)
    name = node.name or y
    last_in = ctx.fm.add_tensor(ctx._tensor(x, kind, swapped, f"{x}_softmax_last"))
    ctx.op("TRANSPOSE", [xin, ctx.const_int(perm, f"{name}_perm")], [last_in])
    last_out = ctx.fm.add_tensor(ctx._tensor(y, kind, swapped, f"{y}_softmax_last"))
    ctx.op("SOFTMAX", [last_in], [last_out], "SoftmaxOptions", beta=1.0)
    ctx.op("TRANSPOSE", [last_out, ctx.const_int(perm, f"{name}_perm_back")], [ctx.produce(y, kind, False)])


def log_softmax(ctx: Context, node: onnx.NodeProto, a: dict[str, Any], kind: str, act: int) -> None:
    """LogSoftmax over the last axis (a decoder's log-probabilities); lowbit leaves it float, so only float is
    written (int8 LOG_SOFTMAX has fixed output parameters 16/256, 127 that lowbit does not choose)."""
    x, y = node.input[0], node.output[0]
    rank = len(ctx.shapes[x])
    axis = a.get("axis", -1)
    axis = axis + rank if axis < 0 else axis
    if axis != rank - 1:
        raise fail(node, f"log-softmax over axis {axis} of {rank}; TFLite's LOG_SOFTMAX works on the last axis only")
    if kind == "q":
        raise fail(node, "an int8 LogSoftmax; TFLite's int8 LOG_SOFTMAX needs output scale 16/256, zero point 127")
    ctx.op("LOG_SOFTMAX", [ctx.get(x, kind, False)], [ctx.produce(y, kind, False)], "LogSoftmaxOptions")


def _same_order(shape: tuple[int, ...]) -> bool:
    """An NCHW map whose NHWC bytes are in the same order (H*W == 1 or C == 1): reshape needs no transpose."""
    return len(shape) == 4 and (shape[2] * shape[3] == 1 or shape[1] == 1)


def reshape(ctx: Context, node: onnx.NodeProto, a: dict[str, Any], kind: str, act: int) -> None:
    x, y = node.input[0], node.output[0]
    keep_nhwc = ctx.nhwc.get(x, False) and _same_order(ctx.shapes[x])
    xin = ctx.get(x, kind, True if keep_nhwc else False)
    # a (N, C, 1, 1) vector joins NHWC maps (squeeze-excite); a (N, 1, H, W) one only if it came from one (not masks)
    out_nhwc = _same_order(ctx.shapes[y]) and (keep_nhwc or ctx.shapes[y][2] * ctx.shapes[y][3] == 1)
    out = ctx.produce(y, kind, out_nhwc)
    shape = list(ctx.shape(y, out_nhwc))
    if shape and ctx.shapes[x] and shape[0] == ctx.shapes[x][0]:
        shape[0] = -1  # keeps the batch axis free, so LiteRT's resize_tensor_input works through it
    ctx.op("RESHAPE", [xin, ctx.const_int(shape, f"{node.name or y}_shape")], [out])


def transpose(ctx: Context, node: onnx.NodeProto, a: dict[str, Any], kind: str, act: int) -> None:
    x, y = node.input[0], node.output[0]
    perm = a.get("perm", list(reversed(range(len(ctx.shapes[x])))))
    if len(perm) == 4 and tuple(perm) in (TO_NCHW, TO_NHWC):
        # A layout change (tf2onnx's NHWC <-> NCHW around convs): y in one layout is x in the other, as it is.
        to_nchw = tuple(perm) == TO_NCHW
        ctx.alias(y, kind, to_nchw, ctx.get(x, kind, not to_nchw))
        return
    xin = ctx.get(x, kind, False)
    out = ctx.produce(y, kind, False)
    ctx.op("TRANSPOSE", [xin, ctx.const_int(perm, f"{node.name or y}_perm")], [out])


def concat(ctx: Context, node: onnx.NodeProto, a: dict[str, Any], kind: str, act: int) -> None:
    y = node.output[0]
    rank = len(ctx.shapes[y])
    live = [n for n in node.input if n not in ctx.g.consts]
    nhwc = rank == 4 and all(ctx.nhwc.get(n, False) for n in live)
    axis = nhwc_axis(a["axis"], rank) if nhwc else a["axis"] % rank
    inputs = []
    for k, n in enumerate(node.input):
        if n in live:
            inputs.append(ctx.get(n, kind, nhwc))
            continue
        # a constant block (a detector's grid offsets): in int8 stored with the output's parameters
        data = ctx.g.consts[n].astype(np.float32)
        data = data.transpose(TO_NHWC) if nhwc else data
        q = ctx.quant(y) if kind == "q" else None
        if q is not None:
            data = np.clip(np.round(data / q.scale[0]) + q.zero_point[0], -128, 127).astype(np.int8)
        inputs.append(ctx.const(f"{node.name or y}_{k}", np.ascontiguousarray(data), q))
    ctx.op(
        "CONCATENATION",
        inputs,
        [ctx.produce(y, kind, nhwc)],
        "ConcatenationOptions",
        axis=axis,
        fused_activation_function=act,
    )


REQUANTIZE_IN_FLOAT = True


def identity(ctx: Context, node: onnx.NodeProto, a: dict[str, Any], kind: str, act: int) -> None:
    """Identity, or a second quantization of one tensor (QDQ requantize): QUANTIZE rescales int8 -> int8."""
    x, y = node.input[0], node.output[0]
    if kind == "q" and REQUANTIZE_IN_FLOAT:
        # DEQUANTIZE -> QUANTIZE: ONNX Runtime rescales (q - z) * s_in in float32; LiteRT's int8 -> int8 QUANTIZE
        # rescales with a fixed-point multiplier and rounds apart near half steps (docs/tflite.md)
        out = ctx.produce(y, kind, ctx.nhwc[x])
        ctx.op("QUANTIZE", [ctx.get(x, "f")], [out])
        return
    xin = ctx.get(x, kind)
    out = ctx.produce(y, kind, ctx.nhwc[x])
    ctx.op(
        "QUANTIZE" if kind == "q" else "RESHAPE",
        [xin] if kind == "q" else [xin, ctx.const_int(list(ctx.shape(y)), f"{y}_shape")],
        [out],
    )


Converter = Callable[[Context, onnx.NodeProto, dict, str, int], None]
CONVERTERS: dict[str, Converter] = {
    "Conv": conv,
    "Gemm": fully_connected,
    "MatMul": fully_connected,
    "Add": binary,
    "Sub": binary,
    "Mul": binary,
    "Div": binary,
    "AveragePool": pool,
    "MaxPool": pool,
    "GlobalAveragePool": mean,
    "ReduceMean": mean,
    "Relu": clip,
    "Clip": clip,
    "Sigmoid": unary,
    "HardSwish": unary,
    "Tanh": unary,
    "PRelu": prelu,
    "Softmax": softmax,
    "LogSoftmax": log_softmax,
    "Reshape": reshape,
    "Flatten": reshape,
    "Squeeze": reshape,
    "Unsqueeze": reshape,
    "Transpose": transpose,
    "Concat": concat,
    "Identity": identity,
    **transformer.CONVERTERS,
    **spatial.CONVERTERS,
    **branches.CONVERTERS,
}
# Ops that may absorb a following Relu/Clip as fused_activation_function.
FUSES = {"Conv", "Gemm", "MatMul", "Add", "Sub", "Mul", "AveragePool", "MaxPool", "Concat"}
# Ops whose int8 TFLite kernels need the same scale and zero point on input and output.
SAME_PARAMS = {
    "MaxPool",
    "AveragePool",
    "Reshape",
    "Flatten",
    "Squeeze",
    "Unsqueeze",
    "Transpose",
    "Concat",
    "Gather",
    "Expand",
    "Resize",
    "Pad",
    "Slice",
}
# Ops without an int8 kernel in TFLite's builtin resolver.
FLOAT_ONLY = {"Div"} | set(transformer.CONVERTERS) - transformer.INT8_OK
# int8 kernels with fixed output parameters: (scale, zero point).
FIXED_OUTPUT = {"Softmax": (1 / 256, -128), "Sigmoid": (1 / 256, -128), "Tanh": (1 / 128, 0)}
