"""Graph -> graph transforms that run before calibration. Each pass returns whether it changed the model."""

from __future__ import annotations

import warnings
from typing import Any

import onnx_ir as ir
import onnx_ir.passes.common as common

from .canonicalize import canonicalize
from .equalize import equalize
from .float32 import widen_float16
from .fold_affine import fold_affine
from .fold_batchnorm import fold_batchnorm
from .fold_constants import fold_constants
from .fold_pad import fold_pad
from .global_pool import reduce_mean_to_pool
from .inline_if import inline_constant_ifs
from .layernorm import fuse_layer_norm
from .pad_depthwise import pad_depthwise
from .reparam import merge_parallel_convs
from .smooth import smooth
from .transposes import sink_transposes


def prepare(model: ir.Model) -> ir.Model:
    """Make weights initializers, fold constants, spell decomposed activations and layer norms as one op, fold
    BatchNorm (the op, or constant per-channel Mul/Add after a conv) and zero Pads into convs, merge summed parallel
    convs of one input (RepVGG's training form) into one, infer shapes."""
    common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    if widen_float16(model):
        warning = "the model computes in float16: lowbit quantizes its float32 twin (weights widened exactly)"
        warnings.warn(warning, stacklevel=2)
    fold_constants(model)
    if inline_constant_ifs(model):  # the taken branch's nodes may fold in turn
        fold_constants(model)
    sink_transposes(model)  # tf2onnx's NHWC Transpose pairs: before the folds and patterns that look through them
    canonicalize(model)
    fuse_layer_norm(model)
    fold_batchnorm(model)
    fold_affine(model)  # BatchNorm exported as Mul/Add, and constant scales or shifts after convs
    fold_pad(model)
    if merge_parallel_convs(model):  # after the folds: a branch is then one Conv, its BatchNorm in it
        fold_affine(model)  # a scale after the merged conv (FastViT's layer scale after mixer(x) - BN(x))
    common.RemoveUnusedNodesPass()(model)
    common.ShapeInferencePass()(model)
    reduce_mean_to_pool(model)  # after shape inference: it needs the mean's input rank
    return model


def target_forms(model: ir.Model, target: str) -> bool:
    """The float graph in the forms the target's runtime runs fastest (depthwise convs widened to the channel count
    ORT's fast int8 kernel takes): what quantize does after `prepare`, and what diagnose must do to pair tensors."""
    from ..targets import TARGETS

    channels = TARGETS[target].depthwise_channels
    return pad_depthwise(model, channels) if channels else False


def recover(
    model: ir.Model, recipe: Any, batches: Any = None, smooth_scales: dict[str, list[float]] | None = None
) -> dict[str, list[float]]:
    """The recipe's passes on the prepared float model, before the layout is made: the target's forms (depthwise
    convs widened to the channel count its fast kernel takes), cross-layer equalization (data-free), then
    SmoothQuant (scales from `smooth_scales`, a plan's record, or measured on `batches`). Returns the SmoothQuant
    scales applied, for the plan."""
    target_forms(model, recipe.target)
    if recipe.equalize:
        equalize(model)
    if recipe.smooth_quant is None:
        return {}
    scales = smooth(model, float(recipe.smooth_quant), batches, smooth_scales)
    common.ShapeInferencePass()(model)  # the LayerNorm twins' outputs
    return scales


__all__ = [
    "prepare",
    "recover",
    "equalize",
    "smooth",
    "canonicalize",
    "fold_constants",
    "fold_batchnorm",
    "fold_affine",
    "fold_pad",
    "merge_parallel_convs",
    "sink_transposes",
    "pad_depthwise",
    "target_forms",
]
