"""Energy ESTIMATE per inference from operation counts and bytes moved (never a measurement).

Per-operation energies are the 45 nm, 0.9 V table of M. Horowitz, "Computing's energy problem (and what we
can do about it)", IEEE ISSCC 2014, pp. 10-14. The absolute numbers belong to that process node; what the
estimate is good for is comparing two versions of one model (float vs int8) under the same simple model:

- compute: Conv/ConvTranspose/Gemm/MatMul/MatMulNBits and LSTM/GRU/RNN count multiply-accumulates from their
  shapes. Their precision is int8 when both operands are DequantizeLinear outputs of 8-bit tensors (8-bit
  mult + 32-bit add), else the float type of the operands (fp32: 32-bit mult + 32-bit add). 4-bit operands
  are priced as 8-bit ones (the table has no 4-bit entry); other integer widths (16-bit quantization, integer
  shape math) are costed as 32-bit integer ops. Shapes ONNX inference cannot see (com.microsoft ops) come
  from one ONNX Runtime run on zeros. Every other compute op costs one add per output
  element at its precision (pools: one add per input element read). Q/DQ pairs cost nothing: integer kernels
  fuse them; requantization inside those kernels is not counted.
- memory: every weight (initializer) is read once from DRAM; every activation is written once by its producer
  and read once by its consumers through a 1 MB on-chip SRAM (a quantized activation counts at its quantized
  width). Caches, reuse and tiling are not modelled.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

# Horowitz ISSCC 2014, 45 nm 0.9 V, picojoules per operation.
PJ_OP = {
    ("int8", "add"): 0.03,
    ("int8", "mult"): 0.2,
    ("int32", "add"): 0.1,
    ("int32", "mult"): 3.1,
    ("fp16", "add"): 0.4,
    ("fp16", "mult"): 1.1,
    ("fp32", "add"): 0.9,
    ("fp32", "mult"): 3.7,
}
# Same source, picojoules per 64-bit access. DRAM is quoted as 1.3-2.6 nJ; 2.0 nJ is used.
PJ_READ_64 = {"sram_8kb": 10.0, "sram_32kb": 20.0, "sram_1mb": 100.0, "dram": 2000.0}

# A MAC is a multiply plus an accumulation; integer products accumulate in 32 bits.
MAC_PJ = {
    "int8": PJ_OP["int8", "mult"] + PJ_OP["int32", "add"],
    "int32": PJ_OP["int32", "mult"] + PJ_OP["int32", "add"],
    "fp16": PJ_OP["fp16", "mult"] + PJ_OP["fp16", "add"],
    "fp32": PJ_OP["fp32", "mult"] + PJ_OP["fp32", "add"],
}

NOTE = (
    "estimate, not a measurement: operation counts by precision x Horowitz ISSCC 2014 45 nm energies; "
    "weights read once from DRAM (2.0 nJ/64 bit), activations written and read once via 1 MB SRAM "
    "(100 pJ/64 bit); no cache reuse, requantization or control overhead; per run of the batch"
)

# MatMulNBits (int4 weight-only) dequantizes its weights and multiplies in float: float MACs, 4-bit weight bytes.
MAC_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "MatMulNBits", "LSTM", "GRU", "RNN"}
INTEGER_MAC_OPS = {"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "DynamicQuantizeLSTM"}
# Recurrent layers: gates per step (each a matrix product with the input and one with the hidden state).
RECURRENT_GATES = {"LSTM": 4, "DynamicQuantizeLSTM": 4, "GRU": 3, "RNN": 1}
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}
# Views: no arithmetic, and ONNX Runtime usually aliases their buffers instead of copying.
VIEW_OPS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Constant", "Shape", "Size"}
WINDOW_POOLS = {"MaxPool", "AveragePool", "LpPool"}
GLOBAL_POOLS = {
    "GlobalAveragePool",
    "GlobalMaxPool",
    "GlobalLpPool",
    "ReduceMean",
    "ReduceSum",
    "ReduceMax",
    "ReduceMin",
    "ReduceL2",
    "ReduceProd",
}


def with_fixed_dims(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    """Copy of `model`, prepared as ONNX Runtime would run it, dynamic input dims set (first dim -> batch,
    others -> 1) and shapes inferred."""
    m = _prepared(model)
    weights = {t.name for t in m.graph.initializer}
    for inp in m.graph.input:
        if inp.name in weights or not inp.type.tensor_type.HasField("shape"):
            continue
        for i, d in enumerate(inp.type.tensor_type.shape.dim):
            if not (d.HasField("dim_value") and d.dim_value > 0):
                d.Clear()
                d.dim_value = batch if i == 0 else 1
    # Stale value_info from the exporter could carry the old symbolic dims; inference rebuilds them.
    del m.graph.value_info[:]
    m = onnx.shape_inference.infer_shapes(m, data_prop=True)
    return _runtime_shapes(m) if _unknown_outputs(m) else m


def _unknown_outputs(m: onnx.ModelProto) -> list[str]:
    known = {name for name, (_, shape) in _tensor_types(m).items() if shape is not None}
    return [o for n in m.graph.node for o in n.output if o and o not in known]


def _runtime_shapes(m: onnx.ModelProto) -> onnx.ModelProto:
    """Fill shapes ONNX inference cannot see (com.microsoft ops: 4/16-bit DequantizeLinear below opset 21,
    MatMulNBits, DynamicQuantizeLSTM) from one ONNX Runtime run on zeros. On failure `m` is returned as is and
    those nodes are reported as not counted."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(m)
    missing = _unknown_outputs(m)
    probe.graph.output.extend(helper.make_empty_tensor_value_info(o) for o in missing)
    try:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor by name
        opts.log_severity_level = 3
        sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        feeds = {}
        for i in sess.get_inputs():
            dtype = helper.tensor_dtype_to_np_dtype(_elem_type(probe, i.name))
            feeds[i.name] = np.zeros([d if isinstance(d, int) else 1 for d in i.shape], dtype)
        values = sess.run(missing, feeds)
    except Exception:  # noqa: BLE001 - an estimate should not fail on a model ORT cannot run on zeros
        return m
    stale = set(missing)
    kept = [v for v in m.graph.value_info if v.name not in stale]  # partial shapes (symbolic or unknown dims)
    del m.graph.value_info[:]
    m.graph.value_info.extend(kept)
    for name, v in zip(missing, values):
        v = np.asarray(v)
        m.graph.value_info.append(
            helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
        )
    return m


def _elem_type(m: onnx.ModelProto, name: str) -> int:
    return next(i.type.tensor_type.elem_type for i in m.graph.input if i.name == name)


def _prepared(model: onnx.ModelProto) -> onnx.ModelProto:
    # Exporters compute e.g. pad sizes with constant subgraphs that shape inference cannot see through, and
    # leave BatchNorms that ONNX Runtime folds into convs: count the graph lowbit's prepare passes make (the
    # one quantization starts from), so float and int8 versions are counted alike.
    import onnx_ir as ir

    from ..passes import prepare

    m = onnx.ModelProto()
    m.CopyFrom(model)  # the ir model shares the proto's buffers and the passes would change the caller's model
    try:
        return ir.to_proto(prepare(ir.from_proto(m)))
    except Exception:  # noqa: BLE001 - an estimate should not fail on a graph the passes cannot handle
        m.CopyFrom(model)
        return m


def _tensor_types(m: onnx.ModelProto) -> dict[str, tuple[int, tuple[int, ...] | None]]:
    """name -> (elem_type, static shape or None)."""
    out: dict[str, tuple[int, tuple[int, ...] | None]] = {}
    for v in list(m.graph.input) + list(m.graph.output) + list(m.graph.value_info):
        tt = v.type.tensor_type
        shape = None
        if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
            shape = tuple(d.dim_value for d in tt.shape.dim)
        out[v.name] = (tt.elem_type, shape)
    for t in m.graph.initializer:
        out[t.name] = (t.data_type, tuple(t.dims))
    return out


def _precision(elem_type: int) -> str:
    if elem_type in (TensorProto.FLOAT16, TensorProto.BFLOAT16):
        return "fp16"
    if elem_type in (TensorProto.FLOAT, TensorProto.DOUBLE):
        return "fp32"
    # No 4-bit entry in Horowitz's table: 4-bit operands are priced as 8-bit ones (an upper bound for compute;
    # their storage is counted at 4 bits, see _initializer_bytes).
    if elem_type in (TensorProto.INT8, TensorProto.UINT8, TensorProto.BOOL, TensorProto.INT4, TensorProto.UINT4):
        return "int8"
    return "int32"


def _itemsize(elem_type: int) -> int:
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return 4


def count_ops(model: onnx.ModelProto, batch: int = 1) -> dict[str, Any]:
    """Operation and byte counts of one run: macs/adds by precision, weight and activation bytes."""
    m = with_fixed_dims(model, batch)
    g = m.graph
    types = _tensor_types(m)
    weights = {t.name for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}

    # Collapse X -> Q -> X_q -> DQ -> X_dq into one logical tensor X stored at X_q's width.
    alias: dict[str, str] = {}
    stored: dict[str, int] = {}  # logical tensor -> bytes per element
    for n in g.node:
        if n.op_type == "QuantizeLinear" and n.input[0] not in weights:
            alias[n.output[0]] = n.input[0]
            stored[n.input[0]] = _itemsize(types.get(n.output[0], (TensorProto.UINT8, None))[0])
    for n in g.node:
        if n.op_type == "DequantizeLinear" and n.input[0] not in weights:
            alias[n.output[0]] = alias.get(n.input[0], n.input[0])

    def source_precision(name: str) -> str:
        """Precision an operand really has: the quantized width for DequantizeLinear outputs."""
        p = producer.get(name)
        if p is not None and p.op_type == "DequantizeLinear":
            return _precision(types.get(p.input[0], (TensorProto.INT32, None))[0])
        return _precision(types.get(name, (TensorProto.FLOAT, None))[0])

    def combine(precisions: list[str]) -> str:
        order = ["int8", "int32", "fp16", "fp32"]
        return max(precisions, key=order.index) if precisions else "fp32"

    def numel(name: str) -> int | None:
        shape = types.get(name, (0, None))[1]
        return math.prod(shape) if shape is not None else None

    macs: dict[str, int] = defaultdict(int)
    adds: dict[str, int] = defaultdict(int)
    uncounted: list[str] = []
    for n in g.node:
        op = n.op_type
        if op in QDQ_OPS or op in VIEW_OPS:
            continue
        if op in MAC_OPS or op in INTEGER_MAC_OPS:
            count = _macs(n, types)
            if count is None:
                uncounted.append(n.name or op)
                continue
            if op in INTEGER_MAC_OPS:
                prec = "int8"
            else:
                prec = combine([source_precision(x) for x in n.input[:2]])
            macs[prec] += count
            bias = n.input[2] if op in ("Conv", "ConvTranspose", "Gemm") and len(n.input) > 2 else ""
            out = numel(n.output[0])
            if bias and out is not None:
                adds["int32" if prec == "int8" else prec] += out
            continue
        ins = [x for x in n.input if x and x not in weights]
        prec = combine([source_precision(x) for x in ins]) if ins else _precision(types.get(n.output[0], (1, None))[0])
        if op in GLOBAL_POOLS or op in WINDOW_POOLS:
            count = numel(n.input[0]) if op in GLOBAL_POOLS else _window_reads(n, types)
        else:
            count = numel(n.output[0])
        if count is None:
            uncounted.append(n.name or op)
            continue
        adds[prec] += count

    weight_bytes = sum(_initializer_bytes(t) for t in g.initializer)
    weight_bytes += sum(
        _initializer_bytes(a.t) for n in g.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"
    )
    act_bytes = _activation_bytes(g, types, weights, alias, stored)
    return {
        "macs": dict(macs),
        "adds": dict(adds),
        "weight_bytes": int(weight_bytes),
        "activation_bytes": int(act_bytes),
        "uncounted": uncounted,
    }


def _macs(n: onnx.NodeProto, types: dict) -> int | None:
    shape = lambda i: types.get(n.input[i], (0, None))[1] if len(n.input) > i and n.input[i] else None  # noqa: E731
    out = types.get(n.output[0], (0, None))[1]
    op = n.op_type
    if op in RECURRENT_GATES:
        return _recurrent_macs(n, types)
    if op in ("QLinearConv", "ConvInteger"):
        w_index = 3 if op == "QLinearConv" else 1
        w = shape(w_index)
        return math.prod(out) * math.prod(w[1:]) if out is not None and w is not None else None
    if op == "QLinearMatMul":
        a = shape(0)
        return math.prod(out) * a[-1] if out is not None and a is not None else None
    if op == "Conv":
        w = shape(1)
        # Each output element sums (C / group) x kernel products.
        return math.prod(out) * math.prod(w[1:]) if out is not None and w is not None else None
    if op == "ConvTranspose":
        x, w = shape(0), shape(1)
        # Each input element is scattered through (M / group) x kernel weights.
        return math.prod(x) * math.prod(w[1:]) if x is not None and w is not None else None
    if op == "Gemm":
        a = shape(0)
        if out is None or a is None:
            return None
        trans_a = next((at.i for at in n.attribute if at.name == "transA"), 0)
        return math.prod(out) * (a[0] if trans_a else a[1])
    # MatMul, MatMulInteger: numpy semantics, the reduced axis is A's last.
    a = shape(0)
    return math.prod(out) * a[-1] if out is not None and a is not None else None


def _recurrent_macs(n: onnx.NodeProto, types: dict) -> int | None:
    """Per step, direction and batch row: gates x hidden x (input + hidden) MACs (X W^T and H R^T)."""
    x = types.get(n.input[0], (0, None))[1]
    w = types.get(n.input[1], (0, None))[1] if len(n.input) > 1 else None
    hidden = next((a.i for a in n.attribute if a.name == "hidden_size"), 0)
    if x is None or w is None or not hidden or len(x) != 3:
        return None
    layout = next((a.i for a in n.attribute if a.name == "layout"), 0)
    steps, batch = (x[1], x[0]) if layout else (x[0], x[1])
    return steps * batch * w[0] * RECURRENT_GATES[n.op_type] * hidden * (x[2] + hidden)


def _window_reads(n: onnx.NodeProto, types: dict) -> int | None:
    out = types.get(n.output[0], (0, None))[1]
    kernel = next((list(a.ints) for a in n.attribute if a.name == "kernel_shape"), None)
    return math.prod(out) * math.prod(kernel) if out is not None and kernel else None


def _initializer_bytes(t: onnx.TensorProto) -> int:
    n = math.prod(t.dims)
    if t.data_type in (TensorProto.INT4, TensorProto.UINT4):
        return (n + 1) // 2
    return n * _itemsize(t.data_type)


def _activation_bytes(g: onnx.GraphProto, types: dict, weights: set[str], alias: dict, stored: dict) -> int:
    written: set[str] = set()
    read: set[str] = set()
    for n in g.node:
        if n.op_type in QDQ_OPS or n.op_type in VIEW_OPS:
            continue
        read.update(alias.get(x, x) for x in n.input if x and x not in weights)
        written.update(alias.get(o, o) for o in n.output if o)
    total = 0
    for name in read | written:
        count = types.get(name, (0, None))[1]
        if count is None:
            continue
        width = stored.get(name, _itemsize(types[name][0]))
        times = (name in read) + (name in written)
        total += math.prod(count) * width * times
    return total


def estimate(model: onnx.ModelProto, batch: int = 1) -> dict[str, Any]:
    """Energy ESTIMATE of one run in microjoules, from `count_ops` and the Horowitz table."""
    c = count_ops(model, batch)
    by_precision: dict[str, dict[str, float]] = {}
    compute_pj = 0.0
    for prec in sorted(set(c["macs"]) | set(c["adds"])):
        mac, add = c["macs"].get(prec, 0), c["adds"].get(prec, 0)
        pj = mac * MAC_PJ[prec] + add * PJ_OP[prec, "add"]
        by_precision[prec] = {"macs": mac, "adds": add, "uj": pj * 1e-6}
        compute_pj += pj
    weights_pj = c["weight_bytes"] / 8 * PJ_READ_64["dram"]
    acts_pj = c["activation_bytes"] / 8 * PJ_READ_64["sram_1mb"]
    memory_pj = weights_pj + acts_pj
    note = NOTE + (f"; {len(c['uncounted'])} nodes with unknown shapes not counted" if c["uncounted"] else "")
    return {
        "total_uj": (compute_pj + memory_pj) * 1e-6,
        "compute_uj": compute_pj * 1e-6,
        "memory_uj": memory_pj * 1e-6,
        "weights_dram_uj": weights_pj * 1e-6,
        "activations_sram_uj": acts_pj * 1e-6,
        "by_precision": by_precision,
        "macs": int(sum(c["macs"].values())),
        "weight_bytes": c["weight_bytes"],
        "activation_bytes": c["activation_bytes"],
        "batch": batch,
        "uncounted": c["uncounted"],
        "note": note,
    }
