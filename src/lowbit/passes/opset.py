"""Checks and one upgrade before any work: can ONNX Runtime run the float model, and is its opset new enough.

lowbit calibrates with ONNX Runtime, so a node in a domain it does not know (`com.example::Foo`) would only fail
after planning, inside calibration; it is refused here in one line. Per-channel QDQ needs DequantizeLinear's
`axis` (opset 13): older models are upgraded with onnx's version converter, and kept only if the upgraded model
computes the same outputs on a random input; otherwise they are refused before any work, with the fix.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import version_converter

from ..errors import LowbitError

QDQ_OPSET = 13
# Operator domains ONNX Runtime's CPU build registers kernels or schemas for.
ORT_DOMAINS = frozenset(
    {
        "",
        "ai.onnx",
        "ai.onnx.ml",
        "ai.onnx.preview.training",
        "com.microsoft",
        "com.microsoft.experimental",
        "com.microsoft.nchwc",
        "com.ms.internal.nhwc",
    }
)
# "Unchanged" for the upgrade check: float outputs agree to this, relative to their magnitude.
TOLERANCE = 1e-5
# Dynamic dims (other than the first) tried in turn until the original model runs: 1 suits sequences and most
# models; an image model that downsamples 5 times and resizes back fails on 1x1 pixels (PP-OCR's detectors).
DYNAMIC_SIZES = (1, 64, 256)
REEXPORT = "re-export the model at opset 13 or later (e.g. torch.onnx.export(..., opset_version=17))"


def ready_for_quantization(model: ir.Model, name: str) -> ir.Model:
    """The load stage's model checks; returns the model itself when nothing needs changing (opset >= 13)."""
    if not [v for v in model.graph.inputs if v.name not in model.graph.initializers]:
        # Otherwise a model of constants is "quantized" and written, and only the runtime check then fails.
        raise LowbitError(f"{name} has no inputs, so there is nothing to calibrate or run; pass the model itself")
    check_runnable(model, name)
    refuse_qdq(model, name)
    return upgrade_opset(model, name)


def refuse_qdq(model: ir.Model, name: str) -> None:
    """A model in QDQ form was quantized already (often lowbit's own output passed back by mistake): quantizing it
    again would round twice and collide with its parameter names."""
    count = sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph)
    if count:
        raise LowbitError(
            f"{name} is already quantized ({count} QuantizeLinear/DequantizeLinear nodes); pass the float model "
            "it was made from"
        )


def check_runnable(model: ir.Model | onnx.ModelProto, name: str) -> None:
    """Refuse a model with ops ONNX Runtime cannot run; a session is tried only when an unknown domain appears
    (a model-local function or a contrib op may still run, and then the planner keeps the node float)."""
    if isinstance(model, onnx.ModelProto):
        local = {(f.domain, f.name) for f in model.functions}
        nodes = [(n.name, n.domain, n.op_type) for n in _proto_nodes(model.graph)]
    else:
        local = {(f.domain, f.name) for f in model.functions.values()}
        nodes = [(n.name or "", n.domain, n.op_type) for n in ir.traversal.RecursiveGraphIterator(model.graph)]
    unknown = [n for n in nodes if n[1] not in ORT_DOMAINS and (n[1], n[2]) not in local]
    if not unknown:
        return
    node, domain, op = unknown[0]
    try:
        _session(model if isinstance(model, onnx.ModelProto) else ir.to_proto(model))
    except Exception as e:  # ORT raises its own exception types; any failure means it cannot run this model
        raise LowbitError(
            f"ONNX Runtime cannot run {name}: node '{node}' is {domain}::{op}, an op it does not know "
            f"({_first_line(e)}); replace the node with standard ONNX ops (or a model-local function)"
        ) from None


def _proto_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Every node, subgraphs (If, Loop, Scan bodies) included."""
    out = []
    for n in graph.node:
        out.append(n)
        for a in n.attribute:
            for g in [a.g] if a.HasField("g") else list(a.graphs):
                out.extend(_proto_nodes(g))
    return out


def upgrade_opset(model: ir.Model, name: str) -> ir.Model:
    """Models below opset 13, upgraded with onnx's version converter when that leaves their outputs unchanged."""
    version = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if version is None or version >= QDQ_OPSET:
        return model
    why = f"{name} uses ONNX opset {version}, and lowbit's per-channel QDQ needs opset {QDQ_OPSET}"
    proto = ir.to_proto(model)
    try:
        upgraded = version_converter.convert_version(proto, QDQ_OPSET)
        onnx.checker.check_model(upgraded)
    except Exception as e:  # the converter raises bare RuntimeErrors and C++ assertion texts
        raise LowbitError(f"{why}; onnx's version converter cannot upgrade it ({_first_line(e)}); {REEXPORT}") from None
    problem = _differs(proto, upgraded)
    if problem:
        raise LowbitError(f"{why}; upgrading it with onnx's version converter {problem}; {REEXPORT}")
    return ir.from_proto(upgraded)


def _differs(before: onnx.ModelProto, after: onnx.ModelProto) -> str | None:
    """Why the upgraded model cannot stand in for the original, or None when both agree on a random input."""
    try:
        old, new = _session(before), _session(after)
    except Exception as e:
        return f"could not be verified ({_first_line(e)})"
    failure: Exception | None = None
    quiet = ort.RunOptions()
    quiet.log_severity_level = 4  # a failed run raises; ONNX Runtime's own error log would only repeat it
    for size in DYNAMIC_SIZES:
        feeds = _random_feeds(old, size)
        try:
            want = old.run(None, feeds, quiet)
        except Exception as e:  # e.g. an image model given 1x1 pixels: try a larger input
            failure = failure or e
            continue
        try:
            got = new.run(None, feeds, quiet)
        except Exception as e:
            return f"fails where the original runs ({_first_line(e)})"
        return _compare(old, want, got)
    assert failure is not None
    return f"could not be verified: the original model does not run on a random input ({_first_line(failure)})"


def _compare(old: ort.InferenceSession, want: list, got: list) -> str | None:
    for meta, a, b in zip(old.get_outputs(), want, got):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            return f"changes the shape of output '{meta.name}'"
        if a.dtype.kind == "f":
            scale = max(1.0, float(np.max(np.abs(a), initial=0.0)))
            if not np.all(np.abs(a.astype(np.float64) - b) <= TOLERANCE * scale):
                return f"changes output '{meta.name}'"
        elif not np.array_equal(a, b):
            return f"changes output '{meta.name}'"
    return None


def _random_feeds(sess: ort.InferenceSession, size: int = 1) -> dict[str, np.ndarray]:
    """One sample per input: a dynamic first dim is 1 (the batch), other dynamic dims `size`; floats are standard
    normal, integers and booleans are 0."""
    rng = np.random.default_rng(0)
    feeds = {}
    for meta in sess.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 if i == 0 else size for i, d in enumerate(meta.shape)]
        kind = meta.type  # e.g. "tensor(float)"
        if "float" in kind or "double" in kind:
            floats = {"tensor(float16)": np.float16, "tensor(double)": np.float64}
            feeds[meta.name] = rng.standard_normal(shape).astype(floats.get(kind, np.float32))
        else:
            others = {"tensor(bool)": np.bool_, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8}
            feeds[meta.name] = np.zeros(shape, others.get(kind, np.int64))
    return feeds


def _session(proto: onnx.ModelProto) -> ort.InferenceSession:
    from ..runtimes.ort import session

    return session(proto.SerializeToString(), mode="simulate")


def _first_line(e: BaseException) -> str:
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


# Ops that only a quantizer writes: a model holding them was quantized before (ONNX Runtime's quantize_dynamic writes
# DynamicQuantizeLinear + ConvInteger/MatMulInteger, quantize_static QDQ pairs or QLinear ops).
QUANTIZED_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "ConvInteger",
        "MatMulInteger",
        "QLinearConv",
        "QLinearMatMul",
        "QGemm",
        "QAttention",
        "DynamicQuantizeLSTM",
        "DynamicQuantizeMatMul",
        "MatMulNBits",
        "MatMulIntegerToFloat",
    }
)


def already_quantized_note(model: ir.Model) -> str | None:
    """A warning when the float model given is partly quantized already: lowbit quantizes what is still float, and
    the result carries two rounds of rounding where one would do."""
    counts: dict[str, int] = {}
    for n in ir.traversal.RecursiveGraphIterator(model.graph):
        if n.op_type in QUANTIZED_OPS or n.op_type.startswith("QLinear"):
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    if not counts:
        return None
    found = ", ".join(f"{op} x{k}" for op, k in sorted(counts.items(), key=lambda x: (-x[1], x[0]))[:3])
    return (
        f"the model is already quantized in part ({found}): lowbit quantized only what was still float; "
        "start from the float model for one rounding, with every layer's range calibrated"
    )
