"""`lowbit report`: one self-contained HTML file comparing a float model with its quantized versions.

The measuring is `lowbit.evaluate.report_data.report`; this module parses flags, calls it and prints.
"""

from __future__ import annotations

import argparse
import math

from .eval_cmd import add_output_kind_arg, output_kinds


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="write a self-contained HTML report: float vs quantized models",
        description="Compare a float model with one or more quantized versions on DATA and write one "
        "HTML file (no network needed to open it): summary, accuracy vs size vs latency, per-layer "
        "SQNR, activation histograms of the worst layers with the chosen ranges, findings, recipe.",
    )
    p.add_argument("float_model", metavar="FLOAT.onnx", help="the float model")
    p.add_argument("quant_models", metavar="QUANT.onnx", nargs="+", help="quantized model(s); the first is diagnosed")
    p.add_argument("--data", required=True, help="evaluation data: .npy/.npz file or folder")
    p.add_argument("--plan", metavar="PLAN.json", help="plan of the first quantized model (default: beside it)")
    p.add_argument("-o", "--output", required=True, help="where to write the report (.html)")
    p.add_argument("--no-bench", action="store_true", help="skip the latency measurement")
    p.add_argument(
        "--no-diagnose",
        action="store_true",
        help="per-layer SQNR only: no layer-alone trials, suggested fixes or re-quantization",
    )
    p.add_argument("--limit", type=int, default=256, metavar="N", help="samples of DATA to use (default 256)")
    p.add_argument("--batch-size", type=int, default=8)
    add_output_kind_arg(p)
    p.add_argument("--json", action="store_true", help="also print the report data as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..evaluate.outputs import headline_text
    from ..evaluate.report_data import report, size_text

    result = report(
        args.float_model,
        args.quant_models,
        args.data,
        args.output,
        plan=args.plan,
        bench=not args.no_bench,
        diagnose=not args.no_diagnose,
        limit=args.limit,
        batch_size=args.batch_size,
        progress=not args.quiet,
        kinds=output_kinds(args, args.float_model),
    )
    if args.json:
        print(result.to_json(indent=1))
    else:
        worst = sorted(
            (layer for layer in result.layers if not math.isnan(layer["sqnr_db"])), key=lambda layer: layer["sqnr_db"]
        )[:3]
        for v in result.variants[1:]:
            # the headline that fits the first output's kind (top-1 only for class scores)
            print(f"{v['name']}: {headline_text(v)}, cosine {v['cosine']:.4f}, {size_text(v['size_bytes'])}")
        if worst:
            print("lowest SQNR: " + ", ".join(f"{layer['node']} {layer['sqnr_db']:.1f} dB" for layer in worst))
        print(f"wrote {result.output}")
    return 0
