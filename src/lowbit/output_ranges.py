"""The calibrated range of every float graph output, recorded in the plan (`Plan.output_ranges`).

An exporter needs an output's range to give it int8 parameters, and lowbit leaves some outputs float (a
classifier's last Gemm: its largest logits decide the answer). Graph outputs are computed on every calibration
batch anyway, so observing them costs one histogram each, and the export is full-integer without data."""

from __future__ import annotations

from dataclasses import replace

import onnx_ir as ir

from .calibrate import Statistics
from .planner import Layout


def float_outputs(model: ir.Model) -> list[str]:
    return [v.name for v in model.graph.outputs if v.name and v.dtype == ir.DataType.FLOAT]


def observing_outputs(model: ir.Model, layout: Layout) -> Layout:
    """A copy of `layout` for the calibrate stage whose observed tensors include every float graph output (only
    calibration sees it: the layout that is applied stays as it was)."""
    extra = {o: o for o in float_outputs(model) if o not in layout.tensors}
    return replace(layout, tensors={**layout.tensors, **extra}) if extra else layout


def output_ranges(model: ir.Model, observed: Layout, stats: Statistics) -> dict[str, list[float]]:
    """Each float output's [min, max] as calibration saw it (a quantized output: its scale's source tensor)."""
    seen = stats.extremes()
    out = {}
    for name in float_outputs(model):
        source = observed.tensors.get(name, name)
        if source in seen:
            lo, hi = seen[source]
            out[name] = [float(lo), float(hi)]
    return out
