"""PRelu (face detectors such as MTCNN, many Keras exports): lowbit keeps it float, and the TFLite export runs it as
PRELU between DEQUANTIZE and QUANTIZE, as the QDQ model computes it (it used to refuse the model)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import lowbit
from lowbit.export.tflite import convert
from test_tflite import run_ort, run_tflite


def _conv_prelu_conv() -> onnx.ModelProto:
    r = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(r.normal(0, 0.4, (8, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(r.uniform(0.05, 0.4, (8, 1, 1)).astype(np.float32), "slope"),
        numpy_helper.from_array(r.normal(0, 0.3, (4, 8, 3, 3)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("PRelu", ["c1", "slope"], ["p"], name="prelu"),
        helper.make_node("Conv", ["p", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "prelu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 10, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 10, 10])],
        inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_prelu_exports_and_gives_the_int8_onnx_integers():
    r = np.random.default_rng(1)
    calib = [{"x": r.normal(size=(1, 3, 10, 10)).astype(np.float32)} for _ in range(8)]
    q = lowbit.quantize(_conv_prelu_conv(), calib=calib, progress=False).model
    res = convert(q)
    assert res.ops.get("PRELU") == 1 and res.quantized
    for _ in range(4):
        x = r.normal(size=(1, 3, 10, 10)).astype(np.float32)
        want = run_ort(q, x)
        got = run_tflite(res.data, x, dequantize=True).transpose(0, 3, 1, 2)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)  # the same integers, dequantized alike
