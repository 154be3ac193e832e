"""`lowbit quantize`: static, dynamic, weight-only or float16 post-training quantization."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import LowbitError
from ..recipe import PRESETS, Recipe, Scheme, preset
from .common import add_batch_axis_arg, add_image_args, add_ray_args, batch_axes, image_preprocess
from .eval_cmd import add_output_kind_arg, output_kinds

if TYPE_CHECKING:  # onnx loads in ~0.7 s: only when the command runs, where Ctrl-C is handled
    import onnx

    from ..images import ImagePreprocess


def add_parser(sub: argparse._SubParsersAction) -> None:
    q = sub.add_parser(
        "quantize",
        help="static int8 post-training quantization of an ONNX model",
        description="Quantize a float ONNX model to int8 QDQ form. Writes OUT and OUT.plan.json "
        "(every tensor's parameters and why each float node stayed float).",
    )
    q.add_argument("model", help="float ONNX model")
    q.add_argument("-o", "--output", required=True, help="where to write the quantized model (.onnx)")
    q.add_argument("--calib", metavar="DATA", help="calibration data: .npy/.npz file or folder, or an image folder")
    q.add_argument(
        "--plan",
        metavar="PLAN.json",
        help="reuse the ranges and the recipe of an earlier plan instead of calibrating (a retrained model of the "
        "same structure); refused with --calib (the data would not be used) and with any recipe option "
        "(--recipe, --preset, the scheme options, --samples, --batch-size): the plan's recipe is applied exactly",
    )
    q.add_argument(
        "--reuse-ranges",
        action="store_true",
        help="with --plan: apply its ranges although the plan was made for a graph of another structure "
        "(its graph fingerprint differs); every tensor quantized still needs a range in the plan",
    )
    q.add_argument("--recipe", metavar="FILE", help="recipe JSON (see `lowbit recipe --show default`)")
    q.add_argument("--preset", choices=sorted(PRESETS), help="start from a built-in recipe")
    q.add_argument(
        "--target",
        choices=["portable", "onnxruntime"],
        help="the runtimes the model is for: portable (default: ONNX Runtime and LiteRT compute the same integers; "
        "exports to TFLite) or onnxruntime (scales exactly as calibrated; HardSwish/HardSigmoid as integer ops)",
    )
    g = q.add_argument_group("scheme (override the recipe's default scheme)")
    g.add_argument(
        "--mode",
        choices=["static", "dynamic", "weight_only", "float16", "float"],
        help="static (calibrated, default), dynamic (activations quantized at run time, no data needed), "
        "weight_only (int8/int4 weights, float activations), float16",
    )
    g.add_argument(
        "--weights",
        choices=["int8", "int4"],
        help="weight type (int4: weight_only MatMulNBits/Gather blocks; static: per-channel INT4 QDQ, "
        "a smaller file that ONNX Runtime runs in float)",
    )
    g.add_argument("--block-size", type=int, help="values per scale for int4 weights (32, 64, 128; default 32)")
    g.add_argument(
        "--calibration", choices=["minmax", "percentile", "entropy", "mse", "layer_error", "layer_error_fast"]
    )
    g.add_argument("--percentile", type=float)
    g.add_argument("--activations", choices=["uint8", "int8", "uint16", "int16"])
    g.add_argument("--per-tensor", action="store_true", help="one scale per weight tensor instead of per channel")
    g.add_argument("--reduce-range", action="store_true", help="7-bit weights everywhere (usually not needed)")
    g.add_argument(
        "--no-overflow-guard",
        action="store_true",
        help="do not adjust channels whose u8 x s8 pair sums could overflow int16 on AVX2",
    )
    g.add_argument("--exclude-names", nargs="+", default=[], metavar="PATTERN", help="node names to keep float")
    g.add_argument("--exclude-op-types", nargs="+", default=[], metavar="OP", help="op types to keep float")
    g.add_argument(
        "--flush-subnormals",
        action="store_true",
        help="set subnormal float weights (|w| < 1.2e-38) to zero: weights left float that hold them make float ops "
        "many times slower",
    )
    # --- accuracy recovery ---
    g.add_argument(
        "--equalize",
        action="store_true",
        help="cross-layer equalization: balance per-channel weight ranges of consecutive Conv/Gemm layers joined "
        "through Relu-like activations (float outputs unchanged); helps most with --per-tensor",
    )
    g.add_argument(
        "--smooth-quant",
        nargs="?",
        type=float,
        const=0.7,
        metavar="ALPHA",
        help="SmoothQuant for static transformers: move activation outliers of MatMul/Gemm inputs into the "
        "weights with strength ALPHA in [0, 1] (default 0.7: MiniLM reaches cosine 0.99 there, 0.977 at the "
        "paper's 0.5), where the producer absorbs it exactly",
    )
    g.add_argument(
        "--adaround",
        action="store_true",
        help="AdaRound: learn each Conv/Gemm/MatMul weight's rounding (down or up) on the calibration data, layer by "
        "layer, instead of rounding to nearest (static mode; minutes on a mobile CNN; what makes --weights int4 "
        "usable without training)",
    )
    g.add_argument(
        "--empirical-bias-correction",
        action="store_true",
        help="after quantizing, subtract from each Conv/Gemm bias the mean shift of its output against float on the "
        "calibration data, layer by layer (reads the data again; shifts within their noise are left)",
    )
    # --- end accuracy recovery ---
    g.add_argument("--samples", type=int, help="calibration samples to use (default 256)")
    g.add_argument("--batch-size", type=int, help="calibration batch size (default 8)")
    add_batch_axis_arg(q, "calibration")
    add_image_args(q)
    add_ray_args(q, "calibrate")
    q.add_argument(
        "--check",
        type=int,
        default=32,
        metavar="N",
        help="compare integer kernels with float simulation on N calibration samples (0: skip)",
    )
    q.add_argument(
        "--no-speed-check",
        action="store_true",
        help="skip the short paired latency measurement (quantized vs float, 1 thread, one calibration batch)",
    )
    q.add_argument("--verbose", action="store_true", help="also print the time each stage took")
    add_output_kind_arg(q)
    q.add_argument("--json", action="store_true", help="print the summary as JSON")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(run=run)


def _recipe(args: argparse.Namespace) -> Recipe:
    base = Recipe.load(args.recipe) if args.recipe else preset(args.preset) if args.preset else Recipe()
    overrides = {
        "mode": args.mode,
        "weights": args.weights,
        "block_size": args.block_size,
        "calibration": args.calibration,
        "percentile": args.percentile,
        "activations": args.activations,
        "per_channel": False if args.per_tensor else None,
        "reduce_range": True if args.reduce_range else None,
        "avoid_overflow": False if args.no_overflow_guard else None,
        "adaround": True if args.adaround else None,
    }
    scheme: Scheme = dataclasses.replace(base.default, **{k: v for k, v in overrides.items() if v is not None})
    top = {
        "calibration_samples": args.samples,
        "batch_size": args.batch_size,
        "flush_subnormals": True if args.flush_subnormals else None,
        "target": args.target,
    }
    recovery = {
        "equalize": True if args.equalize else None,
        "smooth_quant": args.smooth_quant,
        "empirical_bias_correction": True if args.empirical_bias_correction else None,
    }
    top.update(recovery)
    return dataclasses.replace(
        base,
        default=scheme,
        exclude_names=base.exclude_names + tuple(args.exclude_names),
        exclude_op_types=base.exclude_op_types + tuple(args.exclude_op_types),
        **{k: v for k, v in top.items() if v is not None},
    )


# Options that build the recipe: `--plan` applies the plan's own recipe, so none of them may be given with it.
RECIPE_OPTIONS = {
    "recipe": "--recipe",
    "preset": "--preset",
    "mode": "--mode",
    "weights": "--weights",
    "block_size": "--block-size",
    "calibration": "--calibration",
    "percentile": "--percentile",
    "activations": "--activations",
    "per_tensor": "--per-tensor",
    "reduce_range": "--reduce-range",
    "no_overflow_guard": "--no-overflow-guard",
    "exclude_names": "--exclude-names",
    "exclude_op_types": "--exclude-op-types",
    "samples": "--samples",
    "batch_size": "--batch-size",
    "flush_subnormals": "--flush-subnormals",
    "target": "--target",
    "equalize": "--equalize",
    "smooth_quant": "--smooth-quant",
    "adaround": "--adaround",
    "empirical_bias_correction": "--empirical-bias-correction",
}


def _early_checks(args: argparse.Namespace) -> Recipe | None:
    """Everything that can be refused before any work; returns the recipe (None: the plan's own)."""
    from ..graph.io import check_writable
    from ..graph.write import check_output_path, check_paths
    from ..pipeline import outputs, reads
    from ..shard import check_workers

    if args.check < 0:
        raise LowbitError(f"--check must be 0 (off) or a number of samples, got {args.check}")
    check_output_path(args.output, [args.model])
    check_paths(outputs(args.output), reads(args.model, args.calib, args.recipe, args.plan))
    check_writable(args.output)  # quantize() runs without output here: the CLI writes after --check and the lint
    check_workers(args.workers, args.calib, args.ray_address)
    batch_axes(args.batch_axis)
    if args.reuse_ranges and not args.plan:
        raise LowbitError("--reuse-ranges applies to --plan only; add --plan PLAN.json or drop --reuse-ranges")
    # Found before the model is loaded and prepared (the data itself is checked as it is read).
    if args.calib and not Path(args.calib).expanduser().exists():
        raise LowbitError(f"calibration data not found: {args.calib}; check the --calib path")
    if not args.plan:
        return _recipe(args)
    if args.calib:
        raise LowbitError(
            "--plan reuses the plan's ranges, so the --calib data would not be used: drop --calib to re-apply "
            "the plan, or drop --plan to calibrate afresh"
        )
    given = [flag for dest, flag in RECIPE_OPTIONS.items() if getattr(args, dest) not in (None, False, [])]
    if given:
        raise LowbitError(
            f"--plan applies the recipe stored in the plan; {', '.join(given)} would change it: drop "
            f"{'it' if len(given) == 1 else 'them'}, or drop --plan and calibrate with --calib for a new recipe"
        )
    return None


def run(args: argparse.Namespace) -> int:
    from ..data import DataSource, input_specs, open_data
    from ..evaluate.check import runtime_check
    from ..evaluate.jsonable import dumps
    from ..evaluate.lint import lint
    from ..evaluate.speed import speed_check, speed_text
    from ..pipeline import quantize, save
    from .summary import lint_text, summary_text

    recipe = _early_checks(args)
    kinds = output_kinds(args, args.model)
    pre = image_preprocess(args)
    if args.calib and recipe is not None:
        _doubt_batch_axis(args, recipe.batch_size, pre)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = quantize(
            args.model,
            calib=args.calib,
            recipe=recipe,
            plan=args.plan,
            preprocess=pre,
            progress=not args.quiet,
            reuse_ranges=args.reuse_ranges,
            workers=args.workers,
            ray_address=args.ray_address,
            batch_axes=batch_axes(args.batch_axis) or None,
        )
    for w in caught:
        print(f"lowbit: warning: {w.message}", file=sys.stderr)
    check = speed = None
    timings = dict(result.timings)
    if args.calib and (args.check or not args.no_speed_check):
        assert recipe is not None  # --calib is refused with --plan, the only way to have no recipe here
        t = time.perf_counter()
        specs = input_specs(args.model)
        axes = batch_axes(args.batch_axis) or None

        def samples(n: int) -> DataSource:
            return open_data(args.calib, specs, batch_size=recipe.batch_size, preprocess=pre, limit=n, batch_axes=axes)

        if args.check:
            # With "kernel_gap" naming the op where kernels and simulation part, when they do (cosine < 0.999).
            check = runtime_check(_runnable(args.model), result.model, samples(args.check), kinds, locate_gap=True)
            timings["check"] = time.perf_counter() - t
        if not args.no_speed_check:
            t = time.perf_counter()
            # Phones run one sample at a time: measure that, unless the model fixes its batch size.
            first = next(iter(samples(1)), None) or next(iter(samples(recipe.batch_size)), None)
            if first is not None:
                try:
                    speed = speed_check(_runnable(args.model), result.model, first)
                except LowbitError:
                    # The float model ran on calibration batches but not on one sample: measure a batch as
                    # calibrated, and say why (a time-first input read as samples, or a graph that needs a batch).
                    batch = next(iter(samples(recipe.batch_size)), None)
                    if batch is None or _rows(batch) <= _rows(first):
                        raise
                    speed = speed_check(_runnable(args.model), result.model, batch)
                    print(f"lowbit: warning: {one_sample_fails(args.model, _rows(batch))}", file=sys.stderr)
                timings["speed check"] = time.perf_counter() - t
    t = time.perf_counter()
    findings = lint(result.model, plan=result.plan)
    timings["lint"] = time.perf_counter() - t
    # Written last: a failure in the check or the lint leaves nothing behind (and the old outputs as they were).
    save(result.model, result.plan, args.output, result.external_data)
    result.output = Path(args.output)
    if args.json:
        print(
            dumps(
                {
                    "output": str(result.output),
                    "float_bytes": result.float_bytes,
                    "quantized_bytes": result.quantized_bytes,
                    "seconds": result.seconds,
                    "overflow_guard": result.plan.overflow_guard,
                    "check": check,
                    "speed": speed,
                    "lint": findings,
                    "timings": timings,
                    "warnings": result.warnings,
                    "nodes": {k: v.to_dict() for k, v in result.plan.nodes.items()},
                }
            )
        )
    else:
        print(summary_text(result.plan, result.float_bytes, result.quantized_bytes, result.seconds, check))
        if "adaround" in timings:
            kept = sum(bool(e.get("kept_nearest")) for e in result.plan.adaround.values())
            print(
                f"adaround: learned the rounding of {len(result.plan.adaround)} weights in "
                f"{timings['adaround']:.1f} s ({kept} kept round-to-nearest, which did better on its layer)"
            )
        for note in result.warnings:
            print(f"warning: {note}")
        if speed is not None:
            print(speed_text(speed, findings))
        print(lint_text(findings))
        if args.verbose:
            print("stages: " + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))
        data = Path(f"{result.output}.data")
        also = f", {data}" if data.is_file() and result.external_data else ""  # weights in external data
        print(f"wrote {result.output}{also} and {Path(result.output).with_suffix('.plan.json')}")
    return 0


def _runnable(model: str) -> str | onnx.ModelProto:
    """The float model as ONNX Runtime will load it: lowbit names nodes uniquely before quantizing, but ONNX
    Runtime refuses a model whose node names repeat, so the check runs a copy with unique names."""
    from ..graph.io import load_proto

    proto = load_proto(model, check=False, external_data=False)
    names = [n.name for n in proto.graph.node if n.name]
    if len(names) == len(set(names)):
        return model
    proto = load_proto(model, check=False)
    seen: set[str] = set()
    for i, node in enumerate(proto.graph.node):
        while not node.name or node.name in seen:
            node.name = f"{node.name or node.op_type}_{i}"
        seen.add(node.name)
    return proto


def _rows(batch: dict) -> int:
    return max((int(v.shape[0]) for v in batch.values() if getattr(v, "ndim", 0)), default=1)


def one_sample_fails(model: str, rows: int) -> str:
    """Why a model that ran on batches of `rows` samples may not run on one, and what to do if that is wrong."""
    from ..data import input_specs

    names = [s.name for s in input_specs(model) if s.shape and not isinstance(s.shape[0], int)]
    first = names[0] if names else "INPUT"
    return (
        f"the float model runs on a batch of {rows} samples but not on one, so the speed was measured on a batch; "
        f"if the first axis of {', '.join(names) or 'an input'} is not a batch of samples (a time-first "
        f"[frames, features] input), calibration read its rows as samples: rerun with --batch-axis {first}=none, "
        "which takes each file whole as one sample"
    )


def _doubt_batch_axis(args: argparse.Namespace, batch_size: int, pre: ImagePreprocess | None) -> None:
    """Warn before calibrating when the data's first axis does not look like a batch to the model."""
    from ..data import input_specs, open_data
    from ..evaluate.batch_axis import batch_axis_doubt

    axes = batch_axes(args.batch_axis) or None
    specs = input_specs(args.model)
    if not any(1 <= len(s.shape) <= 2 and not isinstance(s.shape[0], int) for s in specs):
        return  # no input a time-first sequence could be (batch_axis_doubt's rule): nothing to read or run
    try:
        source = open_data(args.calib, specs, batch_size=batch_size, preprocess=pre, limit=batch_size,
                           batch_axes=axes)  # fmt: skip
        first = next(iter(source), None)
    except LowbitError:
        return  # the calibration stage reads the same data and says what is wrong with it
    doubt = None if first is None else batch_axis_doubt(_runnable(args.model), first, dict(axes or {}))
    if doubt:
        print(f"lowbit: warning: {doubt}", file=sys.stderr)
