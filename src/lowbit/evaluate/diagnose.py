"""`diagnose`: which layers make a quantized model lose accuracy, what to change, and how much that recovers.

1. per tensor: the QDQ model's activations against the float model's, paired by name (layerwise.py); dynamic
   and weight-only nodes have no quantized activations, so their outputs (same name in both models) are paired;
2. per layer: final-output SQNR with only that layer quantized ("alone"), for the layers whose output loses
   the most SQNR relative to their inputs (a budget keeps big models quick);
3. for the worst layers, candidate fixes that apply to the layer (per-channel weights, percentile ranges,
   16-bit activations; for weight-only int4: half the block size, int8 weights) are each
   tried alone by re-applying the plan, and the best gain per cost is kept; keep-float is the last resort;
4. the fixes become recipe rules, the float model is calibrated and quantized with them, and re-measured.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from ..data import BatchAxes, ImagePreprocess, input_specs, open_data
from ..errors import LowbitError
from ..graph.io import load_proto, refuse_ort_format
from ..graph.write import atomic_write_bytes, check_output_path, check_paths
from ..observe import Histogram
from ..passes import prepare, target_forms
from ..pipeline import load, outputs, quantize
from ..plan import Plan, TensorParams, plan_path
from ..recipe import Recipe, Rule
from ..shard import alone_sharded, check_ray
from .diagnose_fixes import outlier_ratio, suggest
from .jsonable import JsonResult, jsonable
from .kernel_gap import locate
from .layerwise import (
    Layer,
    Trials,
    all_fidelity,
    layers,
    measure_tensors,
    output_layers,
    pair_outputs,
    pair_tensors,
)
from .outputs import check_kind_names

HIST_BINS = 64
KERNEL_GAP_BATCHES = 4  # batches of 4: 16 samples are enough to see where integer kernels part from simulation


@dataclass
class DiagnoseResult(JsonResult):
    """What `diagnose` found. "before" and "after" are the first final output's fidelity measured with what fits
    its kind (outputs.py: "kind", "why", "task" headline, "top1_agreement" (None unless class scores), "cosine",
    "sqnr_db", ...), every output's under "outputs"; "gain" is after - before for "task" (the headline),
    "top1_agreement" (None where it does not fit) and "sqnr_db";
    "layers" rank the layers worst first, each {"node", "op_type", "tensor", "sqnr_db", "input_sqnr_db",
    "drop_db", "alone_sqnr_db" (the measured ones), "suggestion": {"kind", "why", "tried"}}. SQNRs are floats
    here (+inf: exact) and null in `to_dict()`/`to_json()`."""

    samples: int
    mode: str
    paired: str  # "activations" (static models) or "node outputs" (dynamic / weight-only)
    before: dict[str, Any]
    layers: list[dict[str, Any]]
    tensors: dict[str, float]
    histograms: dict[str, dict[str, Any]]
    recipe: dict[str, Any]
    after: dict[str, Any]
    gain: dict[str, float | None]
    trials: int
    lint: list[dict[str, Any]]
    output: str | None = None
    recipe_path: str | None = None
    kernel_gap: dict[str, Any] | None = None  # where ONNX Runtime's integer kernels part from the simulation


def diagnose(
    float_model: str | Path | onnx.ModelProto,
    quant_model: str | Path | onnx.ModelProto,
    data: Any,
    plan: Plan | str | Path | None = None,
    top: int = 5,
    limit: int = 64,
    progress: bool = True,
    *,
    budget: int = 20,
    output: str | Path | None = None,
    recipe_out: str | Path | None = None,
    preprocess: ImagePreprocess | None = None,
    kinds: Mapping[str, str] | None = None,
    workers: int = 1,
    ray_address: str | None = None,
    batch_axes: BatchAxes | None = None,
) -> DiagnoseResult:
    """Rank the layers of `quant_model` by the error they cause, suggest fixes and measure them.
    `output`/`recipe_out` write the fixed model (+ plan) and recipe atomically. `kinds` overrides the guessed
    kind of final outputs by name (outputs.py); layers are ranked by the first output's SQNR. With `workers` > 1
    (or a `ray_address`) the layers measured alone are shared among Ray tasks (`shard.alone_sharded`), with the
    same results as one process. `batch_axes`: inputs whose samples are not stacked on axis 0 (see `open_data`)."""
    for label, value in (("top", top), ("limit", limit), ("budget", budget)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LowbitError(f"{label} must be a positive integer, got {value!r}")
    check_ray(workers, ray_address)
    if output is not None:
        check_output_path(output, [m for m in (float_model, quant_model) if isinstance(m, (str, Path))])
    if recipe_out is not None and not Path(recipe_out).parent.exists():
        raise LowbitError(f"folder {Path(recipe_out).parent} does not exist; create it first")
    # Before any work: no output may be a file this run reads (models, data, the plan), however spelled.
    plan_read = plan if isinstance(plan, (str, Path)) else None
    if plan is None and isinstance(quant_model, (str, Path)):
        plan_read = plan_path(quant_model)
    check_paths(
        [*(outputs(output) if output is not None else []), ("--recipe-out", recipe_out)],
        [("float model", float_model), ("quantized model", quant_model), ("data", data), ("plan", plan_read)],
    )
    plan_obj = _plan(quant_model, plan)
    float_proto = load_proto(float_model)
    quant_proto = load_proto(quant_model)
    check_kind_names(kinds, [o.name for o in float_proto.graph.output])
    # As quantize prepares it: an old opset is upgraded first, so the graph (and its fingerprint) is the plan's.
    # And in its target's forms (onnxruntime: depthwise convs widened), so tensors pair with the same shapes.
    prepared_model = prepare(load(float_proto).model)
    target_forms(prepared_model, str((plan_obj.recipe or {}).get("target", "portable")))
    prepared = ir.to_proto(prepared_model)

    source = open_data(
        data,
        input_specs(float_proto),
        batch_size=4,
        preprocess=preprocess,
        limit=limit,
        what="diagnose data",
        batch_axes=batch_axes,
    )
    batches = list(source)  # inputs only (limit samples); every pass re-reads them
    if not batches:
        raise LowbitError("diagnose data yielded no samples; point --data at a non-empty source")

    pairs = pair_tensors(prepared, quant_proto, plan_obj)
    quantized = [t for t in pairs if t in plan_obj.tensors]
    static = bool(quantized)
    if static:
        found = layers(quant_proto, plan_obj, pairs)
        # Dynamic / weight-only nodes beside static ones (dynamic mode with calibration): compared by output.
        kept = {n.name for n in quant_proto.graph.node}
        rewritten = pair_outputs(prepared, quant_proto, plan_obj)
        extra = [x for x in output_layers(prepared, plan_obj, rewritten) if x.node not in kept]
        # output_layers' layers all have an output (`is not None` only narrows the type)
        pairs.update({x.output: x.output for x in extra if x.output is not None and x.output not in pairs})
        found += extra
    else:  # dynamic / weight-only: no quantized activations, compare each quantized node's output instead
        pairs = pair_outputs(prepared, quant_proto, plan_obj)
        found = output_layers(prepared, plan_obj, pairs)
        quantized = [x.output for x in found if x.output is not None]  # all of them (see above)
    if not found:
        raise LowbitError(
            "the plan does not describe this quantized model (no quantized tensor or node output "
            "found); pass the plan written beside it with --plan"
        )
    stats = measure_tensors(
        prepared, quant_proto, pairs, batches, [x.output for x in found if x.output], progress, source.count
    )
    trials = Trials(prepared, plan_obj, batches, stats.ref_outputs, stats.outputs, kinds)
    before = all_fidelity(stats.ref_outputs, stats.quant_outputs, trials.kinds, stats.outputs)

    rows = {x.node: _row(x, stats) for x in found}
    # Where a layer's output is much worse than its inputs, the layer itself added the error.
    by_drop = sorted(found, key=lambda x: (-rows[x.node]["drop_db"], rows[x.node]["sqnr_db"]))
    bar = _bar(min(budget, len(by_drop)), "layers alone", progress)
    try:
        if workers > 1 or ray_address is not None:
            alone = alone_sharded(trials, by_drop[:budget], kinds, workers, ray_address, bar.update)
        else:
            alone = []
            for x in by_drop[:budget]:
                alone.append(trials.alone(x))
                bar.update(1)
    finally:
        bar.close()
    for x, fidelity in zip(by_drop[:budget], alone):
        rows[x.node]["alone_sqnr_db"] = fidelity["sqnr_db"]
    ranked = sorted(found, key=lambda x: (_key(rows[x.node].get("alone_sqnr_db")), _key(rows[x.node]["sqnr_db"])))
    measured = [rows[x.node]["alone_sqnr_db"] for x in found if "alone_sqnr_db" in rows[x.node]]
    typical = float(np.median([min(v, 100.0) for v in measured])) if measured else math.inf

    fixes: list[Rule] = []
    worst = [x for x in ranked if "alone_sqnr_db" in rows[x.node]][:top]
    bar = _bar(len(worst), "trying fixes", progress)
    for x in worst:
        suggestion, rule = suggest(x, rows[x.node], stats, trials, typical)
        rows[x.node]["suggestion"] = suggestion
        if rule is not None:
            fixes.append(rule)
        bar.update(1)
    bar.close()

    recipe = _with_fixes(trials.recipe, fixes, plan_obj)
    if fixes or output is not None:
        # No calibration for a model without quantized activations: with --calib, dynamic mode would quantize
        # convolutions statically, a different model from the one diagnosed.
        calibrated = any(t.kind == "activation" for t in plan_obj.tensors.values())
        fixed = quantize(
            float_model if isinstance(float_model, (str, Path)) else float_proto,
            output=output,
            calib=batches if calibrated else None,
            recipe=recipe,
            preprocess=preprocess,
            progress=progress,
            batch_axes=batch_axes,
        )
        after = trials.measure(fixed.model)
    else:
        after = dict(before)
    if recipe_out is not None:
        atomic_write_bytes((recipe.to_json() + "\n").encode(), recipe_out)

    return DiagnoseResult(
        samples=stats.samples,
        mode="simulate",
        paired="activations" if static else "node outputs",
        before=before,
        layers=[{"node": x.node, "op_type": x.op_type, "tensor": x.output, **rows[x.node]} for x in ranked],
        tensors={t: stats.sqnr(t) for t in quantized},
        histograms={
            x.output: _histogram(stats.histograms[x.output], plan_obj.tensors.get(x.output))
            for x in ranked[:top]
            if x.output in stats.histograms
        },
        recipe=recipe.to_dict(),
        after=after,
        gain=_gain(before, after),
        trials=trials.runs,
        lint=_lint(quant_proto, plan_obj),
        output=str(output) if output is not None else None,
        recipe_path=str(recipe_out) if recipe_out is not None else None,
        kernel_gap=jsonable(locate(quant_proto, batches[:KERNEL_GAP_BATCHES])),
    )


def _gain(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float | None]:
    def diff(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else b - a

    return {
        "task": diff(before["task"]["value"], after["task"]["value"]),
        "top1_agreement": diff(before["top1_agreement"], after["top1_agreement"]),
        "sqnr_db": after["sqnr_db"] - before["sqnr_db"],  # inf - inf is NaN: null in JSON
    }


def _with_fixes(recipe: Recipe, fixes: list[Rule], plan: Plan) -> Recipe:
    """`recipe` with the fix rules first. An original rule whose every node a fix now decides is dropped: it
    would match no node (QAT exports carry one rule per int4 layer) and the planner would warn about it."""

    def first_rule(name: str, op: str) -> int | None:
        return next((i for i, r in enumerate(recipe.rules) if r.matches(name, op)), None)

    decided: dict[int, list[str]] = {}
    for name, entry in plan.nodes.items():
        i = first_rule(name, entry.op_type)
        if i is not None:
            decided.setdefault(i, []).append(name)
    fixed = {n for n, e in plan.nodes.items() if any(f.matches(n, e.op_type) for f in fixes)}
    # Rules that decided no node by its name (QAT module-name aliases) are kept as they are.
    kept = [r for i, r in enumerate(recipe.rules) if not decided.get(i) or not set(decided[i]) <= fixed]
    return replace(recipe, rules=tuple(fixes) + tuple(kept))


def _plan(quant_model: Any, plan: Plan | str | Path | None) -> Plan:
    if isinstance(plan, Plan):
        return plan
    if plan is not None:
        found = Plan.load(plan)
        if isinstance(quant_model, (str, Path)):
            found.check_model_file(quant_model)
        return found
    if not isinstance(quant_model, (str, Path)):
        raise LowbitError("the quantized model was given in memory: pass its plan (plan=...)")
    refuse_ort_format(quant_model)  # before "no plan beside": a .ort never has one
    path = plan_path(quant_model)
    if not path.is_file():
        raise LowbitError(
            f"no plan beside {quant_model} (expected {path}); pass the plan lowbit quantize wrote with --plan"
        )
    found = Plan.load(path)
    found.check_model_file(quant_model)
    return found


def _key(v: float | None) -> float:
    return math.inf if v is None or math.isnan(v) else v


def _row(x: Layer, stats) -> dict[str, Any]:
    out = stats.sqnr(x.output) if x.output else math.nan
    ins = [stats.sqnr(t) for t in x.inputs]
    incoming = min(ins) if ins else math.inf
    return {
        "sqnr_db": out,
        "input_sqnr_db": incoming,
        "drop_db": min(incoming, 100.0) - min(_key(out), 100.0),
        "suggestion": {"kind": "none", "why": "not among the worst layers"},
    }


def _histogram(h: Histogram, params: TensorParams | None) -> dict[str, Any]:
    """A coarse histogram for display: HIST_BINS equal bins over [min, max], and the quantization range."""
    lo, hi = h.min, h.max
    edges = np.linspace(lo, hi, HIST_BINS + 1) if hi > lo else np.array([lo, lo + 1.0])
    counts, _ = np.histogram(np.clip(h.centers(), lo, hi), bins=edges, weights=h.counts)
    rng = params.range if params is not None and params.range is not None else [lo, hi]
    return {
        "edges": edges.tolist(),
        "counts": [int(c) for c in counts],
        "range": [float(v) for v in rng],
        "outlier_ratio": outlier_ratio(h),
    }


def _bar(total: int, desc: str, progress: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=None if progress else True, leave=False)


def _lint(model: onnx.ModelProto, plan: Plan) -> list:
    try:
        from .lint import lint
    except ImportError:
        return []
    return list(lint(model, plan=plan))
