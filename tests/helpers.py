"""Small builders for tiny ONNX models and checks shared by the op and pass tests."""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import lowbit
from lowbit.runtimes.ort import session

OPSET = 17
FLOAT = TensorProto.FLOAT


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def weight(shape: Iterable[int], seed: int = 0, scale: float = 0.5) -> np.ndarray:
    return (rng(seed).standard_normal(tuple(shape)) * scale).astype(np.float32)


def node(
    op: str, inputs: list[str], outputs: list[str], name: str | None = None, domain: str = "", **attrs: Any
) -> onnx.NodeProto:
    return helper.make_node(op, inputs, outputs, name=name or f"{op}_{outputs[0]}", domain=domain, **attrs)


def model(
    nodes: list[onnx.NodeProto],
    inputs: dict[str, tuple],
    outputs: dict[str, tuple | None],
    inits: dict[str, np.ndarray] | None = None,
    opset: int = OPSET,
    int_outputs: tuple[str, ...] = (),
) -> onnx.ModelProto:
    """A checked float model; inputs/outputs map names to shapes (None shape: unknown; int_outputs are int64)."""
    g = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info(n, FLOAT, s) for n, s in inputs.items()],
        [
            helper.make_tensor_value_info(n, TensorProto.INT64 if n in int_outputs else FLOAT, s)
            for n, s in outputs.items()
        ],
        [numpy_helper.from_array(np.asarray(a), n) for n, a in (inits or {}).items()],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    if any(s is None for s in outputs.values()):  # fill unknown output shapes from shape inference
        inferred = onnx.shape_inference.infer_shapes(m, strict_mode=True)
        known = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
        for o in m.graph.output:
            if outputs[o.name] is None and known[o.name].type.tensor_type.HasField("shape"):
                o.type.CopyFrom(known[o.name].type)
    onnx.checker.check_model(m)
    return m


def const_node(name: str, array: np.ndarray) -> onnx.NodeProto:
    """A Constant node producing `name` (a weight stored in the graph rather than as an initializer)."""
    return helper.make_node(
        "Constant", [], [name], name=f"const_{name}", value=numpy_helper.from_array(np.asarray(array), name)
    )


def samples(
    m: onnx.ModelProto, n: int = 16, seed: int = 1, low: float = -1.0, high: float = 1.0
) -> list[dict[str, np.ndarray]]:
    """`n` random feeds (batch 1) for every graph input."""
    r = rng(seed)
    out = []
    for _ in range(n):
        feed = {}
        for i in m.graph.input:
            shape = [d.dim_value for d in i.type.tensor_type.shape.dim]
            feed[i.name] = r.uniform(low, high, size=shape).astype(np.float32)
        out.append(feed)
    return out


def quantize(m: onnx.ModelProto, recipe: lowbit.Recipe | None = None, **kw: Any) -> lowbit.QuantizeResult:
    return lowbit.quantize(m, calib=samples(m, **kw), recipe=recipe, progress=False)


def run(
    m: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], mode: str = "simulate", float_model: bool = False
) -> list[np.ndarray]:
    """Every output of `m`, concatenated over `feeds`."""
    if float_model:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    else:
        sess = session(m, mode=mode)  # type: ignore[arg-type]
    res = [sess.run(None, f) for f in feeds]
    return [np.concatenate([r[k] for r in res]) for k in range(len(res[0]))]


def rel_rms(ref: np.ndarray, got: np.ndarray) -> float:
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    return float(np.sqrt(np.mean((ref - got) ** 2)) / (np.sqrt(np.mean(ref**2)) + 1e-12))


def optimized(m: onnx.ModelProto) -> onnx.ModelProto:
    """The graph ONNX Runtime runs after its default (all) optimizations on CPU."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "opt.onnx")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.optimized_model_filepath = path
        opts.log_severity_level = 3
        ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return onnx.load(path)


def op_counts(m: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in m.graph.node)


def nodes_of(m: onnx.ModelProto, op: str) -> list[onnx.NodeProto]:
    return [n for n in m.graph.node if n.op_type == op]


def producer(m: onnx.ModelProto, tensor: str) -> onnx.NodeProto | None:
    for n in m.graph.node:
        if tensor in n.output:
            return n
    return None


def consumers(m: onnx.ModelProto, tensor: str) -> list[onnx.NodeProto]:
    return [n for n in m.graph.node if tensor in n.input]


def init(m: onnx.ModelProto, name: str) -> np.ndarray:
    for t in m.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    raise KeyError(name)


def attr(n: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in n.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def dq_source(m: onnx.ModelProto, tensor: str) -> onnx.NodeProto:
    """The DequantizeLinear producing `tensor` (asserting there is one)."""
    p = producer(m, tensor)
    assert p is not None and p.op_type == "DequantizeLinear", f"{tensor} is produced by {p and p.op_type}"
    return p


def input_scale(m: onnx.ModelProto, n: onnx.NodeProto, i: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero point) of the DequantizeLinear feeding input i of node n."""
    dq = dq_source(m, n.input[i])
    return init(m, dq.input[1]), init(m, dq.input[2]) if len(dq.input) > 2 else np.zeros((), np.int32)


def output_qparams(m: onnx.ModelProto, n: onnx.NodeProto, i: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero point) of the QuantizeLinear reading output i of node n."""
    qs = [c for c in consumers(m, n.output[i]) if c.op_type == "QuantizeLinear"]
    assert len(qs) == 1, f"output {n.output[i]} of {n.name} has {len(qs)} QuantizeLinear readers"
    return init(m, qs[0].input[1]), init(m, qs[0].input[2])
