"""`lowbit auto`: a per-layer precision chosen against an accuracy or latency budget, measured on this machine."""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import TYPE_CHECKING

from ..recipe import PRESETS
from .common import add_image_args, image_preprocess

if TYPE_CHECKING:
    from ..auto import AutoResult


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "auto",
        help="mixed precision: the fastest model within an accuracy budget, measured here",
        description="Measure each layer's error alone and its latency in ONNX Runtime (int8, 16-bit activations, "
        "int4 weights, float), then search for the fastest assignment within --max-drop points of the metric (or "
        "the most accurate within --latency-budget). Writes OUT, OUT.plan.json, OUT.recipe.json and OUT.auto.json "
        "(the explored points; `lowbit report` plots them).",
    )
    p.add_argument("model", help="float ONNX model")
    p.add_argument("-o", "--output", required=True, help="where to write the chosen model (.onnx)")
    p.add_argument("--calib", required=True, metavar="DATA", help="calibration data (.npy/.npz file or folder, images)")
    p.add_argument(
        "--eval", required=True, metavar="DATA", help="data the search measures on; keep it apart from --calib"
    )
    p.add_argument(
        "--metric",
        choices=["auto", "top1", "cosine", "accuracy"],
        default="auto",
        help="auto (default): what fits the first output (top-1 agreement with float for class scores, cosine for "
        "embeddings, ...); accuracy needs --labels",
    )
    p.add_argument("--labels", metavar="FILE", help="class labels of --eval (.npy int array or text): accuracy")
    b = p.add_mutually_exclusive_group()
    b.add_argument(
        "--max-drop",
        type=float,
        metavar="X",
        help="points (percent) of the metric the model may lose against float on --eval (default 1)",
    )
    b.add_argument(
        "--latency-budget", type=float, metavar="R", help="largest latency as a ratio to float's, 1 thread (e.g. 0.6)"
    )
    p.add_argument("--recipe", metavar="FILE", help="base recipe for the int8 layers (default: the default preset)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="base recipe from a preset")
    p.add_argument(
        "--target",
        choices=["portable", "onnxruntime"],
        help="the base recipe's target, as for `lowbit quantize --target`: portable (the recipe's default) or "
        "onnxruntime (scales as calibrated, an image stem float, ONNX Runtime's own integer forms)",
    )
    p.add_argument(
        "--no-overflow-guard",
        action="store_true",
        help="int8 weights at their full range (as `lowbit quantize --no-overflow-guard`): for CPUs with VNNI and "
        "phones, whose kernels cannot saturate; x86 CPUs without VNNI may then saturate",
    )
    p.add_argument("--sensitivity-samples", type=int, default=32, metavar="N", help="samples per layer (default 32)")
    p.add_argument(
        "--tune-steps",
        type=int,
        default=24,
        metavar="N",
        help="zero-cost candidates tried first, each measured (per layer: its output range by another calibration "
        "method, or its weights without the overflow guard; int8 latency); 0: none (default 24)",
    )
    p.add_argument(
        "--runs",
        type=int,
        default=3,
        metavar="N",
        help="price a float run by its edges where it meets int8 (fitted to profiles of float runs) and let the "
        "search float up to N contiguous layers in one move; 0: per-tensor boundary cost, single layers (default 3)",
    )
    p.add_argument(
        "--edge-steps",
        type=int,
        default=60,
        metavar="N",
        help="with --max-drop: single float runs from the model's input or output (each prefix and suffix of the "
        "layers), measured cheapest first by the cost model; 0: none (default 60)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    add_image_args(p)
    p.set_defaults(run=run)


def auto_text(r: AutoResult) -> str:
    budget = (
        f"within {r.budget['max_drop']:g} points of float"
        if r.budget["kind"] == "accuracy"
        else f"latency <= {r.budget['ratio']:g}x float"
    )
    expects = r.expected_drop is not None  # the front's points carry theirs too
    lines = [
        f"chose {', '.join(f'{n} {p}' for p, n in sorted(r.counts().items()))} layers ({budget}: "
        f"{'met' if r.met else 'NOT met'})",
        f"  {r.metric}: {r.score:.2f} (float {r.reference:.2f}) on the {r.samples} --eval samples, integer kernels",
        *(
            [
                f"    95% interval {r.score_interval[0]:.1f}-{r.score_interval[1]:.1f} (one model, {r.samples} "
                "samples): the budget holds on these; check the model on data the search never saw"
            ]
            if r.score_interval
            else []
        ),
        *(
            [
                f"    expected on new samples like these: {r.expected_drop:.1f} points below float (each sample's "
                "top scores met with every sample's errors, so no lucky draw of errors counts)"
            ]
            if expects
            else []
        ),
        *(
            [
                f"    that is above the budget: on {r.samples} samples a pass by count is partly the chance of which "
                "answers flip; more --eval samples narrow it (the front's expected column: what each point should keep)"
            ]
            if expects and r.budget["kind"] == "accuracy" and r.expected_drop > r.budget["max_drop"]
            else []
        ),
        f"  latency: {r.latency_ratio:.3f}x float (paired median, 1 thread, {r.cpu})",
        f"  size: {r.size_bytes / 1e6:.2f} MB ({r.size_bytes / r.float_bytes:.0%} of float)",
        "",
        "explored front (not dominated on score, latency, size):",
        f"  {'step':>4}  {'found by':>8}  {'score':>7}{'  expected' if expects else ''}  {'latency':>8}  {'MB':>6}  "
        "precisions",
    ]
    for pt in r.front:
        mix = ", ".join(f"{n} {p}" for p, n in sorted(pt["precisions"].items()))
        drop = f"  {r.reference - pt['expected_drop']:8.2f}" if expects else ""
        lines.append(
            f"  {pt['step']:>4}  {pt.get('stage', 'chain'):>8}  {pt['score']:7.2f}{drop}  {pt['latency_ratio']:7.3f}x  "
            f"{pt['size_bytes'] / 1e6:6.2f}  {mix}"
        )
    took = ", ".join(f"{k} {v:.0f} s" for k, v in r.seconds.items())
    lines.append(f"time: {took}")
    if r.output is not None:
        lines.append(f"wrote {r.output} (+ .plan.json, .recipe.json, .auto.json)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ..auto import auto
    from ..auto.inputs import auto_writes
    from ..errors import LowbitError
    from ..graph.write import check_paths
    from ..recipe import Recipe, preset

    if args.recipe and args.preset:
        raise LowbitError("give --recipe or --preset, not both")
    recipe: Recipe | str | None = args.recipe or (preset(args.preset) if args.preset else None)
    if args.target or args.no_overflow_guard:
        if args.recipe:  # read here, so `auto` no longer sees the path: refuse writing over it now
            check_paths(auto_writes(args.output), [("recipe", args.recipe)])
        base = Recipe.load(args.recipe) if args.recipe else recipe if isinstance(recipe, Recipe) else Recipe()
        if args.target:
            base = replace(base, target=args.target)
        if args.no_overflow_guard:
            base = replace(base, default=replace(base.default, avoid_overflow=False))
        recipe = base
    result = auto(
        args.model,
        args.calib,
        args.eval,
        args.output,
        max_drop=args.max_drop,
        latency_budget=args.latency_budget,
        metric=args.metric,
        labels=args.labels,
        recipe=recipe,
        preprocess=image_preprocess(args),
        sensitivity_samples=args.sensitivity_samples,
        tune_steps=args.tune_steps,
        runs=args.runs,
        edge_steps=args.edge_steps,
        progress=not args.quiet,
    )
    print(result.to_json() if args.json else auto_text(result))
    return 0
