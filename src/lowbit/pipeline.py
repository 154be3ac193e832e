"""The main job, stage by stage: load -> prepare -> layout -> calibrate -> decide -> rewrite -> verify -> save.

Each stage lives in the module that owns it; this module only hands each one's result to the next."""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import onnx
import onnx_ir as ir

from .adaround import check_data, round_weights
from .apply import apply
from .branches import merge_plans, quantize_branches
from .calibrate import calibrate_layout, open_calibration
from .data import BatchAxes, ImagePreprocess, InputSpec, batch_axes_for, input_specs
from .decide import activations_from_plan, decide_activations
from .errors import LowbitError
from .graph.external import data_path, external_base, trim_heap
from .graph.io import check_writable, external_files, load_model, model_files, model_name
from .graph.write import check_output_path, check_paths, write_together
from .output_ranges import observing_outputs, output_ranges
from .passes import bias_empirical, prepare, recover
from .passes.opset import already_quantized_note, ready_for_quantization
from .passes.subnormals import find_subnormals, flush_subnormals, subnormal_warning
from .plan import Plan, TensorParams, graph_fingerprint, plan_path
from .planner import Layout, make_layout
from .recipe import Recipe
from .settle import borrow_ranges, replay, settle
from .shard import check_workers
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
    # Things the user should act on that do not stop the run (float weights full of subnormals), one sentence each.
    warnings: list[str] = field(default_factory=list)
    # The float model kept its weights in external data: the output is written as OUT.onnx + OUT.onnx.data too.
    external_data: bool = False


@dataclass
class Loaded:
    """The load stage's hand-off: the float model as IR, its size on disk (or serialized) and its inputs, and
    whether its weights are in external data (they stay on disk, memory-mapped, until quantized)."""

    model: ir.Model
    float_bytes: int
    inputs: list[InputSpec]
    external: bool = False


@dataclass
class Decided:
    """The calibrate and decide stages' hand-off: the final layout and every activation's parameters."""

    layout: Layout
    tensors: dict[str, TensorParams]
    samples: int
    channel_means: dict[str, list[float]]
    output_ranges: dict[str, list[float]] = field(default_factory=dict)


def quantize(
    model: str | Path | onnx.ModelProto,
    output: str | Path | None = None,
    calib: Any = None,
    recipe: Recipe | str | Path | None = None,
    plan: Plan | str | Path | None = None,
    preprocess: ImagePreprocess | None = None,
    progress: bool = True,
    example_inputs: Any = None,
    *,
    reuse_ranges: bool = False,
    workers: int = 1,
    ray_address: str | None = None,
    batch_axes: BatchAxes | None = None,
) -> QuantizeResult:
    """Quantize a float ONNX model to QDQ int8.

    `calib` is anything `open_data` reads (.npy/.npz file or folder, image folder, iterable of arrays or dicts).
    With `plan` (from an earlier run) no calibration happens: activation ranges come from the plan and
    weights are quantized from this model's values. The plan must have been made for a graph of the same
    structure (its fingerprint: node names, op types, tensor names); `reuse_ranges=True` applies its ranges to
    a graph of another structure anyway (every activation the new graph quantizes still needs a range in the
    plan). A torch.nn.Module is exported to ONNX with `example_inputs` (a tuple of tensors) first. With
    `output`, the model and its plan (`OUT.plan.json`) are written together: both or neither (see `save`).
    With `workers` > 1 (or a `ray_address`), calibration runs as Ray tasks (`pip install lowbit[ray]`; `calib`
    must be a path) and gives the same bytes as one process.
    `batch_axes` maps an input to the axis its calibration samples are stacked on (recurrent state [2, B, 64]: 1) or
    to None when it is constant across samples (a sample rate; 0-d inputs are, without saying); others use axis 0.
    """
    start = time.perf_counter()
    # A torch.nn.Module (with example_inputs) is exported to ONNX first; torch is only imported if already loaded.
    if "torch" in sys.modules and isinstance(model, sys.modules["torch"].nn.Module):
        from .torch.onnx_export import module_to_onnx

        model = module_to_onnx(model, example_inputs)
    # Before any work: nothing this run writes may be something it reads, however spelled.
    if output is not None:
        check_output_path(output, [model] if isinstance(model, (str, Path)) else [])
        check_paths(outputs(output), reads(model, calib, recipe, plan))
        check_writable(output)  # before calibration, not after it
    if plan is not None and calib is not None:
        raise LowbitError(
            "calibration data is not used when a plan is given (its ranges are reused): drop --calib (calib=) "
            "to re-apply the plan, or drop --plan (plan=) to calibrate afresh"
        )
    check_workers(workers, calib, ray_address)
    if isinstance(plan, (str, Path)):
        plan = Plan.load(plan)
    elif plan is not None:
        if not isinstance(plan, Plan):
            raise LowbitError(f"plan must be a Plan or a path to a .plan.json file, got {type(plan).__name__}")
        plan.validate("the plan passed in")
    # Re-applying a plan without a recipe means the plan's own recipe: the same nodes get the same treatment.
    recipe = Recipe.from_dict(plan.recipe, "plan recipe") if recipe is None and plan is not None else _recipe(recipe)
    check_data(recipe, calib)
    bias_empirical.check_data(recipe, calib)
    timings: dict[str, float] = {}

    loaded = load(model)
    bias_empirical.check_model(recipe, loaded.external)
    before = already_quantized_note(loaded.model)
    t = time.perf_counter()
    prepare(loaded.model)
    if recipe.flush_subnormals:
        flush_subnormals(loaded.model)
    smooth_scales = recover(loaded.model, recipe, *_recovery_data(loaded, recipe, calib, plan, preprocess, batch_axes))
    # Inside Ifs whose condition is computed at run time (a whole model behind a sample-rate switch): see branches.py
    loaded.model, branch_plans, branch_notes = quantize_branches(
        loaded.model, recipe, calib, plan, loaded.inputs, preprocess, batch_axes
    )
    layout = make_layout(loaded.model, recipe, calibrated=calib is not None or plan is not None)
    fingerprint = graph_fingerprint(loaded.model.graph)  # after make_layout: every node has its unique name
    if plan is not None:
        _check_fingerprint(plan, fingerprint, reuse_ranges)
    # Only static quantization needs activation ranges; dynamic, weight-only and float16 nodes need no data.
    if calib is None and plan is None and layout.tensors:
        raise LowbitError(
            "calibration data is required for static quantization: pass --calib DATA (or --plan "
            "PLAN.json to reuse ranges), or choose a mode that needs none (--mode dynamic)"
        )
    timings["prepare"] = time.perf_counter() - t

    t = time.perf_counter()
    if batch_axes is not None:
        batch_axes_for(loaded.inputs, batch_axes)  # names and axes, before any work
    decided = observe_and_decide(
        loaded, layout, recipe, calib, plan, preprocess, progress, workers, ray_address, batch_axes, timings
    )
    timings["decide"] = time.perf_counter() - t - timings.get("calibrate", 0.0)

    t = time.perf_counter()
    rounding, rounding_record, rounding_notes = round_weights(
        loaded, decided, recipe, calib, plan, preprocess, batch_axes, progress
    )
    if rounding_record and plan is None:  # learned now, not read from the plan
        timings["adaround"] = time.perf_counter() - t

    t = time.perf_counter()
    new_plan = Plan(
        recipe=recipe.to_dict(),
        tensors=decided.tensors,
        calibration_samples=decided.samples,
        channel_means=decided.channel_means,
        graph_fingerprint=fingerprint,
        smooth_scales=smooth_scales,
        output_ranges=decided.output_ranges,
        adaround=rounding_record,
    )
    new_plan.nodes = decided.layout.decisions()
    weights = set(loaded.model.graph.initializers)  # the model's own, not the quantization parameters apply adds
    empirical = recipe.empirical_bias_correction and bool(decided.layout.biases)
    side = bias_empirical.capture(loaded.model, decided.layout) if empirical and plan is None else None
    apply(loaded.model, decided.layout, new_plan, rounding)
    if empirical:
        t_bias = time.perf_counter()
        bias_empirical.correct_biases(
            loaded.model,
            decided.layout,
            new_plan,
            side,
            plan,
            lambda: open_calibration(calib, loaded.inputs, recipe, preprocess, batch_axes),
        )
        timings["bias_correction"] = time.perf_counter() - t_bias
    notes = [w for w in [subnormal_warning(find_subnormals(loaded.model, weights))] if w]  # those still float
    proto = finish(loaded.model, new_plan, recipe.target)
    merge_plans(new_plan, branch_plans)  # after apply, which quantizes every tensor the plan names in the main graph
    _drop_weights(loaded.model)  # the proto holds them now: one copy of the quantized model, not two
    timings["rewrite"] = time.perf_counter() - t - timings.get("bias_correction", 0.0)
    result = QuantizeResult(
        proto, new_plan, loaded.float_bytes, proto.ByteSize(), time.perf_counter() - start, timings=timings
    )
    result.warnings = [n for n in [before] if n] + branch_notes + notes + rounding_notes
    result.external_data = loaded.external
    if output is not None:
        save(proto, new_plan, output, loaded.external)
        result.output = Path(output)
    return result


def _drop_weights(model: ir.Model) -> None:
    for v in model.graph.initializers.values():
        v.const_value = None
    trim_heap()


def outputs(output: str | Path) -> list[tuple[str, str | Path]]:
    """What `quantize(..., output)` writes, labelled for error messages."""
    return [
        ("-o", output),
        ("plan file (beside -o)", plan_path(output)),
        ("external data file (beside -o)", data_path(output)),
    ]


def reads(model: Any, calib: Any, recipe: Any, plan: Any) -> list[tuple[str, Any]]:
    """What `quantize` reads, labelled for error messages (in-memory values are skipped by `check_paths`)."""
    found = external_files(model) if isinstance(model, (str, Path)) else []
    return [
        ("input model", model),
        *[("input model's external data", f) for f in found],
        ("calibration data", calib),
        ("recipe", recipe),
        ("plan", plan),
    ]


def _check_fingerprint(plan: Plan, fingerprint: str, reuse_ranges: bool) -> None:
    # Plans from before fingerprints are applied as they always were; tensor names are still matched.
    if plan.graph_fingerprint is None or plan.graph_fingerprint == fingerprint or reuse_ranges:
        return
    raise LowbitError(
        "the plan does not match this model: it was made for a graph of another structure (node names, op types "
        "or tensor names differ); re-run calibration with --calib, or pass --reuse-ranges (reuse_ranges=True) "
        "to apply its ranges anyway"
    )


def load(model: str | Path | onnx.ModelProto) -> Loaded:
    ir_model = load_model(model)  # a ModelProto is copied: the caller's model must not change
    external = external_base(ir_model) is not None
    float_bytes = Path(model).stat().st_size if isinstance(model, (str, Path)) else model.ByteSize()
    if external:
        float_bytes += sum(f.stat().st_size for f in external_files(model))
    ir_model = ready_for_quantization(ir_model, model_name(model))  # unknown ops, opset < 13
    return Loaded(ir_model, float_bytes, input_specs(ir.to_proto(ir_model)), external)


def observe_and_decide(
    loaded: Loaded,
    layout: Layout,
    recipe: Recipe,
    calib: Any,
    plan: Plan | None,
    preprocess: ImagePreprocess | None,
    progress: bool,
    workers: int = 1,
    ray_address: str | None = None,
    batch_axes: BatchAxes | None = None,
    timings: dict[str, float] | None = None,
) -> Decided:
    """Calibrate and decide activation parameters, or take them from an earlier plan (`timings["calibrate"]`
    gets the calibration's seconds)."""
    model = loaded.model
    if plan is None and not layout.tensors:
        return Decided(layout, {}, 0, {})
    if plan is None:
        t = time.perf_counter()
        observed = observing_outputs(model, layout)  # graph outputs too: their ranges go in the plan
        stats = calibrate_layout(
            model, observed, calib, loaded.inputs, recipe, preprocess, progress, workers, ray_address, batch_axes
        )
        if timings is not None:
            timings["calibrate"] = time.perf_counter() - t
        settled = settle(model, recipe, layout, stats.extremes())
        borrow_ranges(layout, settled, stats.histograms)
        layout = settled
        means = {k: [float(v) for v in c.mean] for k, c in sorted(stats.channels.items()) if c.mean is not None}
        ranges = output_ranges(model, observed, stats)
        return Decided(layout, decide_activations(model, layout, stats), stats.samples, means, ranges)
    layout = replay(model, recipe, layout, plan.nodes)
    tensors = activations_from_plan(layout, plan)
    return Decided(layout, tensors, plan.calibration_samples, plan.channel_means, dict(plan.output_ranges))


def save(proto: onnx.ModelProto, plan: Plan, output: str | Path, external: bool = False) -> None:
    """Write the model and its plan together: all files or none.

    A model is written as one file, or (when the float model kept its weights in external data, `external`, or
    the model is too large for protobuf's 2 GB) as `OUT.onnx` + `OUT.onnx.data` (`graph.external`: the weights
    are streamed into the data file one tensor at a time, and the `.onnx` records the data file's sha256).
    Every file goes to a fsynced temporary file beside its target first (a failure there, e.g. a full disk or
    an unwritable `.data` target, leaves the old files untouched), then they are renamed into place: the data
    file, the plan, and the model last, with SIGINT/SIGTERM held until all renames are done; a failed rename
    puts the old files back (`graph.write.write_together`). The plan records the sha256 of the `.onnx` bytes
    written with it, so a set that still does not belong together (a crash of the machine between two renames,
    or files copied by hand) is detectable (`Plan.check_model`)."""
    out = Path(output)

    def on_model(data: bytes) -> None:
        plan.model_sha256 = hashlib.sha256(data).hexdigest()

    files = model_files(proto, out, external, on_model)

    def write_plan(f: BinaryIO) -> None:  # after the data file: the plan needs the .onnx file's hash
        f.write(plan.to_json().encode())

    write_together([*files[:-1], (plan_path(out), write_plan), files[-1]])


def _recovery_data(
    loaded: Loaded, recipe: Recipe, calib: Any, plan: Plan | None, preprocess: Any, batch_axes: Any
) -> tuple[Any, dict[str, list[float]] | None]:
    """What SmoothQuant measures on: the calibration data, or the scales of the plan being re-applied."""
    if recipe.smooth_quant is None:
        return None, None
    if plan is not None:
        return None, plan.smooth_scales
    if calib is None:
        raise LowbitError("smooth_quant needs calibration data to measure activation outliers: pass --calib DATA")
    return open_calibration(calib, loaded.inputs, recipe, preprocess, batch_axes), None


def _recipe(recipe: Recipe | str | Path | None) -> Recipe:
    if recipe is None:
        return Recipe()
    if isinstance(recipe, Recipe):
        return recipe
    return Recipe.load(recipe)


__all__ = ["quantize", "QuantizeResult"]
