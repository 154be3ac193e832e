"""Graph rewrites before conversion: forms with no one-op TFLite equivalent become ones that have one.

They work on the read Graph (compute nodes plus int8 annotations), so the converters stay one op -> one kernel:
- a 1-D Conv / ConvTranspose becomes the 2-D one on an expanded axis, between two Reshapes;
- a BatchNormalization that no conv absorbed becomes a 1x1 depthwise Conv (per-channel scale and shift, one
  kernel; in int8 its weights are exact: each channel's multiplier is +-127 times a scale of |w| / 127);
- Split becomes one Slice per output; a float constant operand of an int8 Add/Sub/Mul gets int8 parameters;
- an If with a constant condition becomes its taken branch (on the ONNX graph, before shapes are probed);
- where TFLite's int8 kernel needs the same parameters on input and output (Reshape, Concat, pooling...) or fixes
  the output's (LOGISTIC, SOFTMAX, TANH) but lowbit chose others, an Identity between the two parameter sets,
  which the identity converter writes as QUANTIZE int8 -> int8 (a requantize).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .ops import FIXED_OUTPUT, SAME_PARAMS
from .qdq import Graph, QTensor
from .writer import QuantParams


class Names:
    """Fresh value names, stable across runs (same model -> same bytes)."""

    def __init__(self, g: Graph, shapes: dict[str, tuple[int, ...]]) -> None:
        self.used = set(shapes) | set(g.consts) | {o for n in g.nodes for o in n.output}

    def __call__(self, base: str) -> str:
        name, i = base, 0
        while name in self.used:
            i += 1
            name = f"{base}_{i}"
        self.used.add(name)
        return name


def same(a: QuantParams, b: QuantParams) -> bool:
    return bool(np.allclose(a.scale, b.scale, rtol=1e-6) and np.array_equal(a.zero_point, b.zero_point))


def new_value(g: Graph, shapes: dict, dtypes: dict, new: str, like: str, shape: tuple[int, ...]) -> str:
    """Register `new` as a value shaped `shape` with the number type and int8 parameters of `like`."""
    shapes[new] = tuple(shape)
    if like in dtypes:
        dtypes[new] = dtypes[like]
    if like in g.quant:
        g.quant[new] = g.quant[like]
    return new


def _reshape(g: Graph, names: Names, x: str, y: str, shape: tuple[int, ...], label: str) -> onnx.NodeProto:
    target = names(f"{label}_shape")
    g.consts[target] = np.asarray(shape, np.int64)
    return helper.make_node("Reshape", [x, target], [y], name=label)


def expand_1d(g: Graph, shapes: dict, dtypes: dict) -> None:
    """Conv / ConvTranspose over one spatial axis -> the 2-D op over (L, 1): TFLite has only 2-D kernels."""
    names = Names(g, shapes)
    out: list[onnx.NodeProto] = []
    for node in g.nodes:
        w = node.input[1] if len(node.input) > 1 else ""
        if node.op_type not in ("Conv", "ConvTranspose") or w not in g.consts or g.consts[w].ndim != 3:
            out.append(node)
            continue
        label = node.name or node.output[0]
        x, y = node.input[0], node.output[0]
        x4 = new_value(g, shapes, dtypes, names(f"{x}_2d"), x, (*shapes[x], 1))
        y4 = new_value(g, shapes, dtypes, names(f"{y}_2d"), y, (*shapes[y], 1))
        w4 = names(f"{w}_2d")
        g.consts[w4] = g.consts[w][..., None]
        if w in g.qconsts:
            qt = g.qconsts[w]
            g.qconsts[w4] = QTensor(qt.data[..., None], qt.quant)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        for key, extra in (("kernel_shape", 1), ("strides", 1), ("dilations", 1), ("output_padding", 0)):
            if key in attrs:
                attrs[key] = [*attrs[key], extra]
        if "pads" in attrs:
            attrs["pads"] = [attrs["pads"][0], 0, attrs["pads"][1], 0]
        if "output_shape" in attrs:
            attrs["output_shape"] = [*attrs["output_shape"], 1]
        conv = helper.make_node(node.op_type, [x4, w4, *node.input[2:]], [y4], name=label, **attrs)
        out += [_reshape(g, names, x, x4, shapes[x4], f"{label}_expand"), conv]
        out.append(_reshape(g, names, y4, y, shapes[y], f"{label}_squeeze"))
    g.nodes = out


def batchnorm(g: Graph, shapes: dict, dtypes: dict) -> None:
    """BatchNormalization (inference) -> y = x * w + b per channel, as a 1x1 depthwise Conv on a 4-D map."""
    names = Names(g, shapes)
    out: list[onnx.NodeProto] = []
    for node in g.nodes:
        if (
            node.op_type != "BatchNormalization"
            or len(node.output) != 1
            or not all(i in g.consts for i in node.input[1:5])
            or not 2 <= len(shapes[node.input[0]]) <= 4
        ):
            out.append(node)
            continue
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (g.consts[i].astype(np.float64).ravel() for i in node.input[1:5])
        w = gamma / np.sqrt(var + eps)
        b = beta - mean * w
        label = node.name or node.output[0]
        x, y = node.input[0], node.output[0]
        c = shapes[x][1]
        w_name, b_name = names(f"{label}_scale"), names(f"{label}_shift")
        g.consts[w_name] = w.astype(np.float32).reshape(c, 1, 1, 1)
        g.consts[b_name] = b.astype(np.float32)
        if x in g.quant:  # exact int8 multipliers: q = +-127 with scale |w| / 127 (zero channels: q = 0)
            scale = np.where(w == 0, 1.0, np.abs(w) / 127).astype(np.float32)
            q = (np.sign(w) * 127 * (w != 0)).astype(np.int8).reshape(c, 1, 1, 1)
            g.qconsts[w_name] = QTensor(q, QuantParams(scale, np.zeros(c, np.int64), 0))
            g.consts[w_name] = g.qconsts[w_name].real()
        rank = len(shapes[x])
        four = (*shapes[x], *(1,) * (4 - rank))
        x4 = x if rank == 4 else new_value(g, shapes, dtypes, names(f"{x}_4d"), x, four)
        y4 = y if rank == 4 else new_value(g, shapes, dtypes, names(f"{y}_4d"), y, four)
        if rank != 4:
            out.append(_reshape(g, names, x, x4, four, f"{label}_expand"))
        out.append(helper.make_node("Conv", [x4, w_name, b_name], [y4], name=label, group=c, kernel_shape=[1, 1]))
        if rank != 4:
            out.append(_reshape(g, names, y4, y, shapes[y], f"{label}_squeeze"))
    g.nodes = out


def split(g: Graph, shapes: dict, dtypes: dict) -> None:
    """Split -> one Slice per output (STRIDED_SLICE each; in int8 each output keeps its own parameters)."""
    names = Names(g, shapes)
    out: list[onnx.NodeProto] = []
    for node in g.nodes:
        if node.op_type != "Split":
            out.append(node)
            continue
        x = node.input[0]
        rank = len(shapes[x])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0) % rank
        label = node.name or node.output[0]
        start = 0
        for k, y in enumerate(node.output):
            size = shapes[y][axis]
            bounds = {"starts": start, "ends": start + size, "axes": axis}
            consts = []
            for key, v in bounds.items():
                c = names(f"{label}_{k}_{key}")
                g.consts[c] = np.asarray([v], np.int64)
                consts.append(c)
            out.append(helper.make_node("Slice", [x, *consts], [y], name=f"{label}_{k}"))
            start += size
    g.nodes = out


def quantize_constant_operands(g: Graph) -> None:
    """A float constant operand of an int8 Add/Sub/Mul (an LSTM cell's bias the quantizer left float) -> int8 with
    its own per-tensor parameters (range widened to include 0): TFLite's int8 ADD/SUB/MUL rescale each input."""
    from ...numerics import quantize, scale_zero_point

    for node in g.nodes:
        if node.op_type not in ("Add", "Sub", "Mul") or not all(o in g.quant for o in node.output):
            continue
        ins = [i for i in node.input if i not in g.consts]
        if not ins or not all(i in g.quant for i in ins):
            continue
        for c in node.input:
            if c not in g.consts or c in g.qconsts or g.consts[c].dtype.kind != "f":
                continue
            data = g.consts[c].astype(np.float32)
            lo, hi = min(float(data.min()), 0.0), max(float(data.max()), 0.0)
            if hi == lo:
                hi = lo + 1.0  # all zeros: any scale stores them exactly
            scale, zp = scale_zero_point(lo, hi, "int8", symmetric=False)
            q = quantize(data, scale, zp, "int8")
            qp = QuantParams(np.asarray(scale, np.float32).reshape(1), np.asarray(zp, np.int64).reshape(1))
            g.qconsts[c] = QTensor(np.asarray(q, np.int8), qp)
            g.consts[c] = g.qconsts[c].real()


def requantize(g: Graph, shapes: dict, dtypes: dict) -> list[str]:
    """Insert the int8 -> int8 requantizes TFLite's kernels need; returns the nodes that got one."""
    names = Names(g, shapes)
    out: list[onnx.NodeProto] = []
    changed = []
    for node in g.nodes:
        y = node.output[0]
        ins = [i for i in node.input if i and i not in g.consts]
        quantized = all(o in g.quant for o in node.output) and all(i in g.quant for i in ins) and ins
        label = node.name or y
        if quantized and (node.op_type in SAME_PARAMS or node.op_type in FIXED_OUTPUT):
            _snap(g, node, ins)
        if not quantized:
            out.append(node)
        elif node.op_type in FIXED_OUTPUT and not same(g.quant[y], _fixed(node.op_type)):
            raw = new_value(g, shapes, dtypes, names(f"{y}_fixed"), y, shapes[y])
            g.quant[raw] = _fixed(node.op_type)
            node.name, node.output[0] = label, raw
            out += [node, helper.make_node("Identity", [raw], [y], name=f"{label}_requantize")]
            changed.append(label)
        elif node.op_type == "Concat" and any(not same(g.quant[i], g.quant[y]) for i in ins):
            for k, i in enumerate(node.input):
                if i in g.quant and not same(g.quant[i], g.quant[y]):
                    rq = new_value(g, shapes, dtypes, names(f"{i}_{label}_rq"), i, shapes[i])
                    g.quant[rq] = g.quant[y]
                    out.append(helper.make_node("Identity", [i], [rq], name=f"{label}_requantize_{k}"))
                    node.input[k] = rq
            out.append(node)
            changed.append(label)
        elif node.op_type in SAME_PARAMS and not same(g.quant[ins[0]], g.quant[y]):
            # compute in the input's parameters, then rescale the (often smaller) output once
            raw = new_value(g, shapes, dtypes, names(f"{y}_raw"), y, shapes[y])
            g.quant[raw] = g.quant[ins[0]]
            node.name, node.output[0] = label, raw
            out += [node, helper.make_node("Identity", [raw], [y], name=f"{label}_requantize")]
            changed.append(label)
        else:
            out.append(node)
    g.nodes = out
    return changed


def _snap(g: Graph, node: onnx.NodeProto, ins: list[str]) -> None:
    """Parameters equal to a float32 rounding (a scale rebuilt from an aligned Add) become identical: TFLite's
    kernels compare them exactly (CONCATENATION refuses to prepare, XNNPACK to delegate STRIDED_SLICE)."""
    y = node.output[0]
    if node.op_type in FIXED_OUTPUT:
        if same(g.quant[y], _fixed(node.op_type)):
            g.quant[y] = _fixed(node.op_type)
        return
    for i in ins if node.op_type == "Concat" else ins[:1]:
        if same(g.quant[i], g.quant[y]) and g.quant[i] is not g.quant[y]:
            if node.op_type == "Concat":
                g.quant[i] = g.quant[y]
            else:
                g.quant[y] = g.quant[i]


def _fixed(op: str) -> QuantParams:
    s, z = FIXED_OUTPUT[op]
    return QuantParams(np.asarray([s], np.float32), np.asarray([z], np.int64))


def inline_constant_ifs(proto: onnx.ModelProto) -> bool:
    """An `If` whose condition is a constant (exporters wrap graphs in one) -> the nodes of the branch it takes.
    Works on the ONNX graph before shapes are probed, so the branch's values get shapes and its Q/DQ pairs are
    read like any others. Returns whether anything changed."""
    changed = False
    while True:
        consts = {t.name: t for t in proto.graph.initializer}
        for n in proto.graph.node:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                consts[n.output[0]] = n.attribute[0].t
        nodes: list[onnx.NodeProto] = []
        inlined = False
        for node in proto.graph.node:
            if node.op_type != "If" or node.input[0] not in consts:
                nodes.append(node)
                continue
            taken = bool(numpy_helper.to_array(consts[node.input[0]]).ravel()[0])
            branch = next(a.g for a in node.attribute if a.name == ("then_branch" if taken else "else_branch"))
            rename = {o.name: y for o, y in zip(branch.output, node.output)}
            proto.graph.initializer.extend(branch.initializer)
            produced = set()
            for inner in branch.node:
                copy = onnx.NodeProto()
                copy.CopyFrom(inner)
                for i, v in enumerate(copy.input):
                    copy.input[i] = rename.get(v, v)
                for i, v in enumerate(copy.output):
                    produced.add(v)
                    copy.output[i] = rename.get(v, v)
                nodes.append(copy)
            for o, y in rename.items():  # a branch that returns an outer value as it is
                if o not in produced:
                    nodes.append(helper.make_node("Identity", [o], [y], name=f"{node.name or y}_{o}"))
            inlined = changed = True
        del proto.graph.node[:]
        proto.graph.node.extend(nodes)
        if not inlined:
            return changed
