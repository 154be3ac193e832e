"""ONNX (float or lowbit's QDQ int8) -> TFLite flatbuffer, without TensorFlow.

Layout: 4-D inputs are declared NHWC in the .tflite file (what camera pipelines on phones hand over); the
caller transposes NCHW data once, at the edge, and no TRANSPOSE is left inside a convolutional graph. 4-D outputs
are NHWC too. An input the ONNX model already takes channels-last (every path from it reaches a Transpose to NCHW,
as in tf2onnx's Keras models) is declared as it is, and so is an output made by a Transpose to NHWC (the
metadata's `layout_as_onnx` lists them). Batch size is fixed at export (TFLite resizes inputs at run time, as
`resize_tensor_input`).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

from ..._version import __version__
from ...errors import LowbitError
from ...evaluate.jsonable import dumps, jsonable
from ...graph.io import load_model, model_name
from ...passes import prepare
from .branches import expose_reads, fix_inputs, resolve_conditions, settle_on_sizes
from .chain1d import keep_expanded
from .context import Context
from .edges import channels_last, edge_input, edge_output, made_channels_last, quantize_float_outputs
from .gelu import fuse_gelu
from .hard import hard_sigmoid, hard_swish
from .kinds import checkpoint, decide, fuse_activations
from .metadata import METADATA_NAME, ImageMetadata, append_files
from .metadata import build as build_metadata
from .ops import CONVERTERS, NONE
from .probe import probe, static_shapes
from .qdq import Graph, fold_dynamic, read_graph
from .recurrent import unroll
from .rewrite import (
    batchnorm,
    expand_1d,
    inline_constant_ifs,
    quantize_constant_operands,
    requantize,
    split,
)
from .transformer import fuse_bias
from .writer import serialize

IO_KINDS = ("float", "int8", "uint8")
# auto: float32 for float models, float16 for lowbit's float16-mode output, int8 for QDQ models.
PRECISIONS = ("auto", "float32", "float16", "dynamic")
# lowbit's dynamic / weight-only forms left after fold_dynamic (MatMulInteger with int8 weights folds back).
_DYNAMIC_FORM = {"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "MatMulNBits", "GatherBlockQuantized"}


@dataclass
class ExportResult:
    """The flatbuffer (`data`) and what went into it; `to_dict()`/`to_json()` summarize it without the bytes."""

    data: bytes
    quantized: bool
    io: str
    precision: str
    ops: dict[str, int]
    float_nodes: list[str] = field(default_factory=list)  # left in float by the quantizer
    fallbacks: list[str] = field(default_factory=list)  # quantized in ONNX, float in TFLite (user allowed)
    transposes: list[str] = field(default_factory=list)
    path: Path | None = None  # where export_tflite wrote it
    model: str = ""  # the ONNX model it came from

    def to_dict(self) -> dict[str, Any]:
        return jsonable(
            {
                "model": self.model,
                "output": str(self.path) if self.path is not None else None,
                "format": "tflite",
                "quantized": self.quantized,
                "precision": self.precision,
                "io": self.io,
                "size_bytes": len(self.data),
                "ops": self.ops,
                "float_nodes": self.float_nodes,
                "fallbacks": self.fallbacks,
                "transposes": self.transposes,
            }
        )

    def to_json(self, indent: int | None = 2) -> str:
        return dumps(self.to_dict(), indent=indent)


def _load(
    model: str | Path | onnx.ModelProto, values: dict[str, Any] | None = None
) -> tuple[onnx.ModelProto, dict[str, Any] | None, dict[str, list]]:
    """The model (`values`: inputs made constants), its plan's recipe and the plan's calibrated activation ranges
    (none without a plan beside it)."""
    recipe, ranges = None, {}
    irm = load_model(model)
    if not isinstance(model, onnx.ModelProto):
        from ...plan import Plan, plan_path

        if plan_path(model).is_file():
            try:
                plan = Plan.load(plan_path(model))
                recipe = plan.recipe
                # graph outputs' ranges (plans since output_ranges) first; a quantized tensor's own range wins
                ranges = dict(plan.output_ranges)
                ranges.update({k: t.range for k, t in plan.tensors.items() if t.range is not None})
            except (LowbitError, ValueError, KeyError, OSError):
                recipe = None
    proto = ir.to_proto(irm)
    if values:
        fix_inputs(proto, values)
    changed = bool(values)
    # an If on constants takes its branch; the branch's own Ifs may then have constant conditions too
    while resolve_conditions(proto) | inline_constant_ifs(proto):
        changed = True
    if changed:
        irm = ir.from_proto(proto)
    if not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in irm.graph):
        prepare(irm)  # a QDQ model from lowbit is prepared already; folding again would fold its weight DQs
    return ir.to_proto(irm), recipe, ranges


def _precision(g: Graph, precision: str, dynamic_form: bool) -> str:
    if precision not in PRECISIONS:
        raise LowbitError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if g.quant:
        if precision != "auto":
            raise LowbitError(
                f"--precision {precision} is for float models; this one is int8 QDQ and exports "
                "as full-integer (leave --precision at auto)"
            )
        return "int8"
    for node in g.nodes:
        if node.op_type in _DYNAMIC_FORM:
            raise LowbitError(
                f"node {node.name or node.output[0]} ({node.op_type}): this form of lowbit's dynamic "
                "or weight-only output is not converted; export the float model with --precision dynamic"
            )
    if precision == "auto":
        if dynamic_form:
            return "dynamic"
        # lowbit's weight-only output: int8 weights stay int8 in the file, DEQUANTIZE'd when the model loads
        return "float16" if g.fp16 else "weight_only" if g.qconsts else "float32"
    return precision


def _fold(g: Graph, shapes: dict[str, tuple[int, ...]], opsets: dict[str, int]) -> None:
    """Evaluate nodes on constants (the exporter's shape arithmetic) so only real compute remains."""
    kept = []
    for node in g.nodes:
        inputs = [i for i in node.input if i]
        if node.op_type == "Shape" and node.input[0] in shapes:
            a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
            g.consts[node.output[0]] = np.array(shapes[node.input[0]], np.int64)[a.get("start", 0) : a.get("end")]
        elif (
            inputs
            and all(i in g.consts for i in inputs)
            and node.domain in ("", "ai.onnx")
            and not any(a.type == onnx.AttributeProto.GRAPH for a in node.attribute)  # a branch reads outer values
        ):
            g.consts.update(zip(node.output, _evaluate(node, g.consts, opsets)))
        else:
            kept.append(node)
    g.nodes = kept


def _evaluate(node: onnx.NodeProto, consts: dict[str, np.ndarray], opsets: dict[str, int]) -> list[np.ndarray]:
    """One node on constant inputs, in ONNX Runtime (the reference evaluator misses broadcasting cases)."""
    import onnxruntime as ort

    inputs = [
        helper.make_tensor_value_info(i, helper.np_dtype_to_tensor_dtype(consts[i].dtype), consts[i].shape)
        for i in dict.fromkeys(i for i in node.input if i)
    ]
    graph = helper.make_graph([node], "fold", inputs, [helper.make_empty_tensor_value_info(o) for o in node.output])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()])
    model.ir_version = 8
    try:
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        # np.asarray: a 0-d constant may be held as a numpy scalar, which ONNX Runtime refuses as a feed
        return [np.asarray(v) for v in sess.run(None, {i.name: np.asarray(consts[i.name]) for i in inputs})]
    except Exception as e:  # noqa: BLE001 - ORT raises several unrelated types for a bad node
        raise LowbitError(
            f"node {node.name or node.output[0]} ({node.op_type}): cannot evaluate it on its "
            f"constant inputs ({str(e).splitlines()[0][:200]})"
        ) from None


def convert(
    model: str | Path | onnx.ModelProto,
    io: str = "float",
    allow_float_fallback: bool = False,
    batch: int = 1,
    precision: str = "auto",
    shapes: dict[str, tuple[int, ...]] | None = None,
    calib: Any = None,
    preprocess: Any = None,
    float_outputs: bool = False,
    values: dict[str, Any] | None = None,
    metadata: ImageMetadata | None = None,
) -> ExportResult:
    """Convert a float or QDQ int8 ONNX model to .tflite bytes (see `export_tflite` to write a file).

    precision (float models): float32; float16 (constants stored fp16, DEQUANTIZE'd to float32 at load);
    dynamic (conv / fully-connected weights int8 per output channel, float activations that TFLite's hybrid
    kernels quantize on the fly). QDQ models export as full-integer int8. shapes fixes input sizes by name
    (e.g. a transformer's sequence length); other symbolic batch axes become `batch`. calib (anything
    `lowbit.data.open_data` reads, with `preprocess` for image folders) measures the range of float model
    outputs (lowbit leaves a weighted Gemm/MatMul's model output float) so that layer runs int8 too: integer io
    needs it; with float io it is optional (without it, and without the range in the plan, that layer runs
    float). float_outputs: keep such an output's layer float anyway, as the int8 ONNX computes it (int8 logits
    tie classes closer than one output step: a top-1 flip against the int8 ONNX, broken by index). values: inputs
    fixed to a value (a sample rate), made constants; an If on them keeps only the branch they take. metadata:
    an image model's normalization and labels as TFLite metadata (MediaPipe, the Task Library)."""
    if io not in IO_KINDS:
        raise LowbitError(f"io must be one of {', '.join(IO_KINDS)}, got {io!r}")
    proto, recipe, ranges = _load(model, values)
    ctx = _build(proto, model, io, allow_float_fallback, batch, precision, shapes, calib, preprocess, float_outputs,
                 ranges)  # fmt: skip
    ctx.fm.metadata["lowbit"] = json.dumps(
        {
            "lowbit_version": __version__,
            "io": io,
            "precision": ctx.precision,
            "layout": "4-D inputs and outputs are NHWC",
            "layout_as_onnx": ctx.as_onnx,  # except these, channels-last in the ONNX model already
            "recipe": recipe,
        }
    ).encode()
    files: dict[str, bytes] = {}
    if metadata is not None:
        ctx.fm.metadata[METADATA_NAME], files = build_metadata(ctx.fm, metadata, _title(model))
    data = append_files(serialize(ctx.fm), files)
    fallbacks = ctx.fallbacks
    float_nodes = [n for n in ctx.float_nodes if not any(n.startswith(f.split(" (")[0] + " (") for f in fallbacks)]
    ops = Counter(op.op for fm in [ctx.fm, *ctx.fm.subgraphs] for op in fm.operators)
    return ExportResult(
        data,
        ctx.quantized,
        io,
        ctx.precision,
        dict(ops),
        float_nodes,
        fallbacks,
        sorted(set(ctx.transposes)),
        model=model_name(model),
    )


def _title(model: str | Path | onnx.ModelProto) -> str:
    return Path(model).stem if not isinstance(model, onnx.ModelProto) else model.graph.name or "model"


def build_branch(proto: onnx.ModelProto, parent: Context) -> Context:
    """An If branch, made a model of its own (`branches.py`), converted into a subgraph: float inputs and outputs
    (4-D ones NHWC) that the IF op passes through; int8 inside as the branch's Q/DQ pairs say. Its own branches
    join the main model's list of subgraphs."""
    if inline_constant_ifs(proto):
        proto = ir.to_proto(ir.from_proto(proto))
    precision = "auto" if parent.precision in ("int8", "float32", "float16", "weight_only") else parent.precision
    return _build(proto, proto, "float", parent.allow_fallback, 1, precision, None, None, None, True, {},
                  branch_of=parent)  # fmt: skip


def _build(
    proto: onnx.ModelProto,
    model: str | Path | onnx.ModelProto,
    io: str,
    allow_float_fallback: bool,
    batch: int,
    precision: str,
    shapes: dict[str, tuple[int, ...]] | None,
    calib: Any,
    preprocess: Any,
    float_outputs: bool,
    ranges: dict[str, list],
    branch_of: Context | None = None,
) -> Context:
    """The conversion proper: the ONNX graph `proto` (prepared) as a Context holding the TFLite model."""
    shapes, dtypes = static_shapes(proto, batch, dict(shapes or {}))
    while settle_on_sizes(proto, shapes):  # the kept branches' values need shapes too, and may hold Ifs
        shapes, dtypes = probe(proto)
    g = read_graph(proto, dtypes)
    expose_reads(g)
    precision = _precision(g, precision, fold_dynamic(g))
    opsets = {d.domain: d.version for d in proto.opset_import}
    _fold(g, shapes, opsets)
    fuse_gelu(g)
    outputs = [o.name for o in proto.graph.output]
    fuse_bias(g, {g.name(o) for o in outputs})
    hard_swish(g, {g.name(o) for o in outputs})
    hard_sigmoid(g, shapes, dtypes)
    batchnorm(g, shapes, dtypes)
    expand_1d(g, shapes, dtypes)
    recurrent = unroll(g, shapes, dtypes)
    split(g, shapes, dtypes)
    keep_expanded(g, shapes, dtypes, {g.name(o) for o in outputs})
    quantize_constant_operands(g)
    requantize(g, shapes, dtypes)
    ctx = Context(g, shapes, precision, dtypes)
    ctx.opsets, ctx.ir_version, ctx.allow_fallback = opsets, proto.ir_version, allow_float_fallback
    if branch_of is not None:
        ctx.fm.subgraphs = branch_of.fm.subgraphs  # one list, numbered in the main model
    acts = fuse_activations(g, ctx, {g.name(o) for o in outputs})
    ctx.quantized = quantized = bool(g.quant)
    ctx.float_nodes += recurrent if quantized else []
    if io != "float" and not quantized:
        raise LowbitError(f"--io {io} needs a quantized (QDQ) model; this one is float")
    if float_outputs and io != "float" and branch_of is None:
        raise LowbitError(f"--io {io} makes every output int8; drop --float-outputs, or use --io float")
    if quantized and not float_outputs:  # full-integer where the output's range is known (plan or calib)
        quantize_float_outputs(g, model, [g.name(o) for o in outputs], calib, preprocess, ranges, io != "float")
    inits = {t.name for t in proto.graph.initializer}
    inputs = []
    for vi in proto.graph.input:
        if vi.name in inits:
            continue
        as_is = channels_last(g, vi.name)
        ctx.as_onnx += [vi.name] if as_is else []
        inputs.append(edge_input(ctx, vi.name, io, not as_is))
    fallbacks = ctx.fallbacks
    for node in g.nodes:
        conv = CONVERTERS.get(node.op_type)
        name = node.name or node.output[0]
        if conv is None:
            raise LowbitError(f"node {name} ({node.op_type}): no TFLite equivalent is exported")
        for o in node.output:
            if o not in shapes:
                raise LowbitError(
                    f"node {name} ({node.op_type}): output {o} has no static shape; "
                    "export the model with fixed input sizes"
                )
        kind = decide(ctx, node, allow_float_fallback, fallbacks)
        if kind == "f" and quantized and node.op_type not in ("Identity", "If") and name not in g.float_islands:
            ctx.float_nodes.append(f"{name} ({node.op_type})")
        a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        if kind == "f":
            conv(ctx, node, a, kind, acts.get(name, NONE))
            continue
        undo = checkpoint(ctx)
        try:
            conv(ctx, node, a, "q", acts.get(name, NONE))
        except LowbitError as e:  # an int8 parameter TFLite cannot express: float if the user allows it
            undo()
            conv(ctx, node, a, "f", acts.get(name, NONE))  # fails on its own if float cannot express it either
            if not allow_float_fallback:
                raise LowbitError(f"{e}; pass --allow-float-fallback to run it in float") from None
            fallbacks.append(f"{name} ({node.op_type}): {str(e).split('): ', 1)[-1]}")
            ctx.float_nodes.append(f"{name} ({node.op_type})")
    ctx.fm.inputs = inputs
    if branch_of is None:
        ctx.as_onnx += [o for o in outputs if made_channels_last(g, g.name(o))]
        ctx.fm.outputs = [edge_output(ctx, g.name(o), o, io, o not in ctx.as_onnx) for o in outputs]
    else:  # what the IF op hands on: float, 4-D maps NHWC, whatever layout the branch computed them in
        ctx.fm.outputs = [ctx.get(g.name(o), "f", len(shapes[g.name(o)]) == 4) for o in outputs]
    # the serving_default signature names them as the ONNX graph does
    ctx.fm.input_names = [vi.name for vi in proto.graph.input if vi.name not in inits]
    ctx.fm.output_names = outputs
    return ctx
