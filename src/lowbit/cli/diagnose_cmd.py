"""`lowbit diagnose`: which layers lose accuracy, what to change, and what the change recovers."""

from __future__ import annotations

import argparse
from typing import Any

from .common import add_batch_axis_arg, add_image_args, add_ray_args, batch_axes, image_preprocess
from .eval_cmd import add_output_kind_arg, output_kinds


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "diagnose",
        help="find the layers that lose accuracy and a recipe that fixes them",
        description="Compare a quantized model (and the plan beside it) with its float model layer by layer, "
        "rank layers by the error they cause alone, try fixes (per-channel weights, percentile ranges, 16-bit "
        "activations, float) and measure the recipe that applies the best ones.",
    )
    p.add_argument("float_model", metavar="FLOAT.onnx", help="the float model")
    p.add_argument("quant_model", metavar="QUANT.onnx", help="the quantized model made from it by lowbit")
    p.add_argument(
        "--data",
        required=True,
        metavar="DATA",
        help="inputs to measure on (.npy/.npz file or folder, or an image folder), like --calib",
    )
    p.add_argument("--plan", metavar="PLAN.json", help="the quantized model's plan (default: QUANT.plan.json)")
    p.add_argument("--top", type=int, default=5, metavar="K", help="layers to find fixes for (default 5)")
    p.add_argument(
        "--budget",
        type=int,
        default=20,
        metavar="N",
        help="layers measured alone, the ones losing most SQNR first (default 20)",
    )
    p.add_argument("--limit", type=int, default=64, metavar="N", help="samples to use (default 64)")
    p.add_argument("-o", "--output", metavar="FIXED.onnx", help="write the model quantized with the fixed recipe")
    p.add_argument("--recipe-out", metavar="FIX.json", help="write the fixed recipe")
    add_batch_axis_arg(p, "diagnose")
    add_image_args(p)
    add_ray_args(p, "measure the layers alone")
    add_output_kind_arg(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON (infinite SQNR is null)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..evaluate.diagnose import diagnose

    kinds = output_kinds(args, args.float_model)
    pre = image_preprocess(args)
    report = diagnose(
        args.float_model,
        args.quant_model,
        args.data,
        plan=args.plan,
        top=args.top,
        limit=args.limit,
        progress=not args.quiet,
        budget=args.budget,
        output=args.output,
        recipe_out=args.recipe_out,
        preprocess=pre,
        kinds=kinds,
        workers=args.workers,
        ray_address=args.ray_address,
        batch_axes=batch_axes(args.batch_axis) or None,
    )
    print(report.to_json(indent=1) if args.json else report_text(report.to_dict()))
    return 0


def _db(v: float | None) -> str:
    return "inf" if v is None else f"{v:.1f}"


def _fid(f: dict[str, Any]) -> str:
    """The headline that fits the output's kind (top-1 only for class scores), then cosine and SQNR."""
    from ..evaluate.outputs import headline_text

    return f"{headline_text(f)}, cosine {f['cosine']:.4f}, SQNR {_db(f['sqnr_db'])} dB"


def _gain(r: dict[str, Any]) -> str:
    """The headline's change: points for agreements, plain differences for cosine and IoU."""
    metric, g = r["after"]["task"]["metric"], r["gain"]["task"]
    if g is None:
        return f"{metric} change unknown"
    if metric == "sqnr_db":
        return f"{g:+.1f} dB SQNR"
    if metric in ("cosine", "map_iou"):
        return f"{metric} {g:+.4f}"
    return f"{100 * g:+.1f} points"


def report_text(r: dict[str, Any], rows: int = 15) -> str:
    """`DiagnoseResult.to_dict()` as text (None SQNRs are infinite)."""
    from ..evaluate.outputs import headline_text, poor_text

    measured = [x for x in r["layers"] if "alone_sqnr_db" in x]
    width = max([len(x["node"]) for x in measured[:rows]] + [4])
    lines = [f"layers ranked by the final-output SQNR they cause alone ({r['samples']} samples, float simulation):"]
    if r.get("paired") == "node outputs":  # dynamic / weight-only: SQNR dB is each quantized node's own output
        lines.append("  (no quantized activations in this model: SQNR dB compares each quantized node's output)")
    lines.append(f"  {'node':<{width}}  {'op':<18} {'SQNR dB':>8} {'alone dB':>9}  suggestion")
    for x in measured[:rows]:
        s = x["suggestion"]
        lines.append(
            f"  {x['node']:<{width}}  {x['op_type']:<18} {_db(x['sqnr_db']):>8} "
            f"{_db(x['alone_sqnr_db']):>9}  {s['kind'].replace('_', ' ')}"
        )
    if len(r["layers"]) > len(measured[:rows]):
        lines.append(f"  ... {len(r['layers']) - len(measured[:rows])} more layers (--json lists all)")
    why = [(x["node"], x["suggestion"]["why"]) for x in measured if x["suggestion"]["kind"] != "none"]
    if why:
        lines.append("why:")
        lines += [f"  {node}: {text}" for node, text in why]
    many = len(r["before"].get("outputs") or {}) > 1
    first = next(iter(r["before"].get("outputs") or {"": None}))
    lines.append(f"before: {_fid(r['before'])}" + (f" (output '{first}', {r['before']['kind']})" if many else ""))
    lines.append(
        f"after:  {_fid(r['after'])}  ({_gain(r)}, "
        f"{r['gain']['sqnr_db'] if r['gain']['sqnr_db'] is not None else 0:+.1f} dB)"
    )
    if many:
        for name, f in r["after"]["outputs"].items():
            was = r["before"]["outputs"][name]
            lines.append(f"  output '{name}' ({f['kind']}): {headline_text(was)} -> {headline_text(f)}")
    for name, f in (r["after"].get("outputs") or {}).items():
        if (w := poor_text(name, f, " after the suggested fixes", hint=False)) is not None:
            lines.append(w)
    if r.get("kernel_gap"):
        from ..evaluate.kernel_gap import gap_text

        lines.append(gap_text(r["kernel_gap"]))
    for item in r.get("lint") or []:
        lines.append(f"lint: {item.get('kind')}: {item.get('message')}")
    if r.get("recipe_path"):
        lines.append(
            f"wrote recipe {r['recipe_path']} (use: lowbit quantize FLOAT.onnx --recipe {r['recipe_path']} ...)"
        )
    if r.get("output"):
        lines.append(f"wrote {r['output']}")
    if not r.get("recipe_path"):
        lines.append("write the fixed recipe with --recipe-out FIX.json")
    return "\n".join(lines)
