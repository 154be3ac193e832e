"""`lowbit export`: write a model in another runtime's format (TFLite for LiteRT), without TensorFlow."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from ..errors import LowbitError
from .common import add_image_args, image_preprocess

if TYPE_CHECKING:
    from ..export.tflite import ImageMetadata

PRECISIONS = ("auto", "float32", "float16", "dynamic")  # as lowbit.export.tflite.PRECISIONS, without importing it
KINDS = {
    "int8": "full-integer int8",
    "float32": "float32",
    "float16": "float16 weights",
    "dynamic": "dynamic-range: int8 weights, float activations",
    "weight_only": "int8 weights dequantized at load, float compute",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a float or quantized ONNX model as .tflite for LiteRT, or .ort for ONNX Runtime Mobile",
        description="Convert a float ONNX model, or lowbit's int8 QDQ, dynamic or float16 output, into "
        "a TensorFlow Lite flatbuffer that LiteRT runs (full-integer int8 for QDQ models). 4-D inputs "
        "and outputs become NHWC: transpose NCHW data once before feeding it (an input the ONNX model takes "
        "channels-last already stays as it is). --to ort: ONNX Runtime's "
        "ORT format (optimized once, as a phone's CPU runs it) and MODEL.required_operators.config beside "
        "it for a reduced-size build; the options below apply to tflite only. --to executorch: a PyTorch "
        "module (FILE.py:NAME) as an ExecuTorch .pte program for XNNPACK, int8 with lowbit's ranges when "
        "--calib is given (--shape names and sizes its inputs).",
    )
    p.add_argument(
        "model",
        help="ONNX model (float, or lowbit's int8 QDQ / dynamic / float16 output); for --to executorch a PyTorch "
        "module as FILE.py:NAME (a module, or a function returning one)",
    )
    p.add_argument(
        "--to", choices=["tflite", "ort", "executorch"], default="tflite", help="target format (default tflite)"
    )
    p.add_argument(
        "-o", "--output", required=True, metavar="OUT.tflite|OUT.ort|OUT.pte", help="output file (never the input)"
    )
    p.add_argument(
        "--io",
        choices=["float", "int8", "uint8"],
        default="float",
        help="int8 models: float inputs/outputs with one QUANTIZE/DEQUANTIZE at the edges (default; int8 "
        "inside, the classifier too), or integer ones",
    )
    p.add_argument(
        "--precision",
        choices=list(PRECISIONS),
        default="auto",
        help="float models: float32, float16 (weights stored fp16, half the size) or dynamic (int8 "
        "weights, float activations quantized on the fly by TFLite's hybrid kernels). auto (default): "
        "float32; float16 or dynamic for lowbit's float16- or dynamic-mode output; full-integer int8 for "
        "QDQ models",
    )
    p.add_argument(
        "--allow-float-fallback",
        action="store_true",
        help="run in float the quantized ops whose int8 form TFLite cannot express, instead of failing",
    )
    p.add_argument(
        "--batch",
        type=int,
        default=1,
        help="batch size fixed in the file (default 1; LiteRT can resize classifier inputs at run time)",
    )
    p.add_argument(
        "--shape",
        action="append",
        default=[],
        metavar="INPUT=1x128",
        help="fix an input's sizes (repeatable), e.g. a transformer's sequence length: "
        "--shape input_ids=1x128 --shape attention_mask=1x128",
    )
    p.add_argument(
        "--value",
        action="append",
        default=[],
        metavar="INPUT=V",
        help="fix a scalar input to a value (repeatable), e.g. a VAD's sample rate --value sr=16000: it becomes a "
        "constant and an If on it keeps only the branch it takes (needed when the branches give different sizes)",
    )
    p.add_argument(
        "--calib",
        metavar="DATA",
        help="data (.npy/.npz, or an image folder) to measure the range of outputs the quantizer left float "
        "(a classifier's final Gemm) on the int8 model. Not needed for a model from lowbit quantize: its plan "
        "records every output's range, so the export is full-integer by default; needed only for models "
        "without such a plan and --io int8/uint8",
    )
    p.add_argument(
        "--float-outputs",
        action="store_true",
        help="keep the layers the quantizer left float at the outputs (a classifier's last Gemm) float, as the "
        "int8 ONNX runs them: int8 logits tie classes closer than one step (default: full-integer)",
    )
    p.add_argument(
        "--labels",
        metavar="FILE",
        help="class names, one per line, for the first output: written with the input's normalization as TFLite "
        "metadata (MediaPipe and the Task Library then run the image model without code); implies --image-metadata",
    )
    p.add_argument(
        "--image-metadata",
        action="store_true",
        help="write TFLite metadata for an image model: RGB input normalized as (pixel/255 - --mean) / --std",
    )
    add_image_args(p)
    from .export_executorch_cmd import add_args

    add_args(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(run=run)


def export_text(summary: dict) -> str:
    kind = KINDS[summary["precision"]]
    lines = [
        f"wrote {summary['output']} ({kind}, {summary['size_bytes'] / 1e6:.2f} MB, io {summary['io']}, "
        "4-D tensors NHWC)",
        "operators:",
    ]
    lines += [f"  {op:<22} {n:>4}" for op, n in sorted(summary["ops"].items(), key=lambda kv: -kv[1])]
    if summary["float_nodes"]:
        lines.append(f"left in float by the quantizer: {len(summary['float_nodes'])} nodes")
        lines += [f"  {n}" for n in summary["float_nodes"]]
    if summary["fallbacks"]:
        lines.append(f"float fallbacks (int8 form not expressible in TFLite): {len(summary['fallbacks'])}")
        lines += [f"  {n}" for n in summary["fallbacks"]]
    if summary["transposes"]:
        lines.append("transposes inside the graph (flattening a spatial map): " + ", ".join(summary["transposes"]))
    return "\n".join(lines)


def parse_shapes(items: list[str]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for item in items:
        name, _, dims = item.rpartition("=")
        try:
            sizes = tuple(int(d) for d in dims.lower().replace(",", "x").split("x"))
        except ValueError:
            sizes = ()
        if not name or not sizes or min(sizes) < 1:
            raise LowbitError(f"--shape {item!r}: expected INPUT=SIZExSIZE..., e.g. input_ids=1x128")
        shapes[name] = sizes
    return shapes


def parse_values(items: list[str]) -> dict[str, float]:
    values = {}
    for item in items:
        name, _, v = item.rpartition("=")
        try:
            values[name] = float(v)
        except ValueError:
            name = ""
        if not name:
            raise LowbitError(f"--value {item!r}: expected INPUT=NUMBER, e.g. sr=16000")
    return values


def image_metadata(args: argparse.Namespace) -> ImageMetadata | None:
    """--labels / --image-metadata as TFLite metadata; --mean/--std (0-1 scale, as image folders use them) become
    pixel units (0-255), which the metadata schema uses."""
    if not (args.labels or args.image_metadata):
        return None
    if args.bgr:
        raise LowbitError("--bgr: TFLite metadata has no BGR color space; feed RGB, or drop --labels/--image-metadata")
    from ..export.tflite import ImageMetadata

    labels = None
    if args.labels:
        try:
            with open(args.labels, encoding="utf-8") as f:
                labels = [line.strip() for line in f if line.strip()]
        except OSError as e:
            raise LowbitError(f"--labels {args.labels}: cannot read it ({e.strerror}); give a text file") from None
    return ImageMetadata(mean=[255 * m for m in args.mean], std=[255 * s for s in args.std], labels=labels)


def run(args: argparse.Namespace) -> int:
    if args.to == "ort":
        return run_ort(args)
    from .export_executorch_cmd import EXECUTORCH_ONLY

    if args.to == "executorch":
        from .export_executorch_cmd import run as run_executorch

        return run_executorch(args, parse_shapes(args.shape), image_preprocess(args))
    given = [f"--{n.replace('_', '-')}" for n in EXECUTORCH_ONLY if getattr(args, n)]
    if given:
        raise LowbitError(f"{', '.join(given)}: only for --to executorch")
    if args.batch < 1:
        raise LowbitError(f"--batch must be at least 1, got {args.batch}")
    shapes = parse_shapes(args.shape)
    from ..export.tflite import export_tflite  # keeps `lowbit --help` fast

    result = export_tflite(
        args.model,
        args.output,
        io=args.io,
        allow_float_fallback=args.allow_float_fallback,
        batch=args.batch,
        precision=args.precision,
        shapes=shapes,
        calib=args.calib,
        preprocess=image_preprocess(args),
        float_outputs=args.float_outputs,
        values=parse_values(args.value),
        metadata=image_metadata(args),
    )
    print(result.to_json(indent=2) if args.json else export_text(result.to_dict()))
    return 0


def run_ort(args: argparse.Namespace) -> int:
    tflite_only = {
        "--io": args.io != "float",
        "--precision": args.precision != "auto",
        "--allow-float-fallback": args.allow_float_fallback,
        "--batch": args.batch != 1,
        "--shape": bool(args.shape),
        "--calib": args.calib is not None,
        "--float-outputs": args.float_outputs,
        "--value": bool(args.value),
        "--labels": bool(args.labels),
        "--image-metadata": args.image_metadata,
    }
    given = [name for name, set_ in tflite_only.items() if set_]
    if given:
        raise LowbitError(
            f"{', '.join(given)}: only for --to tflite; --to ort keeps the ONNX model's inputs as they are"
        )
    from ..export.ort import export_ort

    result = export_ort(args.model, args.output)
    summary = result.to_dict()
    if args.json:
        print(result.to_json(indent=2))
        return 0
    print(f"wrote {summary['output']} (ORT format, {summary['optimization']}, {summary['size_bytes'] / 1e6:.2f} MB)")
    print(f"wrote {summary['config']} (operators for a reduced-size ONNX Runtime build):")
    for domain, ops in summary["ops"].items():
        print(f"  {domain:<18} {', '.join(ops)}")
    return 0
