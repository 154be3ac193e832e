"""Pooling and reductions. MaxPool selects input values, so it keeps the input's scale; the mean of a
squeeze-excitation block keeps its range (below)."""

from __future__ import annotations

import onnx_ir as ir

from ..decision import Reason
from ..recipe import Scheme
from .base import OpSpec, Skip, float_input
from .registry import register

# How far back from a gating Mul to look for the pool that feeds its gate: an SE gate is pool -> Conv -> act ->
# Conv -> gate (five nodes; seven with Flatten/Reshape or a decomposed hard-sigmoid left unfused).
SE_DEPTH = 8


def max_pool(node: ir.Node, scheme: Scheme) -> OpSpec | Skip:
    if (bad := float_input(node)) is not None:
        return bad
    if len(node.outputs) > 1 and node.outputs[1] is not None and node.outputs[1].uses():
        return Skip(Reason.MAXPOOL_INDICES)
    return OpSpec(shares_input_scale=True)


def averaging(node: ir.Node, scheme: Scheme) -> OpSpec | Skip:
    if (bad := float_input(node)) is not None:
        return bad
    # A squeeze-excitation mean takes its input's range: a mean cannot leave it, so it never clips. Its own
    # calibrated range is a maximum over one value per channel per calibration sample, and unseen images exceed it:
    # on MobileNetV3-Large, photos unlike the calibration ones reached 2.6-5.3x that range (1.5% of the values
    # clipped), and a clipped channel mean moves its gate for the whole feature map. The coarser step is noise the
    # block's small MLP and saturating gate tolerate: output cosine 0.961 -> 0.971 (bench/RESULTS_CORPUS.md,
    # eighth session). A classifier head's mean keeps its own range: there the coarser step cost more (0.955).
    # Its scale is nudged off the input's exact scale so that integer kernels round as the simulation does (decide.py).
    return OpSpec(input_range=squeeze_excitation(node))


def squeeze_excitation(pool: ir.Node) -> bool:
    """Whether `pool`'s input is multiplied by a gate computed from `pool`'s output: x * f(mean(x))."""
    x = pool.inputs[0] if pool.inputs else None
    if x is None or not pool.outputs:
        return False
    for use in x.uses():
        mul = use.node
        if mul is pool or mul.op_type != "Mul" or len(mul.inputs) != 2:
            continue
        gate = mul.inputs[1 - use.idx]
        if gate is not None and gate is not x and _reaches(gate, pool.outputs[0], SE_DEPTH):
            return True
    return False


def _reaches(value: ir.Value, target: ir.Value, depth: int) -> bool:
    """Whether `value` is computed from `target` within `depth` nodes (walking producers)."""
    if value is target:
        return True
    node = value.producer()
    if node is None or depth == 0:
        return False
    return any(v is not None and _reaches(v, target, depth - 1) for v in node.inputs)


register("static", ["MaxPool"], max_pool)
register("static", ["AveragePool", "GlobalAveragePool", "ReduceMean"], averaging)
