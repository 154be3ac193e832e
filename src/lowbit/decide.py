"""The decide stage: activation parameters (scale, zero point) for every tensor the layout quantizes, from the
calibration statistics or from an earlier plan."""

from __future__ import annotations

from dataclasses import replace

import onnx_ir as ir

from .calibrate import Statistics
from .errors import LowbitError
from .numerics import scale_zero_point
from .observe import select_range
from .plan import Plan, TensorParams
from .planner import Layout
from .ranges_by_error import METHODS, choose_ranges, wanted
from .recipe import Scheme

# A mean with its input's exact scale lands on exact halves (a sum of an even count of integers), which ONNX
# Runtime's QLinearGlobalAveragePool and the float simulation round differently (1 step on 0.1-0.2% of channels,
# each moving an SE gate for a whole channel: MobileNetV3-Small kernels vs simulation 0.9975). A scale this much
# larger moves every half just below it, where both round the same (0.9990), and changes nothing else.
TIE_NUDGE = 2.0**-20


def _params(a: float, b: float, scheme: Scheme, nudge: bool = False) -> TensorParams:
    s, z = scale_zero_point(a, b, scheme.activations, scheme.symmetric_activations)
    scale = float(s) * (1.0 + TIE_NUDGE) if nudge else float(s)
    return TensorParams(scheme.activations, [scale], [int(z)], None, "activation", [float(a), float(b)])


def decide_activations(model: ir.Model, layout: Layout, stats: Statistics) -> dict[str, TensorParams]:
    """Ranges from the observers, by each tensor's scheme; tensors sharing a scale copy their source's."""
    out: dict[str, TensorParams] = {}
    outputs = {v.name for v in model.graph.outputs}
    by_error = {}
    if wanted(layout):  # calibration "layer_error": ranges chosen by the error they cause where they are read
        by_error = choose_ranges(model, layout, stats.histograms, stats.inputs, held=stats.held)
    for name, source in sorted(layout.tensors.items()):
        scheme = layout.tensor_scheme[source] if source in layout.tensor_scheme else layout.tensor_scheme[name]
        if source in model.graph.initializers:
            tensor = model.graph.initializers[source].const_value
            assert tensor is not None
            arr = tensor.numpy()
            a, b = float(arr.min()), float(arr.max())
        else:
            hist = stats.histograms.get(source)
            if hist is None:
                raise RuntimeError(f"tensor {source} was not observed")
            # Clipping a model output clips exactly the largest logits, which decide the answer.
            method = "minmax" if name in outputs else scheme.calibration
            if method in METHODS and source in by_error:
                a, b = by_error[source][0]
            else:  # the error methods keep min-max where no other candidate was measured
                kw = {"p": scheme.percentile} if method == "percentile" else {}
                a, b = select_range(hist, "minmax" if method in METHODS else method, **kw)
        out[name] = _params(a, b, scheme, nudge=name in layout.nudged)
    return out


def activations_from_plan(layout: Layout, plan: Plan) -> dict[str, TensorParams]:
    missing = [t for t in layout.tensors if t not in plan.tensors]
    if missing:
        raise LowbitError(
            f"the plan does not match this model: no parameters for tensor '{missing[0]}' "
            f"({len(missing)} missing); re-run calibration with --calib"
        )
    return {t: _as_calibrated(plan.tensors[t]) for t in layout.tensors}


def _as_calibrated(p: TensorParams) -> TensorParams:
    """A copy (the target adjusts what the run uses in place, never the caller's plan) with the parameters before
    the target adjusted them, which it adjusts again as in the first run, unless they were edited since."""
    if p.adapted is None or [float(v) for v in p.adapted[2:]] != [p.scale[0], p.zero_point[0]]:
        return replace(p, scale=list(p.scale), zero_point=list(p.zero_point))
    return replace(p, scale=[float(p.adapted[0])], zero_point=[int(p.adapted[1])])
