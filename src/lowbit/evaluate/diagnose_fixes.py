"""The fixes `diagnose` tries on a bad layer (per-channel weights, percentile ranges, 16-bit activations; for
weight-only int4, a smaller block or int8 weights), each measured alone, and the one it suggests: the best final-
output SQNR gain per unit of device cost, or keep-float when nothing cheaper helps."""

from __future__ import annotations

import math
from dataclasses import replace

from ..numerics import scale_zero_point
from ..observe import Histogram, percentile
from ..plan import Plan, TensorParams
from ..recipe import BLOCK_SIZES, ActivationType, Rule, Scheme
from .layerwise import Layer, Trials, escape

# Relative cost of a fix on the device: per-channel weights and percentile ranges are free, 16-bit activations
# run as com.microsoft Q/DQ around float ops in ONNX Runtime (no integer kernel), float costs the most.
COST = {"per_channel": 1.0, "percentile": 1.0, "uint16": 2.0}
# Weight-only int4: halving the block size adds one float scale per block (file a little larger), int8 weights
# double the layer's weight bytes; both keep the same kind of kernel.
COST.update({"smaller_block": 1.0, "int8_weights": 2.0})
MIN_GAIN_DB = 1.0  # a fix must buy at least this much final-output SQNR to be suggested
OUTLIER_RATIO = 2.0  # min-max range this many times the 99.99% range: outliers set the scale


def outlier_ratio(h: Histogram | None) -> float:
    if h is None:
        return 1.0
    a, b = percentile(h, 99.99)
    return (h.max - h.min) / (b - a) if b > a else math.inf if h.max > h.min else 1.0


def params(a: float, b: float, dtype: str, symmetric: bool) -> TensorParams:
    s, z = scale_zero_point(a, b, dtype, symmetric)
    return TensorParams(dtype, [float(s)], [int(z)], None, "activation", [float(a), float(b)])


def candidates(x: Layer, scheme: Scheme, stats, plan: Plan) -> list[tuple[str, Scheme, dict[str, TensorParams]]]:
    """(kind, scheme, tensor overrides) for every fix that applies to this layer."""
    found: list[tuple[str, Scheme, dict[str, TensorParams]]] = []
    if x.has_weight and not x.per_channel:
        found.append(("per_channel", replace(scheme, per_channel=True), {}))
    if scheme.mode == "weight_only" and scheme.weights == "int4":
        block = scheme.block_size or 32
        if block // 2 in BLOCK_SIZES:
            found.append(("smaller_block", replace(scheme, block_size=block // 2), {}))
        found.append(("int8_weights", replace(scheme, weights="int8", block_size=None), {}))
    old = plan.tensors.get(x.output) if x.output else None
    # A node with quantized activations under a dynamic recipe is a convolution that fell back to static (calibration
    # was given): its activation fixes are static schemes, which the dynamic mode could not express.
    static = replace(scheme, mode="static") if scheme.mode != "static" and old is not None else scheme
    is_output = x.output in stats.outputs  # model outputs are never clipped by calibration
    # (old is only found under an output; `x.output is not None` narrows the type)
    if x.output is not None and old is not None and old.range is not None and not is_output:
        h = stats.histograms.get(x.output)
        if scheme.calibration != "percentile" and outlier_ratio(h) >= OUTLIER_RATIO:
            a, b = percentile(h, scheme.percentile)
            found.append(
                (
                    "percentile",
                    replace(static, calibration="percentile"),
                    {x.output: params(a, b, old.dtype, scheme.symmetric_activations)},
                )
            )
        if old.dtype not in ("uint16", "int16"):
            wide: ActivationType = "int16" if old.dtype == "int8" else "uint16"
            lo, hi = old.range
            found.append(
                (
                    "uint16",
                    replace(static, activations=wide, reduce_range=False),
                    {x.output: params(lo, hi, wide, scheme.symmetric_activations)},
                )
            )
    return found


def suggest(x: Layer, row: dict, stats, trials: Trials, typical: float) -> tuple[dict, Rule | None]:
    scheme = trials.scheme(x.node, x.op_type)
    assert scheme is not None  # x is a quantized layer, so the recipe gives it a scheme
    base = row["alone_sqnr_db"]
    tried: dict[str, float] = {}
    best = None
    for kind, new, tensors in candidates(x, scheme, stats, trials.plan):
        got = trials.alone(x, new, tensors)["sqnr_db"]
        tried[kind] = got
        gain = min(got, 100.0) - min(base, 100.0)
        if gain >= MIN_GAIN_DB and (best is None or gain / COST[kind] > best[0]):
            best = (gain / COST[kind], kind, new, got)
    rule_names = (escape(x.node),)
    if best is not None:
        _, kind, new, got = best
        why = f"alone SQNR {db(base)} -> {db(got)} with {LABEL[kind]}"
        if kind == "uint16":
            why += "; ONNX Runtime runs 16-bit Q/DQ (com.microsoft) around float ops, so this layer gets slower"
        return {"kind": kind, "why": why, "tried": tried}, Rule(names=rule_names, scheme=new)
    if base < typical - 6.0:
        why = f"alone SQNR {db(base)} (typical layer {db(typical)}) and no cheaper fix gained {MIN_GAIN_DB:g} dB" + (
            f" (tried {', '.join(tried)})" if tried else ""
        )
        return {"kind": "keep_float", "why": why, "tried": tried}, Rule(names=rule_names, scheme=None)
    return {
        "kind": "none",
        "why": f"alone SQNR {db(base)} is typical and no fix gained {MIN_GAIN_DB:g} dB",
        "tried": tried,
    }, None


LABEL = {
    "per_channel": "per-channel weights",
    "percentile": "percentile calibration",
    "uint16": "16-bit activations",
    "smaller_block": "half the int4 block size",
    "int8_weights": "int8 weights",
}


def db(v: float) -> str:
    return "inf dB" if math.isinf(v) else f"{v:.1f} dB"
