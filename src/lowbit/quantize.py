"""The main job, left to right: load -> prepare -> plan what to observe -> calibrate -> decide -> rewrite -> save."""

from __future__ import annotations

import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from .apply import apply
from .calibrate import Statistics, calibrate
from .data import ImagePreprocess, input_specs, open_data
from .errors import LowbitError
from .graph.io import check_output_path, load_model, save_model
from .numerics import scale_zero_point
from .observe import select_range
from .passes import prepare
from .plan import NodeEntry, Plan, TensorParams, plan_path
from .planner import SENTINEL_REASON, Layout, constant_sentinels, make_layout, sentinel_nodes
from .recipe import Recipe, Scheme


@dataclass
class QuantizeResult:
    model: onnx.ModelProto
    plan: Plan
    float_bytes: int
    quantized_bytes: int
    seconds: float
    output: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)


def quantize(
    model: str | Path | onnx.ModelProto,
    output: str | Path | None = None,
    calib: Any = None,
    recipe: Recipe | str | Path | None = None,
    plan: Plan | str | Path | None = None,
    preprocess: ImagePreprocess | None = None,
    progress: bool = True,
    example_inputs: Any = None,
) -> QuantizeResult:
    """Quantize a float ONNX model to QDQ int8.

    `calib` is anything `open_data` reads (.npy/.npz file or folder, image folder, iterable of arrays or dicts).
    With `plan` (from an earlier run) no calibration happens: activation ranges come from the plan and
    weights are quantized from this model's values. A torch.nn.Module is exported to ONNX with
    `example_inputs` (a tuple of tensors) first. With `output`, the model and its plan
    (`OUT.plan.json`) are written atomically.
    """
    start = time.perf_counter()
    # A torch.nn.Module (with example_inputs) is exported to ONNX first; torch is only imported if already loaded.
    if "torch" in sys.modules and isinstance(model, sys.modules["torch"].nn.Module):
        from .torch.onnx_export import module_to_onnx
        model = module_to_onnx(model, example_inputs)
    if isinstance(plan, (str, Path)):
        plan = Plan.load(plan)
    # Re-applying a plan without a recipe means the plan's own recipe: the same nodes get the same treatment.
    recipe = Recipe.from_dict(plan.recipe, "plan recipe") if recipe is None and plan is not None else _recipe(recipe)
    if output is not None:
        check_output_path(output, [model] if isinstance(model, (str, Path)) else [])

    if isinstance(model, (str, Path)):
        ir_model, float_bytes = load_model(model), Path(model).stat().st_size
    else:
        # onnx-ir shares tensor buffers with the proto it reads; the caller's model must not change.
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        ir_model, float_bytes = ir.from_proto(copy), model.ByteSize()
    specs = input_specs(ir.to_proto(ir_model))
    timings: dict[str, float] = {}
    t = time.perf_counter()
    prepare(ir_model)
    layout = make_layout(ir_model, recipe, calibrated=calib is not None or plan is not None)
    # Only static quantization needs activation ranges; dynamic, weight-only and float16 nodes need no data.
    if calib is None and plan is None and layout.tensors:
        raise LowbitError("calibration data is required for static quantization: pass --calib DATA (or --plan "
                          "PLAN.json to reuse ranges), or choose a mode that needs none (--mode dynamic)")
    timings["prepare"] = time.perf_counter() - t

    t = time.perf_counter()
    if plan is None and not layout.tensors:
        tensors, samples, means = {}, 0, {}
    elif plan is None:
        source = open_data(calib, specs, batch_size=recipe.batch_size, preprocess=preprocess,
                           limit=recipe.calibration_samples)
        observed = {s for s in layout.sources() if not _is_constant(ir_model, s)}
        total = min(x for x in (source.num_samples, recipe.calibration_samples) if x is not None)
        stats = calibrate(ir_model, observed, layout.channel_stats, source, total=total, progress=progress)
        layout = _without_sentinels(ir_model, recipe, layout, stats)
        tensors = decide_activations(ir_model, layout, stats)
        samples = stats.samples
        means = {k: [float(v) for v in c.mean] for k, c in sorted(stats.channels.items()) if c.mean is not None}
    else:
        # The plan's sentinel decisions were made on data this run does not see: repeat them.
        keep = {n: e.reason for n, e in plan.nodes.items() if not e.quantized and e.reason.startswith(SENTINEL_REASON)}
        if keep:
            layout = _relayout(ir_model, recipe, keep)
        tensors = _activations_from_plan(ir_model, layout, plan)
        samples, means = plan.calibration_samples, plan.channel_means
    timings["calibrate"] = time.perf_counter() - t

    t = time.perf_counter()
    new_plan = Plan(recipe=recipe.to_dict(), tensors=tensors, calibration_samples=samples, channel_means=means)
    new_plan.nodes = {d.name: NodeEntry(d.op_type, d.quantized, d.reason, d.rule) for d in layout.nodes.values()}
    apply(ir_model, layout, new_plan)
    proto = ir.to_proto(ir_model)
    # The shapes lowbit inferred are for planning only. Written out, their consistent symbolic dims let ONNX Runtime
    # fuse residual Add + LayerNormalization into SkipLayerNormalization, whose CPU kernel ran 4-5x slower than the
    # pair (ORT 1.32, 1 thread, MiniLM shapes): 15-20% of MiniLM's dynamic int8 latency. ORT infers what it needs.
    del proto.graph.value_info[:]
    _align_add_rounding(proto, new_plan)
    proto.producer_name, proto.producer_version = "lowbit", new_plan.lowbit_version
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:  # a bug in lowbit, not a user mistake: keep the detail
        raise RuntimeError(f"lowbit produced an invalid model: {e}") from e
    timings["rewrite"] = time.perf_counter() - t
    result = QuantizeResult(proto, new_plan, float_bytes, proto.ByteSize(), time.perf_counter() - start, timings=timings)
    if output is not None:
        save_model(proto, output)
        new_plan.save(plan_path(output))
        result.output = Path(output)
    return result


def _align_add_rounding(proto: onnx.ModelProto, plan: Plan) -> None:
    """LiteRT's (XNNPACK) int8 ADD rounds 21-bit scale ratios, ONNX Runtime's float32 ones; on EfficientNet-Lite0
    a few values near half steps came out one step apart and flipped 4 of 256 top-1 answers. Nudging each Add's
    scales by ~1e-7 makes both runtimes compute the same integers (docs/tflite.md). The plan keeps the nudged
    scales, so re-applying it reproduces the same bytes."""
    from .export.tflite.rounding import snap_add_scales

    if not snap_add_scales(proto):
        return
    inits = {t.name: t for t in proto.graph.initializer}
    for n in proto.graph.node:
        p = plan.tensors.get(n.input[0]) if n.op_type == "QuantizeLinear" else None
        if p is not None and p.axis is None and n.input[1] in inits:
            p.scale = [float(onnx.numpy_helper.to_array(inits[n.input[1]]).reshape(()))]


def _recipe(recipe: Recipe | str | Path | None) -> Recipe:
    if recipe is None:
        return Recipe()
    if isinstance(recipe, Recipe):
        return recipe
    return Recipe.load(recipe)


def _relayout(model: ir.Model, recipe: Recipe, keep_float: dict[str, str]) -> Layout:
    with warnings.catch_warnings():  # unmatched recipe rules were reported by the first layout
        warnings.simplefilter("ignore")
        return make_layout(model, recipe, calibrated=True, keep_float=keep_float)


def _without_sentinels(model: ir.Model, recipe: Recipe, layout: Layout, stats: Statistics) -> Layout:
    """Keep float every static node that would quantize a mask-like tensor (see planner.SENTINEL), until none does:
    a node kept float can leave its neighbours quantizing what it produced or consumed."""
    extremes = {k: (h.min, h.max) for k, h in stats.histograms.items() if h.count}
    for name, value in constant_sentinels(model).items():  # masks the calibration data never exercised
        lo, hi = extremes.get(name, (0.0, 0.0))
        extremes[name] = (min(lo, value), max(hi, value))
    keep: dict[str, str] = {}
    while more := sentinel_nodes(layout, extremes):
        keep.update(more)
        layout = _relayout(model, recipe, keep)
    return layout


def _is_constant(model: ir.Model, name: str) -> bool:
    return name in model.graph.initializers


def _params(a: float, b: float, scheme: Scheme) -> TensorParams:
    s, z = scale_zero_point(a, b, scheme.activations, scheme.symmetric_activations)
    return TensorParams(scheme.activations, [float(s)], [int(z)], None, "activation", [float(a), float(b)])


def decide_activations(model: ir.Model, layout: Layout, stats: Statistics) -> dict[str, TensorParams]:
    """Ranges from the observers, by each tensor's scheme; tensors sharing a scale copy their source's."""
    out: dict[str, TensorParams] = {}
    outputs = {v.name for v in model.graph.outputs}
    for name, source in sorted(layout.tensors.items()):
        scheme = layout.tensor_scheme[source] if source in layout.tensor_scheme else layout.tensor_scheme[name]
        if _is_constant(model, source):
            arr = model.graph.initializers[source].const_value.numpy()
            a, b = float(arr.min()), float(arr.max())
        else:
            hist = stats.histograms.get(source)
            if hist is None:
                raise RuntimeError(f"tensor {source} was not observed")
            # Clipping a model output clips exactly the largest logits, which decide the answer.
            method = "minmax" if name in outputs else scheme.calibration
            kw = {"p": scheme.percentile} if method == "percentile" else {}
            a, b = select_range(hist, method, **kw)
        out[name] = _params(a, b, scheme)
    return out


def _activations_from_plan(model: ir.Model, layout: Layout, plan: Plan) -> dict[str, TensorParams]:
    missing = [t for t in layout.tensors if t not in plan.tensors]
    if missing:
        raise LowbitError(
            f"the plan does not match this model: no parameters for tensor '{missing[0]}' "
            f"({len(missing)} missing); re-run calibration with --calib"
        )
    return {t: plan.tensors[t] for t in layout.tensors}


__all__ = ["quantize", "QuantizeResult"]
