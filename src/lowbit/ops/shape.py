"""Data movement: the values pass through unchanged (or a subset of them), so outputs share input 0's scale."""

from __future__ import annotations

import onnx_ir as ir

from ..decision import Reason
from ..recipe import Scheme
from .base import OpSpec, Skip, float_input
from .registry import register


def data_movement(node: ir.Node, scheme: Scheme) -> OpSpec | Skip:
    if (bad := float_input(node)) is not None:
        return bad
    return OpSpec(outputs=tuple(range(len(node.outputs))), shares_input_scale=True, needs_quantized_neighbour=True)


def resize(node: ir.Node, scheme: Scheme) -> OpSpec | Skip:
    mode = node.attributes.get_string("mode", "nearest")
    if mode == "cubic":
        return Skip(Reason.CUBIC_RESIZE)
    return data_movement(node, scheme)


def pad(node: ir.Node, scheme: Scheme) -> OpSpec | Skip:
    if node.attributes.get_string("mode", "constant") != "constant":
        return data_movement(node, scheme)
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        value = node.inputs[2].const_value
        if value is None or value.numpy().any():
            return Skip(Reason.PAD_VALUE)
    return data_movement(node, scheme)


DATA_MOVEMENT = (
    "Reshape",
    "Flatten",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Slice",
    "Gather",
    "Split",
    "DepthToSpace",
    "SpaceToDepth",
    "Identity",
)
register("static", DATA_MOVEMENT, data_movement)
register("static", ["Resize"], resize)
register("static", ["Pad"], pad)
