"""A ReduceMean over every spatial axis (PyTorch's dynamo exporter's AdaptiveAvgPool2d) becomes GlobalAveragePool."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper
from onnx import helper as h

import lowbit
from lowbit.passes import prepare


def _model(axes: list[int], keepdims: int, opset: int, rank: int = 4) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    spatial = [6] * (rank - 2)
    w = numpy_helper.from_array(rng.normal(size=(8, 3, *([3] * (rank - 2)))).astype(np.float32), "w")
    nodes = [h.make_node("Conv", ["x", "w"], ["c"], name="conv"), h.make_node("Relu", ["c"], ["r"], name="relu")]
    inits = [w]
    if opset >= 18:
        inits.append(numpy_helper.from_array(np.array(axes, np.int64), "axes"))
        nodes.append(h.make_node("ReduceMean", ["r", "axes"], ["m"], keepdims=keepdims, name="mean"))
    else:
        nodes.append(h.make_node("ReduceMean", ["r"], ["m"], axes=axes, keepdims=keepdims, name="mean"))
    nodes.append(h.make_node("Relu", ["m"], ["y"], name="after"))
    out = [1, 8] + ([1] * (rank - 2) if keepdims else [])
    g = h.make_graph(
        nodes,
        "g",
        [h.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, *[s + 2 for s in spatial]])],
        [h.make_tensor_value_info("y", TensorProto.FLOAT, out)],
        inits,
    )
    return h.make_model(g, opset_imports=[h.make_opsetid("", opset)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize(
    ("axes", "keepdims", "opset", "rank"),
    [([-1, -2], 1, 18, 4), ([2, 3], 0, 13, 4), ([3, 2], 1, 11, 4), ([2], 0, 18, 3), ([-1], 1, 17, 3)],
)
def test_spatial_mean_becomes_global_pool(axes: list[int], keepdims: int, opset: int, rank: int) -> None:
    m = _model(axes, keepdims, opset, rank)
    x = np.random.default_rng(1).normal(size=tuple(d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim))
    x = x.astype(np.float32)
    ref = _run(m, x)
    model = ir.serde.deserialize_model(m)
    prepare(model)
    ops = [n.op_type for n in model.graph]
    assert "ReduceMean" not in ops and "GlobalAveragePool" in ops
    proto = ir.serde.serialize_model(model)
    np.testing.assert_allclose(_run(proto, x), ref, rtol=1e-5, atol=1e-6)
    assert any(n.output[0] == "m" for n in proto.graph.node), "the mean keeps its tensor name"


@pytest.mark.parametrize(("axes", "rank"), [([1, 2, 3], 4), ([1], 3), ([2], 4)])
def test_other_means_stay(axes: list[int], rank: int) -> None:
    m = _model(axes, 1, 18, rank)
    model = ir.serde.deserialize_model(m)
    prepare(model)
    assert "ReduceMean" in [n.op_type for n in model.graph]


def test_quantized_head_pool_is_integer() -> None:
    """Quantized, the pool is a QLinearGlobalAveragePool in ONNX Runtime, not a float island."""
    m = _model([-1, -2], 1, 18)
    calib = [{"x": np.random.default_rng(i).normal(size=(1, 3, 8, 8)).astype(np.float32)} for i in range(8)]
    res = lowbit.quantize(m, calib=calib, progress=False)
    assert res.plan.nodes["mean"].quantized
    assert [f for f in lowbit.lint(res.model, plan=res.plan) if "mean" in str(f)] == []
