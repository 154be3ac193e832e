"""What the performance lint reads in a graph: ORT's optimized graph, the float ops left between Q/DQ in it,
and the original QDQ node each comes from."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort

from ..errors import LowbitError
from ..graph.index import GraphIndex
from ..ops import registered
from ..plan import Plan
from ..runtimes import ort as ort_runtime

# Ops ORT runs on integers (or that convert between int and float): they end a float region.
INTEGER = {
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "ConvInteger",
    "MatMulInteger",
    "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul",
    "QGemm",
    "QAttention",
    "QEmbedLayerNormalization",
}
# Data movement: cheap in float and run on int8 by ORT when its Q/DQ neighbours allow; never reported,
# but float regions are followed through them.
MOVEMENT = {
    "Transpose",
    "Reshape",
    "Flatten",
    "Squeeze",
    "Unsqueeze",
    "Identity",
    "Slice",
    "Split",
    "Concat",
    "Gather",
    "GatherElements",
    "Expand",
    "Tile",
    "Pad",
    "DepthToSpace",
    "SpaceToDepth",
    "MaxPool",
    "Resize",
    "ReorderInput",
    "ReorderOutput",
    "Cast",
}
# Shape arithmetic: integer outputs, nothing to run on int8.
SHAPE = {"Shape", "Size", "ConstantOfShape", "Range", "NonZero", "Constant"}
# Ops ORT fuses into integer kernels when they sit in QDQ form (QLinearConv, QGemm, QLinearAdd, ...).
FUSIBLE = {
    "Conv",
    "MatMul",
    "Gemm",
    "Add",
    "Mul",
    "AveragePool",
    "GlobalAveragePool",
    "Sigmoid",
    "LeakyRelu",
    "Softmax",
}
# Ops other quantizers (ORT's) put in QDQ form that lowbit does not.
OTHER_QUANTIZED = {
    "BatchNormalization",
    "InstanceNormalization",
    "LayerNormalization",
    "CumSum",
    "TopK",
    "Where",
    "ArgMax",
}
WEIGHTED = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
# ORT's integer GEMM-based kernels and the input index of the activation's zero point.
INT_GEMM_ZP = {"QLinearConv": 2, "QGemm": 2, "QLinearMatMul": 2}


def is_integer(n: onnx.NodeProto) -> bool:
    return n.op_type in INTEGER or n.op_type.startswith("QLinear")


def is_float_compute(n: onnx.NodeProto) -> bool:
    return not (is_integer(n) or n.op_type in MOVEMENT or n.op_type in SHAPE)


def optimized(model: onnx.ModelProto | str | Path) -> onnx.ModelProto:
    """The graph ORT runs on the CPU after its default optimizations."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "optimized.onnx")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.optimized_model_filepath = out
        opts.log_severity_level = 3
        try:
            if isinstance(model, onnx.ModelProto):
                ort_runtime.from_proto(model, opts)  # a large model by a temporary file: no serialized copy
            else:
                ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own exception types for models it cannot load
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise LowbitError(f"ONNX Runtime cannot load the model to lint it: {first}") from None
        # ORT's dump, not user input: no loader checks; only its graph is read (its external data may refer to
        # the folder of the model it was made from)
        return onnx.load(out, load_external_data=False)


def island_nodes(opt: GraphIndex) -> list[int]:
    """Float compute ops of the optimized graph fed (through float ops/data movement) by a DequantizeLinear
    and feeding a QuantizeLinear: ORT converts int8 -> float -> int8 around them on every run."""
    passable = {i for i, n in enumerate(opt.nodes) if is_float_compute(n) or n.op_type in MOVEMENT}
    down: set[int] = set()
    stack = [o for n in opt.nodes if n.op_type == "DequantizeLinear" for o in n.output]
    while stack:
        for c in opt.consumers.get(stack.pop(), []):
            if c in passable and c not in down:
                down.add(c)
                stack.extend(opt.nodes[c].output)
    up: set[int] = set()
    stack = [n.input[0] for n in opt.nodes if n.op_type == "QuantizeLinear"]
    while stack:
        p = opt.producer.get(stack.pop())
        if p is not None and p in passable and p not in up:
            up.add(p)
            stack.extend(t for t in opt.nodes[p].input if t)
    return sorted(i for i in down & up if is_float_compute(opt.nodes[i]))


def by_name(n: onnx.NodeProto, names: dict[str, int]) -> int | None:
    for cand in (n.name, re.sub(r"(_token_\d+)+$", "", n.name), n.name.split("/")[0]):
        if cand and cand in names:
            return names[cand]
    return None


def origin_node(j: int, opt: GraphIndex, orig: GraphIndex, names: dict[str, int], depth: int = 0) -> int | None:
    """The original node optimized-graph node j comes from: same name, ORT's suffixed name, the node that made
    the same output tensor, or (for nodes ORT made when inlining a function such as HardSwish) the original
    producer of what its first named reader reads."""
    n = opt.nodes[j]
    i = by_name(n, names)
    if i is not None:
        return i
    for o in n.output:
        if o in orig.producer:
            return orig.producer[o]
    for o in n.output:
        for c in opt.consumers.get(o, []):
            oc = by_name(opt.nodes[c], names)
            if oc is not None:
                k = list(opt.nodes[c].input).index(o)
                if k < len(orig.nodes[oc].input) and orig.nodes[oc].input[k] in orig.producer:
                    return orig.producer[orig.nodes[oc].input[k]]
            elif depth < 8 and is_float_compute(opt.nodes[c]):
                found = origin_node(c, opt, orig, names, depth + 1)
                if found is not None:
                    return found
    return None


def qdq_form(orig: GraphIndex, i: int) -> bool:
    """All computed inputs come from DequantizeLinear (weights too) and every reader of the output is a
    QuantizeLinear (or a Relu/Clip in front of one)."""
    n = orig.nodes[i]
    computed = [t for t in n.input if t and t in orig.producer]
    if not computed or any(orig.op_of(t) != "DequantizeLinear" for t in computed):
        return False
    if n.op_type in WEIGHTED and (len(n.input) < 2 or orig.op_of(n.input[1]) != "DequantizeLinear"):
        return False

    def to_quantize(j: int) -> bool:
        return orig.nodes[j].op_type == "QuantizeLinear"

    readers = orig.readers(i)
    return bool(readers) and all(
        to_quantize(r) or (orig.nodes[r].op_type in ("Relu", "Clip") and all(map(to_quantize, orig.readers(r))))
        for r in readers
    )


def meant_quantized(orig: GraphIndex, i: int, plan: Plan | None) -> bool:
    n = orig.nodes[i]
    if plan is not None and n.name in plan.nodes:
        return plan.nodes[n.name].quantized and qdq_form(orig, i)
    # Without a plan, Q/DQ around an op no quantizer handles (Sin, Erf, ...) belong to its neighbours.
    return qdq_form(orig, i) and (n.op_type in registered("static") or n.op_type in OTHER_QUANTIZED)


def zero_point_type(g: GraphIndex, dq_output: str) -> int | None:
    p = g.producer.get(dq_output)
    if p is None or len(g.nodes[p].input) < 3:
        return None
    zp = g.inits.get(g.nodes[p].input[2])
    return zp.data_type if zp is not None else None


def dynamic_convs(orig: GraphIndex) -> list[int]:
    out = []
    for i, n in enumerate(orig.nodes):
        if n.op_type == "ConvInteger":
            out.append(i)
        elif n.op_type == "Conv" and n.input:
            t, seen = n.input[0], 0
            while t in orig.producer and seen < 50:  # through DQ and data movement to a DynamicQuantizeLinear
                p = orig.nodes[orig.producer[t]]
                if p.op_type == "DynamicQuantizeLinear":
                    out.append(i)
                    break
                if p.op_type != "DequantizeLinear" and p.op_type not in MOVEMENT:
                    break
                t, seen = p.input[0], seen + 1
    return out


FOUR_BIT = (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)


def four_bit_weight(g: GraphIndex, i: int) -> str | None:
    """The 4-bit initializer behind node i's weight DequantizeLinear, if any."""
    n = g.nodes[i]
    if n.op_type not in WEIGHTED or len(n.input) < 2 or g.op_of(n.input[1]) != "DequantizeLinear":
        return None
    w = g.inits.get(g.nodes[g.producer[n.input[1]]].input[0])
    return w.name if w is not None and w.data_type in FOUR_BIT else None
