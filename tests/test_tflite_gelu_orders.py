"""Exporters multiply GELU's three factors in different orders; the TFLite export takes each as one GELU.

PyTorch's TorchScript exporter writes `((1 + erf(x / sqrt 2)) * x) * 0.5`, its dynamo exporter
`x * ((1 + erf(x / sqrt 2)) * 0.5)`, and BERT-style code `(x * 0.5) * (1 + erf(x / sqrt 2))`. The export matched
the first only and refused the others ("Erf: no TFLite equivalent is exported")."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lowbit
from lowbit.export.tflite import convert
from test_tflite import run_ort, run_tflite


def _gelu(order: str, x: str, y: str) -> list[onnx.NodeProto]:
    head = [
        helper.make_node("Div", [x, "sqrt2"], ["d"], name="div"),
        helper.make_node("Erf", ["d"], ["e"], name="erf"),
        helper.make_node("Add", ["e", "one"], ["a"], name="add"),
    ]
    if order == "torchscript":
        return [*head, helper.make_node("Mul", ["a", x], ["m"]), helper.make_node("Mul", ["m", "half"], [y])]
    if order == "dynamo":
        return [*head, helper.make_node("Mul", ["half", "a"], ["m"]), helper.make_node("Mul", [x, "m"], [y])]
    return [helper.make_node("Mul", [x, "half"], ["h"]), *head, helper.make_node("Mul", ["h", "a"], [y])]


def _model(order: str) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    f32 = np.float32
    inits = [
        numpy_helper.from_array((rng.standard_normal((16, 32)) * 0.4).astype(f32), "w1"),
        numpy_helper.from_array((rng.standard_normal(32) * 0.1).astype(f32), "b1"),
        numpy_helper.from_array((rng.standard_normal((32, 8)) * 0.3).astype(f32), "w2"),
        numpy_helper.from_array(np.array(np.sqrt(2), f32), "sqrt2"),
        numpy_helper.from_array(np.array(1.0, f32), "one"),
        numpy_helper.from_array(np.array(0.5, f32), "half"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["p"], name="fc1"),
        helper.make_node("Add", ["p", "b1"], ["h1"], name="bias1"),
        *_gelu(order, "h1", "g"),
        helper.make_node("MatMul", ["g", "w2"], ["y"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes,
        "gelu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("order", ["torchscript", "dynamo", "bert"])
def test_each_gelu_order_exports_as_the_int8_onnx_computes(order: str) -> None:
    rng = np.random.default_rng(1)
    calib = [rng.standard_normal((1, 6, 16)).astype(np.float32) for _ in range(16)]
    qmodel = lowbit.quantize(_model(order), calib=calib, progress=False).model
    assert "Erf" in {n.op_type for n in qmodel.graph.node}
    result = convert(qmodel)
    assert "Erf" not in str(result.to_dict()), result.to_dict()
    x = rng.standard_normal((1, 6, 16)).astype(np.float32)
    ref = run_ort(qmodel, x)
    got = run_tflite(result.data, x)
    step = float(np.abs(ref).max()) / 100
    assert np.abs(got - ref).max() <= 2 * step, np.abs(got - ref).max()
    assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.999
