"""What an op handler returns."""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

FLOAT_TYPES = {ir.DataType.FLOAT}


@dataclass(frozen=True)
class OpSpec:
    activations: tuple[int, ...] = (0,)  # inputs quantized with calibrated (or, if constant, their own) ranges
    weight: tuple[int, int | None] | None = None  # (input index, per-channel axis or None for per-tensor only)
    bias: int | None = None  # int32 bias input, scale = s_activation * s_weight
    outputs: tuple[int, ...] = (0,)
    shares_input_scale: bool = False  # outputs reuse input 0's parameters (data movement, max pooling)
    fusable_activation: bool = False  # Relu/Clip(0, x): folds into the range of the op feeding it
    # When True the op is worth quantizing only next to other quantized ops (nothing to gain alone).
    needs_quantized_neighbour: bool = False


@dataclass(frozen=True)
class Skip:
    reason: str


def const(node: ir.Node, i: int):
    """The constant array at input i, or None."""
    if i >= len(node.inputs) or node.inputs[i] is None or node.inputs[i].const_value is None:
        return None
    return node.inputs[i].const_value.numpy()


def has_input(node: ir.Node, i: int) -> bool:
    return i < len(node.inputs) and node.inputs[i] is not None


def float_input(node: ir.Node, i: int = 0) -> Skip | None:
    v = node.inputs[i]
    if v is not None and v.dtype is not None and v.dtype not in FLOAT_TYPES:
        return Skip(f"input '{v.name}' is {v.dtype.name}, not float32")
    return None
