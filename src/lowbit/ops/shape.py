"""Data movement: the values pass through unchanged (or a subset of them), so outputs share input 0's scale."""

from __future__ import annotations

import onnx_ir as ir

from .base import OpSpec, Skip, float_input


def data_movement(node: ir.Node) -> OpSpec | Skip:
    if (bad := float_input(node)) is not None:
        return bad
    return OpSpec(
        outputs=tuple(range(len(node.outputs))), shares_input_scale=True, needs_quantized_neighbour=True
    )


def resize(node: ir.Node) -> OpSpec | Skip:
    mode = node.attributes.get_string("mode", "nearest")
    if mode == "cubic":
        return Skip("cubic Resize overshoots its input range; it stays float")
    return data_movement(node)


def pad(node: ir.Node) -> OpSpec | Skip:
    if node.attributes.get_string("mode", "constant") != "constant":
        return data_movement(node)
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        value = node.inputs[2].const_value
        if value is None or value.numpy().any():
            return Skip("Pad with a non-zero constant value keeps float")
    return data_movement(node)


HANDLERS = {
    op: data_movement
    for op in ("Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Gather", "Split",
               "DepthToSpace", "SpaceToDepth", "Identity")
}
HANDLERS.update({"Resize": resize, "Pad": pad})
