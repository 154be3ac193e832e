"""Models that compute in float16 (mixed-precision Keras exports, models halved for GPUs) are quantized as their
float32 twin: inputs and outputs keep their float16 type, every Conv is int8 (before, each read as "integer" and
nothing was quantized)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import lowbit


def half_model() -> onnx.ModelProto:
    """x float16 [N, 3, 12, 12] -> Conv -> Relu -> Conv -> y float16 (weights float16)."""
    r = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(r.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float16), "w1"),
        numpy_helper.from_array(r.normal(0, 0.1, 8).astype(np.float16), "b1"),
        numpy_helper.from_array(r.normal(0, 0.3, (4, 8, 3, 3)).astype(np.float16), "w2"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "half",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", 3, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["N", 4, 12, 12])],
        inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def test_a_float16_model_is_quantized_as_its_float32_twin():
    m = half_model()
    r = np.random.default_rng(1)
    calib = [{"x": r.uniform(-1, 1, (4, 3, 12, 12)).astype(np.float16)} for _ in range(4)]
    res = lowbit.quantize(m, calib=calib, progress=False)
    assert res.plan.nodes["conv1"].quantized and res.plan.nodes["conv2"].quantized
    assert res.model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert res.model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    x = {"x": r.uniform(-1, 1, (8, 3, 12, 12)).astype(np.float16)}
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    got = ort.InferenceSession(res.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    assert got.dtype == np.float16
    err = np.sqrt(np.mean((got.astype(np.float32) - want.astype(np.float32)) ** 2)) / np.std(want.astype(np.float32))
    assert err < 0.05, err


def test_preparing_a_widened_model_again_changes_nothing():
    """diagnose quantizes models `prepare` already widened: the float16 Casts at the outputs are the boundary."""
    import onnx_ir as ir

    from lowbit.passes import prepare

    once = prepare(ir.from_proto(half_model()))
    before = ir.to_proto(once).SerializeToString()
    twice = prepare(once)
    assert ir.to_proto(twice).SerializeToString() == before
