"""Conv and ConvTranspose: per-channel int8 weights, int32 bias."""

from __future__ import annotations

import onnx_ir as ir

from .base import OpSpec, Skip, const, float_input, has_input


def conv(node: ir.Node) -> OpSpec | Skip:
    if (bad := float_input(node)) is not None:
        return bad
    w = const(node, 1)
    if w is None:
        return Skip("weight is not a constant (computed at run time)")
    if has_input(node, 2) and const(node, 2) is None:
        return Skip("bias is not a constant")
    return OpSpec(weight=(1, 0), bias=2 if has_input(node, 2) else None)


def conv_transpose(node: ir.Node) -> OpSpec | Skip:
    if (bad := float_input(node)) is not None:
        return bad
    if const(node, 1) is None:
        return Skip("weight is not a constant (computed at run time)")
    if has_input(node, 2) and const(node, 2) is None:
        return Skip("bias is not a constant")
    # Weight layout is (C_in, C_out / group, k...): output channels sit on axis 1 only when group == 1.
    axis = 1 if node.attributes.get_int("group", 1) == 1 else None
    return OpSpec(weight=(1, axis), bias=2 if has_input(node, 2) else None)


HANDLERS = {"Conv": conv, "ConvTranspose": conv_transpose}
