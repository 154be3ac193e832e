"""Layers `lowbit auto` chooses a precision for, and the model of one assignment (layer -> precision).

Every assignment is the calibrated base plan re-applied with per-node rules (no new calibration), so two
assignments differ only in the layers they treat differently, and the written recipe + plan reproduce the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Literal

import onnx

from ..decision import Reason
from ..evaluate.layerwise import escape
from ..numerics import scale_zero_point
from ..pipeline import quantize
from ..plan import Plan, TensorParams
from ..recipe import Recipe, Rule, Scheme

Precision = Literal[
    "int8", "int16", "int4", "float", "int8_minmax", "int8_percentile", "int8_mse", "int8_entropy", "int8_noguard"
]
PRECISIONS: tuple[Precision, ...] = ("int8", "int16", "int4", "float")
# Zero-cost forms (variants.py): the layer still runs int8 kernels, with other int8 parameters. `int8_<method>`:
# its output's range chosen by that calibration method; `int8_noguard`: its weights without the overflow guard.
RANGE_VARIANTS: dict[Precision, str] = {
    "int8_minmax": "minmax",
    "int8_percentile": "percentile",
    "int8_mse": "mse",
    "int8_entropy": "entropy",
}
VARIANTS: tuple[Precision, ...] = (*RANGE_VARIANTS, "int8_noguard")
# int4 weights exist for MatMul/Gemm only (MatMulNBits, weight-only); a Conv takes no int4 form in ONNX Runtime.
INT4_OPS = ("MatMul", "Gemm")
WIDE = {"uint8": "uint16", "int8": "int16"}


@dataclass(frozen=True)
class Layer:
    """A quantized node that computes something, with the Relu/Clip folded into it and the activation tensors
    it reads and writes (what 16-bit activations widen)."""

    node: str
    op_type: str
    folded: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()  # quantized activation tensors it reads
    outputs: tuple[str, ...] = ()  # and writes (a folded Relu/Clip's output: the layer's)

    @property
    def tensors(self) -> tuple[str, ...]:
        return (*self.inputs, *self.outputs)

    def precisions(self) -> tuple[Precision, ...]:
        return tuple(p for p in PRECISIONS if p != "int4" or self.op_type in INT4_OPS)


def find_layers(float_model: onnx.ModelProto, plan: Plan) -> list[Layer]:
    """The base plan's quantized compute nodes in graph order; folded activations and shared-scale data movement
    are not layers (their error is their producer's)."""
    folded: dict[str, list[str]] = {}
    for name, d in plan.nodes.items():
        if d.code is Reason.FOLDED:
            folded.setdefault(d.details["into"], []).append(name)
    by_name = {n.name: n for n in float_model.graph.node}
    # `prepare` folds a zero Pad into the conv reading it, so the quantized conv reads the Pad's input: follow
    # such Pads back, or a depthwise conv after a static padding would seem to read no activation.
    pads = {n.output[0]: n.input[0] for n in float_model.graph.node if n.op_type == "Pad" and n.input and n.output}

    def unpadded(t: str) -> str:
        while t not in plan.tensors and t in pads:
            t = pads[t]
        return t

    found = []
    for name, d in plan.nodes.items():
        if not d.quantized or d.code in (Reason.FOLDED, Reason.SHARES_SCALE):
            continue
        node = by_name.get(name)
        members = [node] + [by_name[f] for f in folded.get(name, []) if f in by_name] if node else []

        def acts(names: list[str]) -> tuple[str, ...]:
            return tuple(t for t in dict.fromkeys(names) if (p := plan.tensors.get(t)) and p.kind == "activation")

        ins = acts([unpadded(t) for t in node.input]) if node else ()
        outs = acts([t for n in members for t in n.output])
        found.append(Layer(name, d.op_type, tuple(folded.get(name, [])), ins, tuple(t for t in outs if t not in ins)))
    order = {n.name: i for i, n in enumerate(float_model.graph.node)}
    return sorted(found, key=lambda x: order.get(x.node, len(order)))


@dataclass
class Builder:
    """Builds the model of an assignment from the float model and the calibrated base plan."""

    float_model: onnx.ModelProto
    plan: Plan
    layers: list[Layer]
    # variant -> tensor -> that method's parameters (variants.offer); layer -> the variants that change it
    ranges: dict[Precision, dict[str, TensorParams]] = field(default_factory=dict)
    offered: dict[str, tuple[Precision, ...]] = field(default_factory=dict)
    base: Recipe = field(init=False)

    def __post_init__(self) -> None:
        # Through JSON: an in-memory plan's recipe dict holds tuples, which Recipe.from_dict rejects.
        self.base = Recipe.from_dict(json.loads(json.dumps(self.plan.recipe)), "plan recipe")

    def scheme(self, layer: Layer, precision: Precision) -> Scheme | None:
        own = self.base.scheme_for(layer.node, layer.op_type)[0] or self.base.default
        if precision == "float":
            return None
        if precision == "int16":
            return replace(own, activations=WIDE.get(own.activations, own.activations), reduce_range=False)  # type: ignore[arg-type]
        if precision == "int4":
            return Scheme(mode="weight_only", weights="int4", block_size=32)
        if precision == "int8_noguard":
            return replace(own, avoid_overflow=False)
        return own

    def precisions(self, layer: Layer) -> tuple[Precision, ...]:
        """The layer's candidates; 16-bit activations only where the base scheme is static (calibrated ranges)."""
        own = self.base.scheme_for(layer.node, layer.op_type)[0] or self.base.default
        return tuple(p for p in layer.precisions() if p != "int16" or own.mode == "static")

    def recipe(self, assignment: dict[str, Precision]) -> Recipe:
        """The base recipe with one rule per layer not at int8 (first match wins, so these go first)."""
        rules = []
        for layer in self.layers:
            p = assignment.get(layer.node, "int8")
            if p == "int8" or p in RANGE_VARIANTS:  # a range variant is in the plan's tensors, not the recipe
                continue
            names = tuple(escape(n) for n in (layer.node, *layer.folded))
            # a folded Relu/Clip follows its producer into float; with int4 (weight-only) it stays float too
            rules.append(Rule(names=names, scheme=self.scheme(layer, p)))
        return replace(self.base, rules=(*rules, *self.base.rules))

    def tensors(self, assignment: dict[str, Precision]) -> dict[str, TensorParams]:
        """The plan's activation parameters, widened to 16 bits (same calibrated range) for int16 layers."""
        out = dict(self.plan.tensors)
        for layer in self.layers:  # first the range variants: a 16-bit reader widens the range its writer chose
            p = assignment.get(layer.node, "int8")
            if p in RANGE_VARIANTS:
                out.update({t: self.ranges[p][t] for t in self.written(layer)})
        for layer in self.layers:
            if assignment.get(layer.node) != "int16":
                continue
            for t in layer.tensors:
                old = out[t]
                if old.range is None or old.dtype not in WIDE:
                    continue
                wide = WIDE[old.dtype]
                lo, hi = old.range
                s, z = scale_zero_point(lo, hi, wide, self.base.default.symmetric_activations)
                out[t] = TensorParams(wide, [float(s)], [int(z)], None, "activation", [lo, hi])
        return out

    def written(self, layer: Layer) -> list[str]:
        """The activation tensors `layer` writes, with those data movement carries on at the same scale (a
        Reshape after a pool): a range variant changes them together."""
        found = list(layer.outputs)
        for node in self.float_model.graph.node:  # graph order: a chain of shared scales is followed in one pass
            d = self.plan.nodes.get(node.name)
            if d is not None and d.code is Reason.SHARES_SCALE and node.input and node.input[0] in found:
                found += [t for t in node.output if t in self.plan.tensors]
        return found

    def build(self, assignment: dict[str, Precision]) -> tuple[onnx.ModelProto, Plan, Recipe]:
        recipe = self.recipe(assignment)
        plan = replace(self.plan, tensors=self.tensors(assignment))
        result = quantize(self.float_model, recipe=recipe, plan=plan, progress=False)
        return result.model, result.plan, recipe

    def everywhere(self, precision: Precision) -> dict[str, Precision]:
        """Every layer at `precision` where it has that form, else int8."""
        return {x.node: precision if precision in self.precisions(x) else "int8" for x in self.layers}
