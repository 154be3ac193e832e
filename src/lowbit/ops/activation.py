"""Activations. Relu and Clip(0, x) fold into the range of the op feeding them; the rest get their own range.
For the onnxruntime target, HardSwish/HardSigmoid are then rewritten without a float island (requantize_hard_gates)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from ..decision import Reason
from ..recipe import Scheme
from .base import AsStatic, OpSpec, Skip, const, float_input
from .registry import register


def clip_bounds(node: ir.Node) -> tuple[float, float] | None:
    """(low, high) of a Relu/Clip with constant bounds, None otherwise."""
    if node.op_type == "Relu":
        return 0.0, float("inf")
    low, high = float("-inf"), float("inf")
    if "min" in node.attributes:  # opset < 11
        low = node.attributes.get_float("min")
    if "max" in node.attributes:
        high = node.attributes.get_float("max")
    for i in (1, 2):
        if i < len(node.inputs) and node.inputs[i] is not None:
            v = const(node, i)
            if v is None:
                return None
            if i == 1:
                low = float(v)
            else:
                high = float(v)
    return low, high


def relu_clip(node: ir.Node, scheme: Scheme) -> OpSpec | Skip:
    if (bad := float_input(node)) is not None:
        return bad
    bounds = clip_bounds(node)
    if bounds is None:
        return Skip(Reason.CLIP_BOUNDS)
    return OpSpec(fusable_activation=bounds[0] == 0.0)


def own_range(node: ir.Node, scheme: Scheme) -> OpSpec | Skip:
    if (bad := float_input(node)) is not None:
        return bad
    return OpSpec()


def dynamic_relu_clip(node: ir.Node, scheme: Scheme) -> AsStatic:
    # Dynamic mode quantizes convolutions statically when given calibration data. Their Relu/Clip must fold into
    # that static output range, or the output is quantized over the pre-activation range ([-111, 129] instead of
    # [0, 6]): EfficientNet-Lite0 with the dynamic preset kept 64% top-1 agreement instead of ~89%.
    return AsStatic(Skip(Reason.DYNAMIC_OTHER, {"op": node.op_type}), fold_only=True)


register("static", ["Relu", "Clip"], relu_clip)
register("dynamic", ["Relu", "Clip"], dynamic_relu_clip)
register("static", ["Sigmoid", "Softmax", "HardSwish", "HardSigmoid", "LeakyRelu", "Tanh"], own_range)


# --- ONNX Runtime target: HardSwish / HardSigmoid without a float island ------------------------------------------
#
# ORT has no integer HardSwish or HardSigmoid kernel: DQ -> op -> Q runs in float (it inlines HardSwish as
# HardSigmoid * x). But HardSigmoid(x) = Clip(alpha * x + beta, 0, 1) is, on 8-bit grids, a shifted requantization:
# quantizing x + beta / alpha with scale step / alpha and zero point qmin puts the gate on the grid (step, qmin), and
# the grid's ends are the Clip. HardSwish is then x * gate, which ORT fuses into QLinearMul. Two forms of the gate:
# - shift and requantize as one integer op: DQ(x) + DQ(beta / alpha) -> Q, which ORT fuses into QLinearAdd (one pass
#   over uint8 in and out, where DQ -> Q writes and reads a float tensor between two passes);
# - when x is only quantized to be read by the gate (an SE block's HardSigmoid right after its Conv: Q -> DQ -> gate),
#   the producer's Q quantizes straight onto the gate's input grid, zero point qmin + round(beta / step): ORT's
#   QLinearConv then writes the gate itself, and the Q -> DQ pair in between goes away.
# MobileNetV3-Small op17 (bench/ort_profile.py, 1 thread, thread CPU time vs float, 200 paired runs): DQ -> Q gates
# 0.877, both forms 0.819 (bench/RESULTS_CORPUS.md). A 256-entry lookup table (Cast + Gather) ran at 2.4x float in
# bench/mobilenet.py: ORT's Gather copies element by element and stops its NHWC layout propagation; QLinearLeakyRelu
# (alpha 1, ORT's lookup-table kernel) as the gate's requantization ran no faster than DQ -> Q.
# Only for the onnxruntime target: LiteRT has integer HARD_SWISH, and `lowbit export --to tflite` reads the plain
# DQ -> op -> Q form of the portable target.

GATE_STEPS = 255


def _scalar_init(inits: dict[str, onnx.TensorProto], name: str) -> np.ndarray | None:
    t = inits.get(name)
    if t is None:
        return None
    a = onnx.numpy_helper.to_array(t)
    return a.reshape(()) if a.size == 1 else None


def _gate_params(node: onnx.NodeProto) -> tuple[float, float]:
    if node.op_type == "HardSwish":
        return 1.0 / 6.0, 0.5
    attrs = {a.name: a.f for a in node.attribute}
    return attrs.get("alpha", 0.2), attrs.get("beta", 0.5)


def _only_reader(readers: dict[str, list[onnx.NodeProto]], outputs: set[str], name: str) -> onnx.NodeProto | None:
    users = readers.get(name, [])
    return users[0] if len(users) == 1 and name not in outputs else None


def requantize_hard_gates(proto: onnx.ModelProto) -> list[str]:
    """Rewrite every 8-bit DQ -> HardSwish/HardSigmoid -> Q of the model as a requantization (and, for HardSwish, a
    Mul that ORT runs as QLinearMul); returns the names of the rewritten nodes."""
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}
    done = []
    for n in list(g.node):
        if n.op_type not in ("HardSwish", "HardSigmoid") or n.domain not in ("", "ai.onnx"):
            continue
        dq = producer.get(n.input[0])
        if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 3 or n.output[0] in outputs:
            continue
        zp = _scalar_init(inits, dq.input[2])
        users = readers.get(n.output[0], [])
        if zp is None or zp.dtype not in (np.uint8, np.int8) or _scalar_init(inits, dq.input[1]) is None:
            continue
        if not users or any(u.op_type != "QuantizeLinear" for u in users):
            continue
        alpha, beta = _gate_params(n)
        info = np.iinfo(zp.dtype)
        x_scale = float(_scalar_init(inits, dq.input[1]))  # type: ignore[arg-type]
        top = alpha * (int(info.max) - int(zp)) * x_scale + beta  # the gate at the largest x the input grid holds
        # A HardSigmoid's own output grid (calibrated, starting at 0) serves as the gate's when the offset fits;
        # otherwise the gate gets the grid [0, min(1, top)], finest that holds every gate value.
        own = users[0] if n.op_type == "HardSigmoid" and len(users) == 1 else None
        out_s = _scalar_init(inits, own.input[1]) if own is not None and len(own.input) > 2 else None
        out_z = _scalar_init(inits, own.input[2]) if own is not None and len(own.input) > 2 else None
        if out_s is None or out_z is None or out_z.dtype != zp.dtype or int(out_z) != info.min:
            own = None
        step = float(out_s) if own is not None else min(1.0, top) / GATE_STEPS  # type: ignore[arg-type]
        if not (alpha > 0 and top > 0 and step > 0):
            continue
        # x quantized only for this gate (Q -> DQ -> HardSigmoid): its Q moves onto the gate's input grid.
        first = producer.get(dq.input[0])
        alone = n.op_type == "HardSigmoid" and _only_reader(readers, outputs, dq.output[0]) is n
        if not (first is not None and first.op_type == "QuantizeLinear" and alone):
            first = None
        elif _only_reader(readers, outputs, first.output[0]) is not dq or not 0 <= _shift(beta, step) <= GATE_STEPS:
            first = None
        assert dq is not None
        _rewrite_gate(g, n, dq, first, own, zp.dtype, alpha, beta, step)
        done.append(n.name)
    return done


def _shift(beta: float, step: float) -> int:
    """beta in whole steps of the gate's grid: the gate's zero point above qmin when x is quantized onto it."""
    return int(np.floor(beta / step + 0.5))


def _rewrite_gate(
    g: onnx.GraphProto,
    n: onnx.NodeProto,
    dq: onnx.NodeProto,
    first: onnx.NodeProto | None,
    own: onnx.NodeProto | None,
    dtype: np.dtype,
    alpha: float,
    beta: float,
    step: float,
) -> None:
    """Replace n (and `own`, the HardSigmoid's Q; and `first` -> dq when x is quantized only for the gate) by the
    gate's requantization onto (step, qmin), then the gate's DQ, or for HardSwish DQ and Mul by x."""
    info = np.iinfo(dtype)
    base = n.name or n.output[0]
    x, new = n.input[0], []
    consts: dict[str, np.ndarray] = {f"{base}_gate_in_scale": np.array(step / alpha, np.float32)}
    if first is not None:  # the producer's output, quantized once, onto the gate's input grid
        consts[f"{base}_gate_in_zero_point"] = np.array(int(info.min) + _shift(beta, step), dtype)
        source = first.input[0]
    elif beta != 0.0:  # x + beta / alpha, the offset as one 8-bit constant at the end of its grid
        offset = beta / alpha
        ends = (int(info.max), int(info.min)) if offset > 0 else (int(info.min), int(info.max))
        consts[f"{base}_offset_q"] = np.array(ends[0], dtype)
        consts[f"{base}_offset_scale"] = np.array(abs(offset) / (int(info.max) - int(info.min)), np.float32)
        consts[f"{base}_offset_zero_point"] = np.array(ends[1], dtype)
        consts[f"{base}_gate_in_zero_point"] = np.array(info.min, dtype)
        offset_in = [f"{base}_offset_q", f"{base}_offset_scale", f"{base}_offset_zero_point"]
        new.append(onnx.helper.make_node("DequantizeLinear", offset_in, [f"{base}_offset"], name=f"{base}_offset_dq"))
        new.append(onnx.helper.make_node("Add", [x, f"{base}_offset"], [f"{base}_shifted"], name=f"{base}_shift"))
        source = f"{base}_shifted"
    else:
        consts[f"{base}_gate_in_zero_point"] = np.array(info.min, dtype)
        source = x
    if own is None:  # the gate's own DequantizeLinear
        consts[f"{base}_gate_scale"] = np.array(step, np.float32)
        consts[f"{base}_gate_zero_point"] = np.array(info.min, dtype)
    g.initializer.extend(onnx.numpy_helper.from_array(v, k) for k, v in consts.items())
    gate_out = own.output[0] if own is not None else f"{base}_gate_q"
    gate_in = [source, f"{base}_gate_in_scale", f"{base}_gate_in_zero_point"]
    new.append(onnx.helper.make_node("QuantizeLinear", gate_in, [gate_out], name=f"{base}_gate"))
    gate_dq = [gate_out, f"{base}_gate_scale", f"{base}_gate_zero_point"]
    if own is not None:  # the gate is the HardSigmoid's quantized output itself
        g.node.remove(own)
    elif n.op_type == "HardSwish":
        new.append(onnx.helper.make_node("DequantizeLinear", gate_dq, [f"{base}_gate_f"], name=f"{base}_gate_dq"))
        new.append(onnx.helper.make_node("Mul", [x, f"{base}_gate_f"], [n.output[0]], name=n.name))
    else:
        new.append(onnx.helper.make_node("DequantizeLinear", gate_dq, [n.output[0]], name=n.name))
    at = list(g.node).index(n)
    g.node.remove(n)
    for k, m in enumerate(new):
        g.node.insert(at + k, m)
    if first is not None:
        g.node.remove(first)
        g.node.remove(dq)
        used = {i for m in g.node for i in m.input}
        dropped = [t for t in g.initializer if t.name in set(first.input[1:]) - used]
        for t in dropped:  # the removed pair's scale and zero point, unless another node reads them
            g.initializer.remove(t)
