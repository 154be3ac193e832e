"""Pooling and reductions. MaxPool selects input values, so it keeps the input's scale."""

from __future__ import annotations

import onnx_ir as ir

from ..decision import Reason
from ..recipe import Scheme
from .base import OpSpec, Skip, float_input
from .registry import register


def max_pool(node: ir.Node, scheme: Scheme) -> OpSpec | Skip:
    if (bad := float_input(node)) is not None:
        return bad
    if len(node.outputs) > 1 and node.outputs[1] is not None and node.outputs[1].uses():
        return Skip(Reason.MAXPOOL_INDICES)
    return OpSpec(shares_input_scale=True)


def averaging(node: ir.Node, scheme: Scheme) -> OpSpec | Skip:
    if (bad := float_input(node)) is not None:
        return bad
    return OpSpec()


register("static", ["MaxPool"], max_pool)
register("static", ["AveragePool", "GlobalAveragePool", "ReduceMean"], averaging)
