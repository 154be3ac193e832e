"""Conv and ConvTranspose. Static: per-channel int8 weights, int32 bias. Weight-only: int8 weights behind a
DequantizeLinear. Dynamic: quantized statically when calibration data is given (ConvInteger is slow), else float."""

from __future__ import annotations

import onnx_ir as ir

from ..decision import Reason, granularity
from ..recipe import Scheme
from .base import AsStatic, Decided, OpSpec, Refuse, Skip, Take, const, empty, float_input, has_input
from .registry import RewriteContext, register
from .weighted import weight_behind_dq


def conv(node: ir.Node, scheme: Scheme) -> OpSpec | Skip:
    if (bad := float_input(node)) is not None:
        return bad
    if const(node, 1) is None:
        return Skip(Reason.WEIGHT_NOT_CONSTANT)
    if (none := empty(node, 1) or empty(node, 2)) is not None:
        return none
    if has_input(node, 2) and const(node, 2) is None:
        return Skip(Reason.BIAS_NOT_CONSTANT)
    return OpSpec(weight=(1, 0), bias=2 if has_input(node, 2) else None)


def conv_transpose(node: ir.Node, scheme: Scheme) -> OpSpec | Skip:
    if (bad := float_input(node)) is not None:
        return bad
    if const(node, 1) is None:
        return Skip(Reason.WEIGHT_NOT_CONSTANT)
    if (none := empty(node, 1) or empty(node, 2)) is not None:
        return none
    if has_input(node, 2) and const(node, 2) is None:
        return Skip(Reason.BIAS_NOT_CONSTANT)
    # Weight layout is (C_in, C_out / group, k...): output channels sit on axis 1 only when group == 1.
    axis = 1 if node.attributes.get_int("group", 1) == 1 else None
    return OpSpec(weight=(1, axis), bias=2 if has_input(node, 2) else None)


def _no_int4(node: ir.Node, scheme: Scheme) -> None:
    if scheme.weights == "int4":
        raise Refuse(
            f"int4 weights cannot be used on {node.op_type} node '{node.name}'",
            "ONNX Runtime has int4 kernels for MatMul/Gemm/Gather only; add a rule giving convolutions "
            "weights=int8, or mode=static for int4 QDQ",
        )


def weight_only(node: ir.Node, scheme: Scheme) -> Decided:
    _no_int4(node, scheme)
    spec = conv(node, scheme) if node.op_type == "Conv" else conv_transpose(node, scheme)
    if isinstance(spec, Skip):
        return spec
    return Take(Reason.WEIGHT_ONLY, {"weights": "int8", "granularity": granularity(scheme.per_channel)})


def dynamic(node: ir.Node, scheme: Scheme) -> Decided:
    _no_int4(node, scheme)
    return AsStatic(otherwise=Skip(Reason.CONV_DYNAMIC))


def rewrite_weight_only(ctx: RewriteContext, node: ir.Node, scheme: Scheme) -> None:
    # ConvTranspose's output channels sit on axis 1, and only without groups.
    if node.op_type == "Conv":
        axis = 0 if scheme.per_channel else None
    else:
        axis = 1 if scheme.per_channel and node.attributes.get_int("group", 1) == 1 else None
    weight_behind_dq(ctx, node, axis, scheme)


register("static", ["Conv"], conv)
register("static", ["ConvTranspose"], conv_transpose)
register("weight_only", ["Conv", "ConvTranspose"], weight_only, rewrite_weight_only)
register("dynamic", ["Conv", "ConvTranspose"], dynamic)
