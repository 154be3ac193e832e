"""Add, Mul, Concat: every float input is an activation with its own range; the output gets its own."""

from __future__ import annotations

import onnx_ir as ir

from ..recipe import Scheme
from .base import OpSpec, Skip, float_input
from .registry import register


def binary(node: ir.Node, scheme: Scheme) -> OpSpec | Skip:
    for i in range(2):
        if (bad := float_input(node, i)) is not None:
            return bad
    return OpSpec(activations=(0, 1))


def concat(node: ir.Node, scheme: Scheme) -> OpSpec | Skip:
    for i in range(len(node.inputs)):
        if (bad := float_input(node, i)) is not None:
            return bad
    return OpSpec(activations=tuple(range(len(node.inputs))))


register("static", ["Add", "Mul"], binary)
register("static", ["Concat"], concat)
