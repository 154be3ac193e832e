"""What the planner decides only after calibration, from the observed ranges: nodes kept float because a tensor they
would quantize holds a sentinel (a mask's -1e4), or because their inputs' ranges do not fit one output scale (a
detector head's Concat of pixel boxes and probabilities). A saved plan repeats these decisions (`replay`): they were
made on data a re-applying run does not see.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx_ir as ir

from .decision import Decision, Reason
from .numerics import qrange
from .ops import Skip
from .planner import Layout, make_layout
from .recipe import Recipe

# A calibrated value this large is a sentinel, not a signal: attention masks add -1e4, float32's lowest
# (-3.4e38) or finfo.min to the scores they hide. One such value stretches an 8- or 16-bit grid so far that every
# real value rounds to zero (MiniLM static int8: embedding cosine 0.15), so ops quantizing such a tensor stay float.
SENTINEL = 1e4
F32_MAX = float(np.finfo(np.float32).max)

# Mixed ranges. Concat copies each input's values into one output with one scale, so an input whose whole span
# covers fewer than MIN_STEPS steps of that scale keeps at most 3 bits of its information. A YOLO-style head
# concatenating boxes in pixels (0..320) with class probabilities (0..1) gives the probabilities 0.8 of a uint8 step
# (scale 320/255 = 1.25): each rounds to 0 or 1.25 and the top class is lost. 8 steps is where a max-range input
# still resolves about 1/8 of its span; anything finer fits one shared grid (similar ranges differ by far less than
# the 32x this allows for 8-bit activations). Only ops that copy values pick an element from one input: Concat here
# (Where has no static form in lowbit, so it is float already). Add and Mul are not judged: each operand already has
# its own scale, a product's range is its own, and a small addend below the sum's resolution is small in the sum too.
MIN_STEPS = 8
COPIES = frozenset({"Concat"})
# Data movement keeps such a Concat's output mixed: reshaped, transposed or concatenated again (a YOLOv5 head's
# per-level [boxes, objectness, classes] joined into one output), it still holds the small-range values beside the
# large ones, and quantizing it anywhere downstream loses them as surely. Slice, Split and Gather are not followed:
# they are how heads separate boxes from scores, and each part is then judged on its own observed range.
CARRIERS = frozenset(
    {"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Concat", "Expand", "Tile"}
)

# Decisions made on observed ranges, which a re-applied plan repeats.
SETTLED = frozenset({Reason.SENTINEL, Reason.MIXED_RANGES, Reason.CARRIES_MIXED})


def sentinel_nodes(layout: Layout, extremes: dict[str, tuple[float, float]]) -> dict[str, Skip]:
    """Static nodes that would quantize a tensor whose calibrated range (`extremes`: tensor -> (min, max), as
    observed, before any clipping) reaches |x| >= SENTINEL -> why they stay float. Tensors sharing a scale are
    judged by their source's range."""
    out: dict[str, Skip] = {}
    for node, tensors in layout.node_tensors.items():
        for t in tensors:
            lo, hi = extremes.get(layout.tensors.get(t, t), (0.0, 0.0))
            if max(-lo, hi) >= SENTINEL:
                # An infinity (a -inf mask constant) is recorded as float32's extreme: a plan is JSON, which has none.
                edge = float(np.clip(lo if -lo >= hi else hi, -F32_MAX, F32_MAX))
                out[node] = Skip(Reason.SENTINEL, {"edge": edge, "tensor": t})
                break
    return out


def mixed_range_nodes(graph: ir.Graph, layout: Layout, extremes: dict[str, tuple[float, float]]) -> dict[str, Skip]:
    """Static Concat nodes with an observed input whose span covers fewer than MIN_STEPS steps of the output's
    scale -> why they stay float. Constant inputs (not observed) and inputs that never vary are not judged."""
    out: dict[str, Skip] = {}
    for name, d in layout.nodes.items():
        if not d.quantized or d.op_type not in COPIES or name in layout.fused or d.scheme is None:
            continue
        node = graph.node(name)
        o = node.outputs[0].name
        if o is None or o not in layout.tensors:
            continue
        lo, hi = extremes.get(layout.tensors[o], (0.0, 0.0))
        qmin, qmax = qrange(d.scheme.activations)
        step = (max(hi, 0.0) - min(lo, 0.0)) / (qmax - qmin)  # the output scale min-max calibration gives
        if step <= 0:
            continue
        worst: tuple[float, str, float] | None = None
        for v in node.inputs:
            if v is None or v.name is None or v.name not in layout.tensors:
                continue
            a, b = extremes.get(layout.tensors[v.name], (0.0, 0.0))
            steps = (b - a) / step
            if b > a and steps < MIN_STEPS and (worst is None or steps < worst[0]):
                worst = (steps, v.name, b - a)
        if worst is not None:
            out[name] = Skip(
                Reason.MIXED_RANGES,
                {
                    "tensor": worst[1],
                    "span": float(f"{worst[2]:.6g}"),
                    "steps": float(f"{worst[0]:.3g}"),
                    "output_span": float(f"{(hi - lo):.6g}"),
                    "min_steps": MIN_STEPS,
                },
            )
    return out


def carried_mixed_nodes(graph: ir.Graph, layout: Layout, kept: dict[str, Skip]) -> dict[str, Skip]:
    """Static nodes that would quantize a tensor carrying the output of a Concat kept float for mixed ranges (see
    CARRIERS) -> why they stay float too."""
    carried: dict[str, str] = {}  # tensor -> the mixed Concat whose values it holds
    for name, skip in kept.items():
        if skip.code == Reason.MIXED_RANGES:
            carried.update({v.name: name for v in graph.node(name).outputs if v.name})
    if not carried:
        return {}
    for node in graph:  # topological order: one sweep follows every chain
        if node.op_type not in CARRIERS or node.domain not in ("", "ai.onnx"):
            continue
        data = node.inputs if node.op_type == "Concat" else node.inputs[:1]
        origin = next((carried[v.name] for v in data if v is not None and v.name in carried), None)
        if origin is not None:
            carried.update({v.name: origin for v in node.outputs if v.name})
    out: dict[str, Skip] = {}
    for name, tensors in layout.node_tensors.items():
        hit = next((t for t in tensors if t in carried and name not in kept), None)
        if hit is not None:
            out[name] = Skip(Reason.CARRIES_MIXED, {"tensor": hit, "concat": carried[hit]})
    return out


def settle(model: ir.Model, recipe: Recipe, layout: Layout, extremes: dict[str, tuple[float, float]]) -> Layout:
    """Keep float every static node that would quantize a mask-like tensor (see SENTINEL) or whose inputs' ranges
    do not fit one output scale (see MIN_STEPS), until none does: a node kept float can leave its neighbours
    quantizing what it produced or consumed. `extremes` are the calibrated (min, max) per tensor; mask constants
    the calibration data never exercised are added here."""
    extremes = dict(extremes)
    for name, value in constant_sentinels(model).items():
        lo, hi = extremes.get(name, (0.0, 0.0))
        extremes[name] = (min(lo, value), max(hi, value))
    keep: dict[str, Skip] = {}
    while more := (
        sentinel_nodes(layout, extremes)
        or mixed_range_nodes(model.graph, layout, extremes)
        or carried_mixed_nodes(model.graph, layout, keep)
    ):
        keep.update(more)
        layout = relayout(model, recipe, keep)
    return layout


def borrow_ranges(before: Layout, after: Layout, histograms: dict) -> None:
    """Settling can make a tensor its own source that shared another's scale before (the first quantized op past a
    node kept float, e.g. a sentinel's): it holds that source's values, moved, so it takes its histogram."""
    for s in after.sources():
        old = before.tensors.get(s)
        if s not in histograms and old in histograms:
            histograms[s] = histograms[old]


def replay(model: ir.Model, recipe: Recipe, layout: Layout, earlier: dict[str, Decision]) -> Layout:
    """Repeat an earlier plan's range-based decisions: they were made on data this run does not see."""
    keep = {n: Skip(d.code, d.details) for n, d in earlier.items() if not d.quantized and d.code in SETTLED}
    return relayout(model, recipe, keep) if keep else layout


# The names these had when sentinels were the only such decision.
settle_sentinels, replay_sentinels = settle, replay


def relayout(model: ir.Model, recipe: Recipe, keep_float: dict[str, Skip]) -> Layout:
    with warnings.catch_warnings():  # unmatched recipe rules were reported by the first layout
        warnings.simplefilter("ignore")
        return make_layout(model, recipe, calibrated=True, keep_float=keep_float)


# Ops that pass a mask constant's huge values on to their output (masks are built, broadcast and added to scores).
_CARRIES = frozenset(
    {
        "Add",
        "Sub",
        "Mul",
        "Where",
        "Max",
        "Min",
        "Neg",
        "Cast",
        "Identity",
        "Reshape",
        "Unsqueeze",
        "Squeeze",
        "Flatten",
        "Expand",
        "Tile",
        "Transpose",
        "Concat",
        "Slice",
        "Gather",
    }
)


def constant_sentinels(model: ir.Model) -> dict[str, float]:
    """Tensors that can carry a sentinel constant (|x| >= SENTINEL, e.g. a mask's -3.4e38) -> that value. A range
    seen in calibration misses it when no calibration input had padding; then it would be clipped at inference."""
    out: dict[str, float] = {}
    for node in model.graph:
        if node.op_type not in _CARRIES or node.domain not in ("", "ai.onnx"):
            continue
        found = None
        for v in node.inputs:
            if v is None:
                continue
            if v.name in out:
                found = out[v.name]
            elif v.const_value is not None and v.dtype is not None and v.dtype.is_floating_point():
                arr = v.const_value.numpy()
                if arr.size and np.abs(arr).max() >= SENTINEL:
                    found = float(arr.flat[np.abs(arr).argmax()])
        if found is not None:
            out.update({o.name: found for o in node.outputs if o is not None and o.name})
    return out
