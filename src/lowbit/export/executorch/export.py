"""export_executorch: a PyTorch module -> an ExecuTorch `.pte` program with int8 XNNPACK kernels, quantized with
lowbit's recipe and ranges through PyTorch's PT2E flow.

With calibration data, the module's ONNX export is quantized by `lowbit.quantize` (the recipe as given: its
range method, the default `layer_error_fast` included, overflow guard, bias correction, float decisions), and the
PT2E graph takes that model's numbers (`twin.py`): torch.export -> prepare_pt2e (XNNPACK's annotations, fixed
observers: `quantizer.py`) -> convert_pt2e -> the twin's int8 weights and biases (`weights.py`) ->
to_edge_transform_and_lower(XnnpackPartitioner) -> `.pte` bytes, written atomically.
A `lowbit.torch` QAT module takes its learned scales instead of calibration (`qat.py`).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import LowbitError
from ...evaluate.jsonable import dumps, jsonable
from ...graph.write import check_paths, write_together
from ...recipe import Recipe
from ...runtimes.executorch import META_METHOD

INSTALL = "ExecuTorch export needs executorch and torchao: pip install 'lowbit[executorch]'"


@dataclasses.dataclass
class ExecutorchExportResult:
    """The `.pte` bytes (`data`) and what is in them; `to_dict()`/`to_json()` summarize it without the bytes."""

    data: bytes
    quantized: bool
    inputs: list[str]
    calibration: str
    samples: int
    delegated: dict[str, int]  # op -> count, the ops XNNPACK runs
    left: dict[str, int]  # op -> count, the ops left to ExecuTorch's portable kernels
    seconds: float
    path: Path | None = None
    layers_from_onnx: int = 0  # conv/linear layers whose integers came from lowbit's int8 ONNX model (`twin.py`)

    def to_dict(self) -> dict[str, Any]:
        return jsonable(
            {
                "output": str(self.path) if self.path is not None else None,
                "format": "executorch",
                "quantized": self.quantized,
                "backend": "XNNPACK",
                "inputs": self.inputs,
                "calibration": self.calibration if self.quantized else None,
                "calibration_samples": self.samples,
                "layers_from_onnx": self.layers_from_onnx if self.quantized else None,
                "size_bytes": len(self.data),
                "delegated_ops": self.delegated,
                "portable_ops": self.left,
                "export_seconds": round(self.seconds, 3),
            }
        )

    def to_json(self, indent: int | None = 2) -> str:
        return dumps(self.to_dict(), indent=indent)


def require_executorch() -> None:
    try:
        import executorch.exir  # noqa: F401
        import torchao  # noqa: F401
    except ImportError:
        raise LowbitError(INSTALL) from None


def check_recipe(recipe: Recipe | None) -> Any:
    """The part of a lowbit recipe the PT2E graph takes itself, or a one-line error for what it cannot express
    (the rest, ranges, overflow guard and bias correction included, comes with the twin's numbers)."""
    from .quantizer import Choice

    recipe = recipe if recipe is not None else Recipe()
    s = recipe.default
    if s.mode != "static":
        raise LowbitError(
            f"--to executorch quantizes statically (int8 XNNPACK kernels); mode {s.mode!r} is not supported"
        )
    if s.activations not in ("uint8", "int8") or s.weights != "int8":
        raise LowbitError(
            f"--to executorch takes int8 weights and 8-bit activations (XNNPACK); got weights {s.weights}, "
            f"activations {s.activations}"
        )
    if not s.symmetric_weights:
        raise LowbitError("XNNPACK's int8 kernels take symmetric weights; use symmetric_weights=True")
    if recipe.rules or recipe.exclude_names or recipe.exclude_op_types:
        raise LowbitError("--to executorch applies one scheme to the whole model; rules and exclusions are not mapped")
    return Choice(s.per_channel)


def _as_tuple(example_inputs: Any) -> tuple:
    import torch

    if isinstance(example_inputs, (torch.Tensor, np.ndarray)):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs:
        raise LowbitError("example_inputs must be a tensor or a tuple of tensors (one per forward argument)")
    # Standard strides: a numpy view's new axis has stride 0, which ExecuTorch's serializer refuses.
    return tuple(torch.as_tensor(x).clone(memory_format=torch.contiguous_format) for x in example_inputs)


def forward_names(module: Any, n: int) -> list[str]:
    try:
        params = [p.name for p in inspect.signature(module.forward).parameters.values()]
    except (TypeError, ValueError):
        params = []
    return params[:n] if len(params) >= n else ["input"] if n == 1 else [f"input_{i}" for i in range(n)]


def _calibration_batches(
    calib: Any, names: list[str], example: tuple, preprocess: Any, limit: int | None
) -> list[tuple[Any, ...]]:
    """Calibration data as batches of tensors, at most `limit` samples: a path (.npy/.npz/image folder, read by
    lowbit's data loader), an array or tensor of stacked samples, or an iterable of samples/batches. Read once:
    an iterator gives its items to the twin's calibration and the matching sample both."""
    import torch

    from ...data import InputSpec, open_data

    specs = [
        InputSpec(n, np.dtype(str(x.dtype).replace("torch.", "")), (None, *x.shape[1:])) for n, x in zip(names, example)
    ]
    if isinstance(calib, torch.Tensor):
        calib = calib.detach().cpu().numpy()
    out: list[tuple[Any, ...]] = []
    samples = 0
    for batch in open_data(calib, specs, batch_size=8, preprocess=preprocess):
        if limit is not None and samples >= limit:
            break
        n = int(batch[names[0]].shape[0]) if limit is None else min(int(batch[names[0]].shape[0]), limit - samples)
        out.append(tuple(torch.from_numpy(np.ascontiguousarray(batch[k][:n])) for k in names))
        samples += n
    step = int(example[0].shape[0]) if example[0].dim() else 1
    if samples == 0 or out[0][0].shape[0] < step:
        raise LowbitError("no calibration samples in calib; check the data")
    return out


def _op_counts(program: Any) -> tuple[dict[str, int], dict[str, int]]:
    """Ops inside XNNPACK's delegate(s) and ops left outside, from the lowered edge program."""
    delegated: dict[str, int] = {}
    left: dict[str, int] = {}
    gm = program.exported_program().graph_module
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", str(node.target))
        if name == "executorch_call_delegate":
            sub = getattr(gm, node.args[0].target)
            for op, n in _lowered_ops(sub).items():
                delegated[op] = delegated.get(op, 0) + n
        elif name != "getitem":
            left[name] = left.get(name, 0) + 1
    return dict(sorted(delegated.items())), dict(sorted(left.items()))


def _lowered_ops(lowered: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    ep = getattr(lowered, "original_module", None)
    if ep is None:
        return out
    for node in ep.graph.nodes:
        if node.op == "call_function":
            name = str(getattr(node.target, "__name__", node.target)).removesuffix(".default")
            if not name.startswith(("quantize_per", "dequantize_per", "getitem")):
                out[name] = out.get(name, 0) + 1
    return out


def export_executorch(
    module: Any,
    example_inputs: Any,
    output: str | Path | None = None,
    calib: Any = None,
    recipe: Recipe | None = None,
    preprocess: Any = None,
    limit: int | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
) -> ExecutorchExportResult:
    """Write `module` as an ExecuTorch program for XNNPACK.

    `example_inputs`: a tensor or tuple of tensors, one per forward argument; their shapes are fixed in the file
    (ExecuTorch programs are static-shaped here: batch 1 is what a phone runs). `calib`: calibration samples
    (a .npy/.npz file or image folder, an array of stacked samples, or an iterable); given, the program is int8
    with the numbers of lowbit's int8 ONNX model of the module made with `recipe` on the same data (one scheme
    for the whole model; static, int8 weights, 8-bit activations); None writes a float program.
    `input_names`/`output_names` are stored in the program (default: forward's argument names, `output`), so
    `lowbit eval --reference FLOAT.onnx` can match them with an ONNX model's.
    `output` ends in .pte; written atomically, never over an input. Returns what was written.
    """
    import torch

    require_executorch()
    if not isinstance(module, torch.nn.Module):
        if isinstance(module, (str, Path)) and str(module).lower().endswith((".onnx", ".tflite", ".ort")):
            raise LowbitError(
                f"{module} is not a PyTorch module: ExecuTorch export needs the PyTorch model "
                "(lowbit export MODEL.py:NAME --to executorch, or lowbit.export_executorch(module, ...))"
            )
        raise LowbitError(f"expected a torch.nn.Module, got {type(module).__name__}")
    out = Path(output) if output is not None else None
    if out is not None:
        check_paths([("-o", out)], [("calibration data", calib if isinstance(calib, (str, Path)) else None)])
        if out.suffix.lower() != ".pte":
            raise LowbitError(f"output {out} must end in .pte")
        if not out.parent.is_dir():
            raise LowbitError(f"output folder {out.parent} does not exist; create it first")
    from .qat import is_qat

    qat = is_qat(module)
    if qat and calib is not None:
        raise LowbitError("a lowbit.torch QAT module carries its learned ranges; export it without calibration data")
    check_recipe(recipe)
    example = _as_tuple(example_inputs)
    if input_names is not None and len(input_names) != len(example):
        raise LowbitError(f"{len(input_names)} input names for {len(example)} example inputs; give one per input")
    names = list(input_names) if input_names is not None else forward_names(module, len(example))
    t0 = time.perf_counter()
    if qat:
        graph, carried = _qat_graph(module, example), {"samples": 0}
    else:
        graph, carried = _ptq_graph(module.eval(), example, names, calib, recipe, preprocess, limit)
    outputs = list(output_names) if output_names is not None else None
    data, delegated, left = _lower(graph, example, {"inputs": names, **({"outputs": outputs} if outputs else {})})
    seconds = time.perf_counter() - t0
    if out is not None:
        write_together([(out, data)])
    return ExecutorchExportResult(
        data=data,
        quantized=calib is not None or qat,
        inputs=names,
        calibration="learned (QAT)" if qat else (recipe or Recipe()).default.calibration,
        samples=carried["samples"],
        layers_from_onnx=carried.get("layers", 0),
        delegated=delegated,
        left=left,
        seconds=seconds,
        path=out,
    )


def _export(module: Any, example: tuple) -> Any:
    import torch

    try:
        return torch.export.export(module, example, strict=False)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LowbitError(f"torch.export cannot capture the module ({first[:200]})") from None


def _ptq_graph(
    module: Any, example: tuple, names: list[str], calib: Any, recipe: Recipe | None, preprocess: Any, limit: int | None
) -> tuple[Any, dict[str, int]]:
    """The module captured by torch.export; with calib, quantized by PT2E with the numbers of lowbit's int8 ONNX
    model of it (`twin.py`). Returns the graph and what was carried over."""
    import torch
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from .quantizer import make_quantizer
    from .twin import fx_values, make_twin
    from .weights import CONV, LINEAR, install

    if calib is None:
        return module, {"samples": 0}
    choice = check_recipe(recipe)
    batches = _calibration_batches(calib, names, example, preprocess, limit)
    twin = make_twin(module, example, batches, recipe)
    layers: dict[str, Any] = {}

    def fixed(model: torch.fx.GraphModule) -> dict[str, tuple[float, int]]:
        """Each captured tensor that holds a quantized twin tensor's values takes its parameters; each conv/linear
        that computes a twin layer's output takes its weights (after convert)."""
        params = {}
        nodes = {n.name: n for n in model.graph.nodes}
        for name, value in fx_values(model, twin.sample).items():
            if (t := twin.match(value, twin.params)) is not None:
                params[name] = twin.params[t]
            if nodes[name].target in (CONV, LINEAR) and (t := twin.match(value, twin.layers)) is not None:
                layers[name] = twin.layers[t]
        return params

    with torch.no_grad():
        captured = _export(module, example).module()
        prepared = prepare_pt2e(captured, make_quantizer(choice, fixed, qat=False))
        prepared(*twin.sample)  # the weight observers (replaced by the twin's integers after convert)
        converted = convert_pt2e(prepared)
        installed = install(converted, layers)
    samples = sum(int(b[0].shape[0]) for b in batches)
    return converted, {"samples": samples, "layers": installed, "layers_in_twin": len(twin.layers)}


def _qat_graph(module: Any, example: tuple) -> Any:
    """A lowbit.torch QAT module in PT2E with its learned parameters (`qat.py`); one run of the example fills
    the weight observers (the activations' are fixed)."""
    import torch
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from .qat import learned_graph
    from .quantizer import Choice, make_quantizer

    with torch.no_grad():
        captured, learned = learned_graph(module, example, _export)
        prepared = prepare_pt2e(captured, make_quantizer(Choice(), lambda _: learned, qat=True))
        prepared(*example)
        return convert_pt2e(prepared)


def _lower(graph: Any, example: Sequence, names: dict[str, list[str]]) -> tuple[bytes, dict[str, int], dict[str, int]]:
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's own pytree deprecation notices
        ep = _export(graph, tuple(example))
        try:
            # The input/output names ride along as a constant method (JSON bytes), for eval/bench to match data
            # and reference models by name.
            meta = torch.tensor(list(json.dumps(names, sort_keys=True).encode()), dtype=torch.uint8)
            edge = to_edge_transform_and_lower(
                ep, partitioner=[XnnpackPartitioner()], constant_methods={META_METHOD: meta}
            )
            counts = _op_counts(edge)
            data = edge.to_executorch().buffer
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise LowbitError(f"ExecuTorch cannot lower the module to XNNPACK ({first[:200]})") from None
    return bytes(data), *counts
