"""What the runtimes a quantized model is meant for can express, as data the core reads.

A recipe names its target. "portable" (the default) makes the QDQ model compute the same integers in ONNX Runtime
and in LiteRT after `lowbit export --to tflite`; "onnxruntime" skips what only LiteRT needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from ..decision import Reason
from ..ops.activation import requantize_hard_gates
from ..plan import Plan, TensorParams
from ..recipe import TargetName
from .add_rounding import snap_add_scales
from .biases import rescale_biases
from .fixed_outputs import fix_output_params
from .island_rounding import snap_island_scales


@dataclass(frozen=True)
class Target:
    name: str
    # LiteRT's (XNNPACK) int8 ADD rounds 21-bit scale ratios, ONNX Runtime's float32 ones: nudge Add scales so both
    # give the same integers (docs/tflite.md).
    align_add_rounding: bool
    # Quantizing a float HardSigmoid / HardSwish output rounds differently at half steps (ONNX Runtime divides by
    # the scale, LiteRT multiplies by its reciprocal): nudge the output scale off them (island_rounding.py).
    align_island_rounding: bool = False
    # ONNX Runtime has no integer HardSwish/HardSigmoid: run them as a requantization (+ QLinearMul for HardSwish)
    # instead of a float island (ops/activation.py). LiteRT has integer HARD_SWISH and reads the plain QDQ form.
    requantized_hard_gates: bool = False
    # LiteRT's int8 LOGISTIC/SOFTMAX/TANH have fixed output parameters: give them to the model (fixed_outputs.py).
    fixed_activation_outputs: bool = False
    # Keep float an image stem (a Conv reading a graph input of at most 3 channels: RGB, grey) and the activation
    # after it: ORT's u8 x s8 QLinearConv has nothing to gain at 3 input channels, and the input would need a
    # QuantizeLinear and a transpose first (planner.py).
    float_image_stem: bool = False
    # Widen depthwise convs to a multiple of this many channels (0: never): ORT's fast int8 depthwise kernel on x86
    # takes multiples of 16 only (passes/pad_depthwise.py).
    depthwise_channels: int = 0


TARGETS: dict[str, Target] = {
    "portable": Target("portable", align_add_rounding=True, fixed_activation_outputs=True, align_island_rounding=True),
    "onnxruntime": Target(
        "onnxruntime",
        align_add_rounding=False,
        requantized_hard_gates=True,
        float_image_stem=True,
        depthwise_channels=16,
    ),
}


def adapt(proto: onnx.ModelProto, plan: Plan, target: str) -> None:
    """Adjust a quantized model for its target in place. The plan keeps the adjusted parameters and what they were
    adjusted from (`adapted`): a re-applied plan starts from the latter and reproduces the same bytes. The int32
    biases of layers whose input scale moved follow it (rescale_biases)."""
    before = {n: (p.scale[0], p.zero_point[0]) for n, p in plan.tensors.items() if _one_value(p)}
    _adjust(proto, plan, target)
    for name, old in before.items():
        p = plan.tensors[name]
        if (p.scale[0], p.zero_point[0]) != old:
            p.adapted = [old[0], old[1], p.scale[0], p.zero_point[0]]
    rescale_biases(proto, plan)


def _one_value(p: TensorParams) -> bool:
    return p.kind == "activation" and p.axis is None and len(p.scale) == 1 and len(p.zero_point) == 1


def _adjust(proto: onnx.ModelProto, plan: Plan, target: str) -> None:
    if TARGETS[target].fixed_activation_outputs:
        for name, (scale, zero) in fix_output_params(proto).items():
            p = plan.tensors.get(name)
            if p is not None:
                p.scale, p.zero_point = [scale], [zero]
    adds = snap_add_scales(proto) if TARGETS[target].align_add_rounding else []
    islands = []
    if TARGETS[target].align_island_rounding:
        # after the Adds: an island's input may be an Add's output, and an Add's tuned scales must stay as they are
        islands = snap_island_scales(proto, _add_scales(proto, adds))
    if adds or islands:
        _refresh_scales(proto, plan)
    if TARGETS[target].requantized_hard_gates:
        for name in requantize_hard_gates(proto):
            d = plan.nodes.get(name)
            if d is not None and d.quantized:
                d.code, d.details = Reason.REQUANTIZED_GATE, {**d.details, "op": d.op_type}


def _add_scales(proto: onnx.ModelProto, adds: list[str]) -> set[str]:
    """The scale initializers of the operands and outputs of these Add nodes (which snap_add_scales tuned).
    On EfficientNet-Lite0 a few Add values near half steps came out one step apart in the two runtimes and
    flipped 4 of 256 top-1 answers; nudging each Add's scales by ~1e-7 makes them compute the same integers."""
    names = set(adds)
    producer = {o: n for n in proto.graph.node for o in n.output}
    scales: set[str] = set()
    for n in proto.graph.node:
        if (n.name or n.output[0]) not in names or n.op_type != "Add":
            continue
        scales.update(producer[i].input[1] for i in n.input if i in producer and len(producer[i].input) > 1)
        scales.update(r.input[1] for r in proto.graph.node if n.output[0] in r.input and len(r.input) > 1)
    return scales


def _refresh_scales(proto: onnx.ModelProto, plan: Plan) -> None:
    """Copy the (possibly nudged) one-value scales of the model's QuantizeLinear nodes into the plan."""
    inits = {t.name: t for t in proto.graph.initializer}
    for n in proto.graph.node:
        p = plan.tensors.get(n.input[0]) if n.op_type == "QuantizeLinear" else None
        if p is not None and p.axis is None and n.input[1] in inits:
            p.scale = [float(onnx.numpy_helper.to_array(inits[n.input[1]]).reshape(()))]


__all__ = ["Target", "TARGETS", "TargetName", "adapt", "snap_add_scales", "snap_island_scales"]
