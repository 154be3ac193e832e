"""`lowbit eval`: accuracy on labelled data and fidelity against a reference model."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from .common import add_batch_axis_arg, add_image_args, add_ray_args, batch_axes, image_preprocess

if TYPE_CHECKING:
    from ..evaluate.evaluate import EvalResult


def add_output_kind_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--output-kind",
        action="append",
        default=[],
        metavar="NAME=KIND",
        help="measure output NAME as KIND instead of the guessed kind: class_scores, dense_map, sequence, boxes, "
        "embedding or values (repeatable)",
    )


def output_kinds(args: argparse.Namespace, model: str) -> dict[str, str]:
    """--output-kind as {name: kind}, each name checked against the model's outputs before any work."""
    from ..evaluate.outputs import check_kind_names, parse_kinds
    from ..graph.io import load_proto

    kinds: dict[str, str] = dict(parse_kinds(args.output_kind))
    if kinds:
        proto = load_proto(model, check=False, external_data=False)
        check_kind_names(kinds, [o.name for o in proto.graph.output])
    return kinds


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="accuracy on labelled data, fidelity against a reference model",
        description="Run a model over data; with --labels report top-1/top-5 accuracy, with "
        "--reference compare every output with a reference (float) model. In --json output an "
        "infinite SQNR (identical outputs) is null.",
    )
    p.add_argument("model", help="ONNX or .tflite model to evaluate (usually the int8 one; .tflite runs in LiteRT)")
    p.add_argument(
        "--data", required=True, metavar="DATA", help="evaluation data: .npy/.npz file or folder, or an image folder"
    )
    p.add_argument("--labels", metavar="FILE", help="class labels: .npy int array (N,) or text, one integer per line")
    p.add_argument("--reference", metavar="FLOAT.onnx", help="reference model to compare outputs with (run in float)")
    p.add_argument(
        "--mode",
        choices=["kernels", "simulate"],
        default="kernels",
        help="kernels: ONNX Runtime integer kernels (default); simulate: quantized math in float (ONNX models only)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    p.add_argument("--limit", type=int, metavar="N", help="evaluate only the first N samples")
    add_batch_axis_arg(p, "evaluation")
    add_image_args(p)
    add_output_kind_arg(p)
    add_ray_args(p, "evaluate")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]


def _runtime_text(runtime: str) -> str:
    return {"litert (XNNPACK)": "LiteRT with XNNPACK", "litert": "LiteRT, built-in kernels"}.get(runtime, runtime)


def eval_text(result: EvalResult) -> str:
    """The human summary: what ran, accuracy, and a per-output fidelity table."""
    # "kernels" is ORT's default optimizations: integer kernels for a QDQ model, plain float for a float one.
    how = "ORT default optimizations" if result.mode == "kernels" else "ORT optimizations off: float simulation"
    if result.runtime != "onnxruntime":
        how = _runtime_text(result.runtime)
    lines = [f"model      {result.model} ({how}), {result.samples} samples"]
    if result.reference is not None:
        ref_runtime = result.reference_runtime or "onnxruntime"
        ref_how = "float, default optimizations" if ref_runtime == "onnxruntime" else _runtime_text(ref_runtime)
        lines.append(f"reference  {result.reference} ({ref_how})")
    acc = result.accuracy
    if acc is not None:
        lines.append(f"accuracy   top-1 {_pct(acc['top1'])}   top-5 {_pct(acc['top5'])}")
    if result.outputs:
        from ..evaluate.outputs import format_value, poor_text

        rows = [["output", "kind", "task metric", "value", "cosine", "SQNR (dB)", "max abs error"]]
        for name, f in result.outputs.items():
            t = f["task"]
            # format() writes an infinite SQNR (identical outputs) as "inf"
            rows.append(
                [
                    name,
                    f["kind"],
                    t["label"],
                    format_value(t["metric"], t["value"]),
                    format(f["cosine"], ".4f"),
                    format(f["sqnr_db"], ".1f"),
                    format(f["max_abs_error"], ".4g"),
                ]
            )
        lines += ["", *_table(rows)]
        lines += [f"  {name}: {f['why']}" for name, f in result.outputs.items()]
        lines += [w for name, f in result.outputs.items() if (w := poor_text(name, f)) is not None]
    if acc is None and not result.outputs:
        lines.append("nothing to compare: pass --labels for accuracy or --reference for fidelity")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ..evaluate.evaluate import evaluate
    from ..evaluate.outputs import parse_kinds

    pre = image_preprocess(args)
    result = evaluate(
        args.model,
        args.data,
        labels=args.labels,
        reference=args.reference,
        mode=args.mode,
        batch_size=args.batch_size,
        preprocess=pre,
        limit=args.limit,
        progress=not args.quiet,
        kinds=parse_kinds(args.output_kind),
        workers=args.workers,
        ray_address=args.ray_address,
        batch_axes=batch_axes(args.batch_axis) or None,
    )
    print(result.to_json(indent=1) if args.json else eval_text(result))
    return 0
