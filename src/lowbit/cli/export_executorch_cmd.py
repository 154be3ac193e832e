"""`lowbit export MODEL.py:NAME --to executorch`: a PyTorch module as an ExecuTorch `.pte` program (XNNPACK),
quantized with the numbers of lowbit's int8 ONNX model of it when --calib is given, or with its learned ranges
when NAME is a `lowbit.torch` QAT module."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Any

from ..errors import LowbitError

EXECUTORCH_ONLY = ("calibration", "percentile", "per_tensor", "output_name")


def add_args(p: argparse.ArgumentParser) -> None:
    e = p.add_argument_group("--to executorch (MODEL is FILE.py:NAME, a PyTorch module)")
    e.add_argument(
        "--calibration",
        choices=["minmax", "percentile", "entropy", "mse", "layer_error", "layer_error_fast"],
        help="range method, as lowbit quantize's (default layer_error_fast)",
    )
    e.add_argument("--percentile", type=float, help="percentile for --calibration percentile (default 99.99)")
    e.add_argument("--per-tensor", action="store_true", help="one weight scale per tensor instead of per channel")
    e.add_argument("--output-name", action="append", default=[], metavar="NAME", help="name of an output (repeatable)")


def split_spec(spec: str) -> tuple[Path, str]:
    """`FILE.py:NAME` as (file, name), or a one-line error (an ONNX file: ExecuTorch needs the PyTorch model)."""
    path, sep, name = spec.rpartition(":")
    if not sep or not path.endswith(".py") or not name:
        if spec.lower().endswith((".onnx", ".tflite", ".ort")):
            raise LowbitError(
                f"{spec} is not a PyTorch module: ExecuTorch export needs the PyTorch model; name it as FILE.py:NAME"
            )
        raise LowbitError(f"--to executorch takes the PyTorch model as FILE.py:NAME, got {spec!r}")
    file = Path(path)
    if not file.is_file():
        raise LowbitError(f"model file not found: {file}; check the path")
    return file, name


def load_module(spec: str) -> tuple[Any, tuple | None]:
    """`FILE.py:NAME` -> (module, example inputs or None). NAME is a torch.nn.Module, or a function or class called
    with no arguments that returns a module or a (module, example_inputs) pair."""
    import torch

    file, name = split_spec(spec)
    spec_ = importlib.util.spec_from_file_location(f"lowbit_user_{file.stem}", file)
    assert spec_ is not None and spec_.loader is not None
    mod = importlib.util.module_from_spec(spec_)
    sys.path.insert(0, str(file.parent.resolve()))  # the file's own imports of its neighbours
    try:
        spec_.loader.exec_module(mod)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LowbitError(f"running {file} failed ({type(e).__name__}: {first})") from None
    finally:
        sys.path.pop(0)
    if not hasattr(mod, name):
        raise LowbitError(f"{file} has no attribute {name!r}; name a module, or a function returning one")
    obj = getattr(mod, name)
    if not isinstance(obj, torch.nn.Module) and callable(obj):
        obj = obj()
    example = None
    if isinstance(obj, tuple) and len(obj) == 2:
        obj, example = obj
    if not isinstance(obj, torch.nn.Module):
        raise LowbitError(f"{spec} is a {type(obj).__name__}, not a torch.nn.Module")
    return obj, example


def run(args: argparse.Namespace, shapes: dict[str, tuple[int, ...]], preprocess: Any) -> int:
    tflite_only = {
        "--io": args.io != "float",
        "--precision": args.precision != "auto",
        "--allow-float-fallback": args.allow_float_fallback,
        "--batch": args.batch != 1,
    }
    given = [name for name, set_ in tflite_only.items() if set_]
    if given:
        raise LowbitError(f"{', '.join(given)}: only for --to tflite")
    split_spec(args.model)  # a wrong kind of model fails before the slow imports
    from ..export.executorch.export import require_executorch

    require_executorch()  # "pip install lowbit[executorch]" before loading the user's file
    import torch

    from ..export.executorch import export_executorch
    from ..recipe import Recipe, Scheme

    module, example = load_module(args.model)
    names = None
    if shapes:
        names = list(shapes)
        example = tuple(torch.zeros(s) for s in shapes.values())
    if example is None:
        raise LowbitError("give the input shapes with --shape INPUT=1x3x224x224 (one per forward argument)")
    scheme: dict[str, Any] = {"per_channel": not args.per_tensor}
    if args.calibration:
        scheme["calibration"] = args.calibration
    if args.percentile is not None:
        scheme["percentile"] = args.percentile
    result = export_executorch(
        module,
        example,
        args.output,
        calib=args.calib,
        recipe=Recipe(default=Scheme(**scheme)),
        preprocess=preprocess,
        input_names=names,
        output_names=args.output_name or None,
    )
    s = result.to_dict()
    if args.json:
        print(result.to_json(indent=2))
        return 0
    kind = "float32"
    if s["quantized"]:
        kind = (
            f"int8, {s['calibration']} ranges on {s['calibration_samples']} samples, "
            f"{s['layers_from_onnx']} layers' integers from lowbit's int8 ONNX model"
        )
    if s["quantized"] and not s["calibration_samples"]:
        kind = "int8, the QAT module's learned ranges"
    size = f"{s['size_bytes'] / 1e6:.2f} MB"
    print(f"wrote {s['output']} (ExecuTorch, XNNPACK, {kind}, {size}, {s['export_seconds']:.1f} s)")
    print("run by XNNPACK: " + (", ".join(f"{op} {n}" for op, n in s["delegated_ops"].items()) or "nothing"))
    if s["portable_ops"]:
        print("left to portable kernels: " + ", ".join(f"{op} {n}" for op, n in s["portable_ops"].items()))
    return 0
