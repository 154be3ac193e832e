"""Converters for decoder-style spatial ops: ConvTranspose (TRANSPOSE_CONV), Resize (RESIZE_BILINEAR /
RESIZE_NEAREST_NEIGHBOR), standalone Pad (PAD / PADV2 / MIRROR_PAD) and Slice (STRIDED_SLICE), float and int8,
on NHWC maps."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from .context import TO_NHWC, Context
from .layers import fail, weights_and_bias

SAME, VALID = 0, 1


def _text(a: dict[str, Any], key: str, default: str) -> str:
    v = a.get(key, default)
    return v.decode() if isinstance(v, bytes) else v


def conv_transpose(ctx: Context, node: onnx.NodeProto, a: dict[str, Any], kind: str, act: int) -> None:
    """ONNX scatters each input pixel through the kernel, then crops pads[begin] / pads[end]. TFLite crops
    nothing at the top with VALID and floor(total / 2) with SAME, and takes the output size as given."""
    x, w, y = node.input[0], node.input[1], node.output[0]
    if w not in ctx.g.consts or ctx.g.consts[w].ndim != 4:
        raise fail(node, "only 2-D transposed convolutions with constant weights are exported")
    if a.get("group", 1) != 1 or any(d != 1 for d in a.get("dilations", [1, 1])):
        raise fail(node, "grouped or dilated transposed convolution has no TFLite form")
    _, cout, kh, kw = ctx.g.consts[w].shape
    sh, sw = a.get("strides", [1, 1])
    in_hw, out_hw = ctx.shapes[x][2:], ctx.shapes[y][2:]
    pads = list(a.get("pads", [0, 0, 0, 0]))
    if "output_shape" in a or _text(a, "auto_pad", "NOTSET") != "NOTSET":
        pads = []  # ONNX derives the pads from the output size: recover them from the scatter size
        for i, (k, s) in enumerate(((kh, sh), (kw, sw))):
            total = (in_hw[i] - 1) * s + k - out_hw[i]
            pads.append(total // 2 if _text(a, "auto_pad", "SAME_UPPER") != "SAME_LOWER" else total - total // 2)
        pads += [0, 0]
    modes: set[int | None] = set()
    for i, (k, s) in enumerate(((kh, sh), (kw, sw))):
        total = (in_hw[i] - 1) * s + k - out_hw[i]  # what TFLite crops in all, from top and bottom
        if total == 0 and pads[i] == 0 and in_hw[i] == out_hw[i] == 1:
            continue  # the unit axis of an expanded 1-D op: SAME and VALID agree
        if pads[i] == 0:
            modes.add(VALID)
        elif pads[i] == total // 2 and total >= 0:
            modes.add(SAME)
        else:
            modes.add(None)
    modes = modes or {VALID}
    if len(modes) != 1 or None in modes:
        raise fail(
            node,
            f"pads {list(a.get('pads', []))} crop the output in a way TFLite's TRANSPOSE_CONV "
            "(VALID or SAME) cannot express",
        )
    name = node.name or y
    # (Cin, Cout, kH, kW) -> (Cout, kH, kW, Cin)
    wi, bi = weights_and_bias(ctx, node, kind, (1, 2, 3, 0), 1, 0, cout)
    shape = ctx.const_int(list(ctx.shape(y, True)), f"{name}_output_shape")
    xin = ctx.get(x, kind, True)
    out = ctx.produce(y, kind, True)
    ctx.op(
        "TRANSPOSE_CONV",
        [shape, wi, xin, bi],
        [out],
        "TransposeConvOptions",
        padding=modes.pop(),
        stride_w=sw,
        stride_h=sh,
        fused_activation_function=act,
    )


def _onnx_nearest(out: int, size_in: int, scale: float, a: dict[str, Any]) -> np.ndarray | None:
    """ONNX Resize's source index for each output index along one axis (nearest mode)."""
    i = np.arange(out, dtype=np.float64)
    mode = _text(a, "coordinate_transformation_mode", "half_pixel")
    src = {
        "half_pixel": (i + 0.5) / scale - 0.5,
        "pytorch_half_pixel": (i + 0.5) / scale - 0.5 if out > 1 else 0 * i,
        "align_corners": i * (size_in - 1) / (out - 1) if out > 1 else 0 * i,
        "asymmetric": i / scale,
        "tf_half_pixel_for_nn": (i + 0.5) / scale,
    }.get(mode)
    if src is None:
        return None
    rounding = _text(a, "nearest_mode", "round_prefer_floor")
    idx = {
        "round_prefer_floor": np.ceil(src - 0.5),
        "round_prefer_ceil": np.floor(src + 0.5),
        "floor": np.floor(src),
        "ceil": np.ceil(src),
    }[rounding]
    return np.clip(idx, 0, size_in - 1).astype(np.int64)


def _tflite_nearest(out: int, size_in: int, align_corners: bool, half_pixel: bool) -> np.ndarray:
    """TFLite RESIZE_NEAREST_NEIGHBOR's source index (reference kernel arithmetic, float32)."""
    scale = np.float32((size_in - 1) / (out - 1) if align_corners and out > 1 else size_in / out)
    v = (np.arange(out, dtype=np.float32) + np.float32(0.5 if half_pixel else 0)) * scale
    idx = np.floor(v + np.float32(0.5)) if align_corners else np.floor(v)  # TfLiteRound: ties away from 0, v >= 0
    return np.clip(idx, 0, size_in - 1).astype(np.int64)


LINEAR_MODES = {
    "half_pixel": (False, True),
    "pytorch_half_pixel": (False, True),
    "align_corners": (True, False),
    "asymmetric": (False, False),
}


def resize(ctx: Context, node: onnx.NodeProto, a: dict[str, Any], kind: str, act: int) -> None:
    x, y = node.input[0], node.output[0]
    xs, ys = ctx.shapes[x], ctx.shapes[y]
    if len(xs) != 4 or xs[:2] != ys[:2]:
        raise fail(node, "only resizing the two spatial axes of a 4-D map maps to TFLite")
    mode, coord = _text(a, "mode", "nearest"), _text(a, "coordinate_transformation_mode", "half_pixel")
    if a.get("antialias", 0) or mode == "cubic":
        raise fail(node, f"{'antialiased' if a.get('antialias', 0) else 'cubic'} resize has no TFLite kernel")
    given = ctx.g.consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    scales = [ys[i] / xs[i] for i in (2, 3)] if given is None or given.size == 0 else list(given[2:])
    if mode == "linear":
        if coord not in LINEAR_MODES or (coord == "pytorch_half_pixel" and min(ys[2:]) == 1):
            raise fail(
                node,
                f"coordinate_transformation_mode {coord} has no TFLite RESIZE_BILINEAR form "
                "(half_pixel, pytorch_half_pixel, align_corners and asymmetric do)",
            )
        if any(abs(s - o / i) > 1e-6 * s for s, o, i in zip(scales, ys[2:], xs[2:])):
            raise fail(node, "scales that differ from output/input size; TFLite resizes by sizes")
        align, half = LINEAR_MODES[coord]
        op, options = "RESIZE_BILINEAR", "ResizeBilinearOptions"
    else:
        for align, half in ((False, False), (False, True), (True, False)):
            ok = all(
                (m := _onnx_nearest(ys[i], xs[i], scales[i - 2], a)) is not None
                and np.array_equal(m, _tflite_nearest(ys[i], xs[i], align, half))
                for i in (2, 3)
            )
            if ok:
                break
        else:
            raise fail(
                node,
                f"nearest resize with coordinate_transformation_mode {coord} and nearest_mode "
                f"{_text(a, 'nearest_mode', 'round_prefer_floor')} picks other source pixels than "
                "any TFLite RESIZE_NEAREST_NEIGHBOR setting",
            )
        op, options = "RESIZE_NEAREST_NEIGHBOR", "ResizeNearestNeighborOptions"
    size = ctx.const_int(list(ys[2:]), f"{node.name or y}_size")
    xin = ctx.get(x, kind, True)
    ctx.op(op, [xin, size], [ctx.produce(y, kind, True)], options, align_corners=align, half_pixel_centers=half)


def pad(ctx: Context, node: onnx.NodeProto, a: dict[str, Any], kind: str, act: int) -> None:
    x, y = node.input[0], node.output[0]
    rank = len(ctx.shapes[x])
    pads = [int(v) for v in (a["pads"] if "pads" in a else ctx.g.consts[node.input[1]])]
    axes = list(range(rank))
    if len(node.input) > 3 and node.input[3]:
        axes = [int(v) % rank for v in ctx.g.consts[node.input[3]]]
    pairs = [[0, 0] for _ in range(rank)]
    for j, ax in enumerate(axes):
        pairs[ax] = [pads[j], pads[j + len(axes)]]
    if min(pads) < 0:
        raise fail(node, "negative pads (cropping) are not exported")
    mode = _text(a, "mode", "constant")
    nhwc = ctx.nhwc.get(x, False)
    if nhwc:
        pairs = [pairs[i] for i in (0, 2, 3, 1)]
    paddings = ctx.const_int(pairs, f"{node.name or y}_paddings")
    xin = ctx.get(x, kind, nhwc)
    out = ctx.produce(y, kind, nhwc)
    value = a.get("value", 0.0)
    if len(node.input) > 2 and node.input[2]:
        value = float(np.asarray(ctx.g.consts[node.input[2]]).ravel()[0])
    if mode == "reflect":
        ctx.op("MIRROR_PAD", [xin, paddings], [out], "MirrorPadOptions", mode=0)
    elif mode != "constant":
        raise fail(node, f"pad mode {mode} has no TFLite kernel (constant and reflect do)")
    elif value == 0:
        ctx.op("PAD", [xin, paddings], [out])  # int8 PAD fills with the zero point: real 0
    elif kind == "q":
        raise fail(node, "an int8 pad with a non-zero constant")
    else:
        ctx.op("PADV2", [xin, paddings, ctx.const(f"{node.name or y}_value", np.array(value, np.float32))], [out])


def slice_(ctx: Context, node: onnx.NodeProto, a: dict[str, Any], kind: str, act: int) -> None:
    """Slice with constant starts/ends/axes/steps -> STRIDED_SLICE over every axis (in NHWC for 4-D maps)."""
    x, y = node.input[0], node.output[0]
    dims = ctx.shapes[x]
    rank = len(dims)

    def const(i: int) -> list[int] | None:
        if len(node.input) <= i or not node.input[i]:
            return None
        if node.input[i] not in ctx.g.consts:
            raise fail(node, "slice bounds computed at run time; TFLite's STRIDED_SLICE needs constants")
        return [int(v) for v in np.asarray(ctx.g.consts[node.input[i]]).ravel()]

    starts, ends = const(1) or a.get("starts", []), const(2) or a.get("ends", [])
    axes = const(3) or a.get("axes", list(range(len(starts))))
    steps = const(4) or [1] * len(starts)
    begin, end, stride = [0] * rank, list(dims), [1] * rank
    end_mask = 0
    for s0, e0, ax, st in zip(starts, ends, axes, steps):
        ax = ax % rank
        if st == 0:
            raise fail(node, "a slice step of 0")
        n = dims[ax]
        b, e = (s0 + n if s0 < 0 else s0), (e0 + n if e0 < 0 else e0)
        if st > 0:
            b, e = min(max(b, 0), n), min(max(e, 0), n)
        else:
            b, e = min(max(b, -1), n - 1), min(max(e, -1), n - 1)
            if e == -1:  # up to and including index 0: TFLite would read -1 as the last index
                end_mask |= 1 << ax
        begin[ax], end[ax], stride[ax] = b, e, st
    nhwc = ctx.nhwc.get(x, False) and rank == 4
    if nhwc:
        begin, end, stride = ([v[i] for i in TO_NHWC] for v in (begin, end, stride))
        end_mask = sum(1 << i for i, src in enumerate(TO_NHWC) if end_mask >> src & 1)
    label = node.name or y
    xin = ctx.get(x, kind, nhwc)
    ctx.op(
        "STRIDED_SLICE",
        [xin, ctx.const_int(begin, f"{label}_begin"), ctx.const_int(end, f"{label}_end")]
        + [ctx.const_int(stride, f"{label}_strides")],
        [ctx.produce(y, kind, nhwc)],
        "StridedSliceOptions",
        end_mask=end_mask,
    )


CONVERTERS = {"ConvTranspose": conv_transpose, "Resize": resize, "Pad": pad, "Slice": slice_}
