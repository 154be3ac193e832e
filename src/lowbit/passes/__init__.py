"""Graph -> graph transforms that run before calibration. Each pass returns whether it changed the model."""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common

from .canonicalize import canonicalize
from .fold_affine import fold_affine
from .fold_batchnorm import fold_batchnorm
from .fold_constants import fold_constants
from .fold_pad import fold_pad
from .inline_if import inline_constant_ifs


def prepare(model: ir.Model) -> ir.Model:
    """Make weights initializers, fold constants, spell decomposed activations as one op, fold BatchNorm (the op, or
    constant per-channel Mul/Add after a conv) and zero Pads into convs, infer shapes."""
    common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    fold_constants(model)
    if inline_constant_ifs(model):  # the taken branch's nodes may fold in turn
        fold_constants(model)
    canonicalize(model)
    fold_batchnorm(model)
    fold_affine(model)  # BatchNorm exported as Mul/Add, and constant scales or shifts after convs
    fold_pad(model)
    common.RemoveUnusedNodesPass()(model)
    common.ShapeInferencePass()(model)
    return model


__all__ = ["prepare", "canonicalize", "fold_constants", "fold_batchnorm", "fold_affine", "fold_pad"]
