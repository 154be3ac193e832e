"""Converters for the layers that carry weights or windows: Conv, Gemm/MatMul, pooling, mean.

Weight layouts: CONV_2D wants OHWI, DEPTHWISE_CONV_2D wants 1HWO, FULLY_CONNECTED wants (out, in). Per-channel
int8 weights put quantized_dimension on the output-channel axis of that layout (0, 3 and 0), zero point 0;
biases are int32 with scale s_in * s_w per channel, as the TFLite quantization spec requires.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx

from ...errors import LowbitError
from ...numerics import quantize, scale_zero_point
from .average import _sum_weight_scale, _sum_weights  # noqa: F401 - tests read both here
from .context import Context, nhwc_axis
from .writer import QuantParams, Tensor

SAME, VALID = 0, 1
# Smaller weights stay float in dynamic-range files (TFLite's converter default): little to save, more error.
HYBRID_MIN_WEIGHTS = 1024


def fail(node: onnx.NodeProto, why: str) -> LowbitError:
    return LowbitError(f"node {node.name or node.output[0]} ({node.op_type}): {why}")


def padding(
    node: onnx.NodeProto,
    a: dict[str, Any],
    in_hw: tuple[int, ...],
    k: tuple[int, ...],
    s: tuple[int, int],
    d: tuple[int, int],
) -> tuple[int, list[int] | None]:
    """TFLite padding mode, plus explicit [top, bottom, left, right] pads when neither SAME nor VALID fits."""
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    same = []
    for i in range(2):
        eff = (k[i] - 1) * d[i] + 1
        total = max((math.ceil(in_hw[i] / s[i]) - 1) * s[i] + eff - in_hw[i], 0)
        same += [total // 2, total - total // 2]
    if auto == "VALID":
        return VALID, None
    if auto == "SAME_UPPER":
        return SAME, None
    if auto == "SAME_LOWER":
        raise fail(node, "auto_pad SAME_LOWER has no TFLite padding mode")
    p = list(a.get("pads", [0, 0, 0, 0]))
    tb_lr = [p[0], p[2], p[1], p[3]]
    if not any(tb_lr):
        return VALID, None
    if tb_lr == same:
        return SAME, None
    return VALID, tb_lr


def _pad(ctx: Context, node: onnx.NodeProto, x: str, kind: str, pads: list[int], lowest: bool = False) -> int:
    """x padded by [top, bottom, left, right]: with real 0, or (`lowest`, for max pooling) the lowest value."""
    n, h, w, c = ctx.shape(x, True)
    shape = (n, h + pads[0] + pads[1], w + pads[2] + pads[3], c)
    t = ctx._tensor(x, kind, shape)
    t.name = f"{node.name or x}_pad"
    out = ctx.fm.add_tensor(t)
    paddings = ctx.const_int([[0, 0], pads[:2], pads[2:], [0, 0]], f"{t.name}_paddings")
    if lowest:
        qx = ctx.quant(x) if kind == "q" else None
        value = (
            ctx.const(f"{t.name}_value", np.array([-128], np.int8), QuantParams(qx.scale, qx.zero_point))
            if qx is not None
            else ctx.const(f"{t.name}_value", np.array([np.finfo(np.float32).min], np.float32))
        )
        ctx.op("PADV2", [ctx.get(x, kind, True), paddings, value], [out])
        return out
    # int8 PAD fills with the tensor's zero point: real 0, as ONNX's zero padding
    ctx.op("PAD", [ctx.get(x, kind, True), paddings], [out])
    return out


def _window(a: dict[str, Any]) -> tuple[tuple[int, int], tuple[int, int]]:
    return tuple(a.get("strides", [1, 1])), tuple(a.get("dilations", [1, 1]))


def conv(ctx: Context, node: onnx.NodeProto, a: dict[str, Any], kind: str, act: int) -> None:
    x, w = node.input[0], node.input[1]
    if w not in ctx.g.consts:
        raise fail(node, "weights computed at run time; TFLite convolutions need constant weights")
    weight = ctx.g.consts[w]
    if weight.ndim != 4:
        raise fail(node, f"{weight.ndim - 2}-D convolution; only 2-D convolutions are exported")
    cout, cin_g, kh, kw = weight.shape
    cin = ctx.shapes[x][1]
    group = a.get("group", 1)
    depthwise = group > 1 and group == cin and cin_g == 1
    if group != 1 and not depthwise:
        raise fail(node, f"grouped convolution (group={group}) is neither plain nor depthwise; TFLite has no form")
    (sh, sw), (dh, dw) = _window(a)
    mode, pads = padding(node, a, ctx.shapes[x][2:], (kh, kw), (sh, sw), (dh, dw))
    xin = _pad(ctx, node, x, kind, pads) if pads else ctx.get(x, kind, True)
    perm = (1, 2, 3, 0) if depthwise else (0, 2, 3, 1)
    wi, bi = weights_and_bias(ctx, node, kind, perm, 0, 3 if depthwise else 0, cout)
    out = ctx.produce(node.output[0], kind, True)
    common = dict(
        padding=mode,
        stride_w=sw,
        stride_h=sh,
        fused_activation_function=act,
        dilation_w_factor=dw,
        dilation_h_factor=dh,
    )
    if depthwise:
        ctx.op(
            "DEPTHWISE_CONV_2D", [xin, wi, bi], [out], "DepthwiseConv2DOptions", depth_multiplier=cout // cin, **common
        )
    else:
        ctx.op("CONV_2D", [xin, wi, bi], [out], "Conv2DOptions", **common)


def weights_and_bias(
    ctx: Context, node: onnx.NodeProto, kind: str, perm: tuple[int, ...], onnx_axis: int, tfl_axis: int, cout: int
) -> tuple[int, int]:
    """A weighted kernel's weight and bias tensors (inputs 1 and 2 of `node`): weights transposed by `perm` into
    TFLite's layout, whose output channels sit on `tfl_axis` (`onnx_axis` in ONNX's). int8: symmetric weights,
    per-channel scales, int32 bias with scale s_in * s_w; float: see _float_weight."""
    x, w = node.input[0], node.input[1]
    b = node.input[2] if len(node.input) > 2 and node.input[2] else None
    name = node.name or node.output[0]
    if kind != "q":
        wi = _float_weight(ctx, w, f"{name}_weights", perm, tfl_axis)
        float_bias = ctx.g.consts[b].astype(np.float32).ravel() if b is not None else np.zeros(cout, np.float32)
        return wi, ctx.const(f"{name}_bias", float_bias)
    qw = ctx.g.qconsts[w]
    if np.any(qw.quant.zero_point != 0) or qw.data.dtype != np.int8:
        raise fail(node, "int8 weights must be symmetric (zero point 0) for TFLite")
    if qw.quant.scale.size > 1 and qw.quant.axis != onnx_axis:
        raise fail(node, "per-channel weight scales must be on the output-channel axis")
    wq = QuantParams(qw.quant.scale, np.zeros_like(qw.quant.zero_point), tfl_axis)
    wi = ctx.const(f"{name}_weights", np.ascontiguousarray(qw.data.transpose(perm)), wq)
    s_w = np.broadcast_to(qw.quant.scale, (cout,)).astype(np.float32)
    qx = ctx.quant(x)
    assert qx is not None  # an int8 kernel's input is quantized
    s_b = (qx.scale.astype(np.float64) * s_w).astype(np.float32)
    if b is not None and b in ctx.g.qconsts:
        bias = ctx.g.qconsts[b].data.astype(np.int32).ravel()
    elif b is not None:  # a float bias next to int8 weights: quantize it with the scale TFLite expects
        bias = np.round(ctx.g.consts[b].ravel() / s_b).astype(np.int32)
    else:
        bias = np.zeros(cout, np.int32)
    return wi, ctx.const(f"{name}_bias", bias, _bias_quant(s_b, qw.quant.scale.size))


def _float_weight(ctx: Context, w: str, label: str, perm: tuple[int, ...], out_axis: int) -> int:
    """Float weights for a float kernel. Weights the quantizer made int8 stay int8 in the file, behind a
    DEQUANTIZE: the same real values as ONNX's DequantizeLinear, at a quarter of the size. With precision
    dynamic, float weights become int8 and the kernel runs hybrid (int8 weights, float activations)."""
    qt = ctx.g.qconsts.get(w)
    if qt is None and ctx.precision == "dynamic" and ctx.g.consts[w].size >= HYBRID_MIN_WEIGHTS:
        return hybrid_weight(ctx, ctx.g.consts[w].astype(np.float32).transpose(perm), label, out_axis)
    if (
        qt is not None
        and ctx.precision == "dynamic"
        and qt.data.dtype == np.int8
        and not qt.quant.zero_point.any()
        and (qt.quant.scale.size == 1 or perm[out_axis] == qt.quant.axis)
    ):  # lowbit's dynamic weights, as they are
        return ctx.const(
            label,
            np.ascontiguousarray(qt.data.transpose(perm)),
            QuantParams(qt.quant.scale, qt.quant.zero_point, out_axis),
        )
    if qt is None or qt.data.dtype != np.int8 or (qt.quant.scale.size > 1 and perm[out_axis] != qt.quant.axis):
        return ctx.const(label, np.ascontiguousarray(ctx.g.consts[w].astype(np.float32).transpose(perm)))
    q = ctx.const(f"{label}_int8", qt.data.transpose(perm), QuantParams(qt.quant.scale, qt.quant.zero_point, out_axis))
    out = ctx.fm.add_tensor(Tensor(label, tuple(ctx.fm.tensors[q].shape), "float32"))
    ctx.op("DEQUANTIZE", [q], [out])
    return out


def hybrid_weight(ctx: Context, data: np.ndarray, label: str, axis: int) -> int:
    """Symmetric int8 weights in [-127, 127], one scale per output channel, as TFLite's hybrid kernels take."""
    reduce = tuple(i for i in range(data.ndim) if i != axis)
    scale, zp = scale_zero_point(data.min(axis=reduce), data.max(axis=reduce), "int8", symmetric=True, narrow=True)
    q = quantize(data, scale, zp, "int8", axis=axis, narrow=True)
    return ctx.const(label, np.ascontiguousarray(q), QuantParams(scale, zp.astype(np.int64), axis))


def _bias_quant(s_b: np.ndarray, weight_scales: int) -> QuantParams:
    # bias scales mirror the weights': one per channel, or one for the tensor (XNNPACK rejects a mismatch)
    s_b = s_b if weight_scales > 1 else s_b[:1]
    return QuantParams(s_b, np.zeros(s_b.size, np.int64), 0)


def fully_connected(ctx: Context, node: onnx.NodeProto, a: dict[str, Any], kind: str, act: int) -> None:
    x, w = node.input[0], node.input[1]
    b = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if w not in ctx.g.consts:
        raise fail(node, "second operand computed at run time; only constant weights map to FULLY_CONNECTED")
    gemm = node.op_type == "Gemm"
    if gemm and (a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0 or a.get("transA", 0)):
        raise fail(node, "alpha/beta other than 1 or transA=1 have no FULLY_CONNECTED form")
    trans = gemm and a.get("transB", 0)
    weight = ctx.g.consts[w]
    if weight.ndim != 2:
        raise fail(node, f"weights of rank {weight.ndim}; FULLY_CONNECTED needs a 2-D weight")
    out_axis = 0 if trans else 1
    weight = weight if trans else weight.T
    cout = weight.shape[0]
    if b is not None and ctx.g.consts[b].size != cout:
        raise fail(node, "bias does not have one value per output; FULLY_CONNECTED cannot broadcast it")
    xin = ctx.get(x, kind, False)
    wi, bi = weights_and_bias(ctx, node, kind, (0, 1) if trans else (1, 0), out_axis, 0, cout)
    out = ctx.produce(node.output[0], kind, False)
    ctx.op(
        "FULLY_CONNECTED",
        [xin, wi, bi],
        [out],
        "FullyConnectedOptions",
        fused_activation_function=act,
        keep_num_dims=len(ctx.shapes[node.output[0]]) > 2,
        asymmetric_quantize_inputs=ctx.fm.tensors[wi].dtype == "int8" and kind == "f",
    )


def _ceil_is_same(a: dict[str, Any], p: list[int], in_hw: Any, out_hw: Any, k: tuple, s: tuple) -> bool:
    """ONNX ceil_mode average pooling without pads (count_include_pad 0) is TFLite's SAME padding when SAME gives
    the same output size and puts all its padding after the input (at most one row/column in total)."""
    if any(p) or a.get("count_include_pad", 0):
        return False
    for i in range(2):
        total = (out_hw[i] - 1) * s[i] + k[i] - in_hw[i]
        if out_hw[i] != math.ceil(in_hw[i] / s[i]) or not 0 <= total <= 1:
            return False
    return True


def pool(ctx: Context, node: onnx.NodeProto, a: dict[str, Any], kind: str, act: int) -> None:
    x = node.input[0]
    if len(ctx.shapes[x]) != 4:
        raise fail(node, "only 2-D pooling is exported")
    k = tuple(a["kernel_shape"])
    (sh, sw), d = _window(a)
    if tuple(d) != (1, 1):
        raise fail(node, "dilated pooling has no TFLite form")
    average = node.op_type == "AveragePool"
    p = list(a.get("pads", [0, 0, 0, 0]))
    # ceil_mode: the last window may hang over the end; the extra rows/columns are what ONNX's output size needs
    in_hw, out_hw = ctx.shapes[x][2:], ctx.shapes[node.output[0]][2:]
    extra = [max((out_hw[i] - 1) * s + k[i] - (in_hw[i] + p[i] + p[i + 2]), 0) for i, s in enumerate((sh, sw))]
    if any(extra) and average and not _ceil_is_same(a, p, in_hw, out_hw, k, (sh, sw)):
        raise fail(
            node,
            "ceil_mode average pooling whose windows over the end are not TFLite's SAME padding (windows over "
            "the end average fewer values) has no TFLite form",
        )
    pads: list[int] | None
    if any(extra) and average:  # SAME averages only the values inside, as ONNX's ceil_mode windows do
        mode, pads = SAME, None
    else:
        mode, pads = padding(node, a, in_hw, k, (sh, sw), (1, 1))
    if not average and (pads or any(extra)):  # max pooling: pad with the lowest value, then VALID
        mode, pads = VALID, [p[0], p[2] + extra[0], p[1], p[3] + extra[1]]
    elif average and a.get("count_include_pad", 0) and any(p):  # zeros count: pad explicitly, then VALID
        mode, pads = VALID, [p[0], p[2], p[1], p[3]]
    elif pads:
        raise fail(node, "padding that is neither SAME nor VALID; TFLite pooling cannot express it")
    if pads and not average:
        xin = _pad(ctx, node, x, kind, pads, lowest=True)
    else:
        xin = _pad(ctx, node, x, kind, pads) if pads else ctx.get(x, kind, True)
    out = ctx.produce(node.output[0], kind, True)
    ctx.op(
        "AVERAGE_POOL_2D" if average else "MAX_POOL_2D",
        [xin],
        [out],
        "Pool2DOptions",
        padding=mode,
        stride_w=sw,
        stride_h=sh,
        filter_width=k[1],
        filter_height=k[0],
        fused_activation_function=act,
    )


def _global_average_as_sum(ctx: Context, node: onnx.NodeProto, kind: str) -> bool:
    """An int8 GlobalAveragePool as a FULLY_CONNECTED summing each channel's H*W values with all-ones weights
    (TRANSPOSE to channels first, RESHAPE to (N*C, H*W), FULLY_CONNECTED, RESHAPE to (N, 1, 1, C)): the int32 sum,
    scaled in float32 and rounded once, as ONNX Runtime's QLinearGlobalAveragePool computes it. LiteRT's int8 MEAN
    rounds twice (sum * si/so to an integer, then that divided by the count) and put 1 in 2500 of MobileNetV3-
    Large's squeeze-excite averages one step off (a DEPTHWISE_CONV_2D with an H x W kernel gives the same integers,
    but ran MobileNetV3-Small 8x slower). False when it does not apply (float, sizes not fixed)."""
    x, y = node.input[0], node.output[0]
    shape = ctx.shapes[x]
    if kind != "q" or len(shape) != 4 or not all(isinstance(v, int) and v > 0 for v in shape):
        return False
    b, c, h, w = shape
    qx, qy = ctx.quant(x), ctx.quant(y)
    if qx is None or qy is None or qx.scale.size != 1 or qy.scale.size != 1:
        return False
    si, so = np.float32(qx.scale.ravel()[0]), np.float32(qy.scale.ravel()[0])
    found = _sum_weights(si, so, h * w, int(qx.zero_point.ravel()[0]), int(qy.zero_point.ravel()[0]))
    if found is None:
        return False
    k, sw = found
    name = node.name or y
    rows = ctx._tensor(x, kind, (b * c, h * w), f"{name}_rows")
    rows_i = ctx.fm.add_tensor(rows)
    src = ctx.get(x, kind)  # in its own layout; an NHWC map is put channels first here, as part of this form
    if ctx.nhwc[x]:
        cfirst = ctx.fm.add_tensor(ctx._tensor(x, kind, (b, c, h, w), f"{name}_channels_first"))
        ctx.op("TRANSPOSE", [src, ctx.const_int([0, 3, 1, 2], f"{name}_perm")], [cfirst])
        src = cfirst
    # -1 rows: LiteRT's resize_tensor_input can still change the batch
    ctx.op("RESHAPE", [src, ctx.const_int([-1, h * w], f"{name}_rows_shape")], [rows_i])
    wi = ctx.const(f"{name}_ones", np.full((1, h * w), k, np.int8), QuantParams(np.array([sw]), np.zeros(1, np.int64)))
    s_b = np.array([np.float32(qx.scale.ravel()[0]) * sw], np.float32)
    bi = ctx.const(f"{name}_bias", np.zeros(1, np.int32), _bias_quant(s_b, 1))
    sums = ctx.fm.add_tensor(ctx._tensor(y, kind, (b * c, 1), f"{name}_sums"))
    ctx.op("FULLY_CONNECTED", [rows_i, wi, bi], [sums], "FullyConnectedOptions", fused_activation_function=0,
           keep_num_dims=False, asymmetric_quantize_inputs=False)  # fmt: skip
    out = ctx.produce(y, kind, True)
    ctx.op("RESHAPE", [sums, ctx.const_int([-1, 1, 1, c], f"{name}_shape")], [out])
    return True


def mean(ctx: Context, node: onnx.NodeProto, a: dict[str, Any], kind: str, act: int) -> None:
    x, y = node.input[0], node.output[0]
    if node.op_type == "GlobalAveragePool" and _global_average_as_sum(ctx, node, kind):
        return
    rank = len(ctx.shapes[x])
    axes: list[int] | None
    if node.op_type == "GlobalAveragePool":
        axes, keep = list(range(2, rank)), 1
    else:
        axes = (
            list(a["axes"])
            if "axes" in a
            else ([int(v) for v in ctx.g.consts[node.input[1]]] if len(node.input) > 1 and node.input[1] else None)
        )
        if axes is None:
            axes = list(range(rank))
        keep = a.get("keepdims", 1)
    axes = [v + rank if v < 0 else v for v in axes]
    nhwc = ctx.nhwc.get(x, False)
    if nhwc and not keep:
        rest = [v for v in (0, 2, 3, 1) if v not in axes]
        nhwc = rest == sorted(rest)  # else the kept dims come out in another order: reduce in ONNX layout
    tfl_axes = [nhwc_axis(v, rank) if nhwc else v for v in axes]
    xin = ctx.get(x, kind, nhwc)
    out = ctx.produce(y, kind, nhwc and bool(keep))
    if not keep and nhwc:
        ctx.nhwc[y] = False
    ctx.op(
        "MEAN",
        [xin, ctx.const_int(sorted(tfl_axes), f"{node.name or y}_axes")],
        [out],
        "ReducerOptions",
        keep_dims=bool(keep),
    )
