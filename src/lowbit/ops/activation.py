"""Activations. Relu and Clip(0, x) fold into the range of the op feeding them; the rest get their own range."""

from __future__ import annotations

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
