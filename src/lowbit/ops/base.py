"""What an op family's decide function returns, and small helpers for reading a node's inputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from ..decision import Reason

FLOAT_TYPES = {ir.DataType.FLOAT}


@dataclass(frozen=True)
class OpSpec:
    """Static mode: which inputs and outputs of the node are quantized, and how."""

    activations: tuple[int, ...] = (0,)  # inputs quantized with calibrated (or, if constant, their own) ranges
    weight: tuple[int, int | None] | None = None  # (input index, per-channel axis or None for per-tensor only)
    bias: int | None = None  # int32 bias input, scale = s_activation * s_weight
    outputs: tuple[int, ...] = (0,)
    shares_input_scale: bool = False  # outputs reuse input 0's parameters (data movement, max pooling)
    # Outputs take input 0's range with the scale nudged up by TIE_NUDGE (a squeeze-excitation mean, ops/pooling.py).
    input_range: bool = False
    fusable_activation: bool = False  # Relu/Clip(0, x): folds into the range of the op feeding it
    # When True the op is worth quantizing only next to other quantized ops (nothing to gain alone).
    needs_quantized_neighbour: bool = False


@dataclass(frozen=True)
class Skip:
    """The node stays float, for this reason."""

    code: Reason
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Take:
    """Dynamic, weight-only or float16 mode: the node is quantized by its family's rewrite function (the one
    registered for `mode`, when given: what a mode does to a node can be another mode's rewrite)."""

    code: Reason
    details: dict[str, Any] = field(default_factory=dict)
    mode: str | None = None


@dataclass(frozen=True)
class AsStatic:
    """Quantize the node statically instead (calibration data given), or else keep it float for `otherwise`.
    `fold_only`: only where it folds into the range of a statically quantized producer (a Relu/Clip after a
    convolution); anywhere else it stays float for `otherwise`."""

    otherwise: Skip
    fold_only: bool = False


Decided = OpSpec | Skip | Take | AsStatic


class Refuse(Exception):
    """The recipe asks for something this node cannot have: a user mistake, reported with the deciding rule."""

    def __init__(self, what: str, fix: str) -> None:
        super().__init__(what)
        self.what, self.fix = what, fix


def const(node: ir.Node, i: int) -> np.ndarray | None:
    """The constant array at input i, or None."""
    v = node.inputs[i] if i < len(node.inputs) else None
    if v is None or v.const_value is None:
        return None
    return v.const_value.numpy()


def weight_of(node: ir.Node, i: int) -> np.ndarray:
    """The float32 constant at input i, which the node's decision found there."""
    found = const(node, i)
    assert found is not None, f"{node.name} input {i} is not a constant"
    return found.astype(np.float32)


def name_of(x: ir.Node | ir.Value) -> str:
    """The name of a node or value lowbit works on (every node is named before planning)."""
    assert x.name is not None
    return x.name


def unquantizable(values: np.ndarray) -> Skip | None:
    """Why a constant weight (or bias) cannot be quantized: it holds no values, so its range is undefined, or NaN
    or infinite ones, which no finite scale spans (a table of attention biases whose padding row is -inf)."""
    if values.size == 0:
        return Skip(Reason.EMPTY_WEIGHT, {"shape": list(values.shape)})
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        return Skip(Reason.NONFINITE_WEIGHT, {"count": int((~np.isfinite(values)).sum()), "size": int(values.size)})
    return None


def empty(node: ir.Node, i: int) -> Skip | None:
    """Why a node whose constant input i cannot be quantized is not (see `unquantizable`); None if it can, or if
    input i is not a constant."""
    found = const(node, i)
    return None if found is None else unquantizable(found)


def has_input(node: ir.Node, i: int) -> bool:
    return i < len(node.inputs) and node.inputs[i] is not None


def float_input(node: ir.Node, i: int = 0) -> Skip | None:
    v = node.inputs[i]
    if v is not None and v.dtype is not None and v.dtype not in FLOAT_TYPES:
        return Skip(Reason.NOT_FLOAT32, {"input": v.name, "dtype": v.dtype.name})
    return None
