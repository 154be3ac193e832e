"""The main job, stage by stage: load -> prepare -> layout -> calibrate -> decide -> rewrite -> verify -> save.

Each stage lives in the module that owns it; this module only hands each one's result to the next."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from .apply import apply
from .calibrate import calibrate_layout
from .data import ImagePreprocess, InputSpec, input_specs
from .decide import activations_from_plan, decide_activations
from .errors import LowbitError
from .graph.io import check_output_path, check_writable, load_model, model_name, save_model
from .passes import prepare
from .passes.opset import ready_for_quantization
from .plan import Plan, TensorParams, plan_path
from .planner import Layout, make_layout, replay_sentinels, settle_sentinels
from .recipe import Recipe
from .verify import finish


@dataclass
class QuantizeResult:
    model: onnx.ModelProto
    plan: Plan
    float_bytes: int
    quantized_bytes: int
    seconds: float
    output: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class Loaded:
    """The load stage's hand-off: the float model as IR, its size on disk (or serialized) and its inputs."""

    model: ir.Model
    float_bytes: int
    inputs: list[InputSpec]


@dataclass
class Decided:
    """The calibrate and decide stages' hand-off: the final layout and every activation's parameters."""

    layout: Layout
    tensors: dict[str, TensorParams]
    samples: int
    channel_means: dict[str, list[float]]


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
        check_writable(output)  # before calibration, not after it
    timings: dict[str, float] = {}

    loaded = load(model)
    t = time.perf_counter()
    prepare(loaded.model)
    layout = make_layout(loaded.model, recipe, calibrated=calib is not None or plan is not None)
    # Only static quantization needs activation ranges; dynamic, weight-only and float16 nodes need no data.
    if calib is None and plan is None and layout.tensors:
        raise LowbitError(
            "calibration data is required for static quantization: pass --calib DATA (or --plan "
            "PLAN.json to reuse ranges), or choose a mode that needs none (--mode dynamic)"
        )
    timings["prepare"] = time.perf_counter() - t

    t = time.perf_counter()
    decided = observe_and_decide(loaded, layout, recipe, calib, plan, preprocess, progress)
    timings["calibrate"] = time.perf_counter() - t

    t = time.perf_counter()
    new_plan = Plan(
        recipe=recipe.to_dict(),
        tensors=decided.tensors,
        calibration_samples=decided.samples,
        channel_means=decided.channel_means,
    )
    new_plan.nodes = decided.layout.decisions()
    apply(loaded.model, decided.layout, new_plan)
    proto = finish(loaded.model, new_plan, recipe.target)
    timings["rewrite"] = time.perf_counter() - t
    result = QuantizeResult(
        proto, new_plan, loaded.float_bytes, proto.ByteSize(), time.perf_counter() - start, timings=timings
    )
    if output is not None:
        save(proto, new_plan, output)
        result.output = Path(output)
    return result


def load(model: str | Path | onnx.ModelProto) -> Loaded:
    ir_model = load_model(model)  # a ModelProto is copied: the caller's model must not change
    float_bytes = Path(model).stat().st_size if isinstance(model, (str, Path)) else model.ByteSize()
    ir_model = ready_for_quantization(ir_model, model_name(model))  # unknown ops, opset < 13
    return Loaded(ir_model, float_bytes, input_specs(ir.to_proto(ir_model)))


def observe_and_decide(
    loaded: Loaded,
    layout: Layout,
    recipe: Recipe,
    calib: Any,
    plan: Plan | None,
    preprocess: ImagePreprocess | None,
    progress: bool,
) -> Decided:
    """Calibrate and decide activation parameters, or take them from an earlier plan."""
    model = loaded.model
    if plan is None and not layout.tensors:
        return Decided(layout, {}, 0, {})
    if plan is None:
        stats = calibrate_layout(model, layout, calib, loaded.inputs, recipe, preprocess, progress)
        layout = settle_sentinels(model, recipe, layout, stats.extremes())
        means = {k: [float(v) for v in c.mean] for k, c in sorted(stats.channels.items()) if c.mean is not None}
        return Decided(layout, decide_activations(model, layout, stats), stats.samples, means)
    layout = replay_sentinels(model, recipe, layout, plan.nodes)
    return Decided(layout, activations_from_plan(layout, plan), plan.calibration_samples, plan.channel_means)


def save(proto: onnx.ModelProto, plan: Plan, output: str | Path) -> None:
    save_model(proto, output)
    plan.save(plan_path(output))


def _recipe(recipe: Recipe | str | Path | None) -> Recipe:
    if recipe is None:
        return Recipe()
    if isinstance(recipe, Recipe):
        return recipe
    return Recipe.load(recipe)


__all__ = ["quantize", "QuantizeResult"]
