"""An int8 Clip to any bounds (issue 12: MiniLM's mean pooling clamps its token count at 1e-9 and exported only
with --allow-float-fallback). It runs as MAXIMUM / MINIMUM on int8 constants, after a QUANTIZE when the output's
parameters differ, and must give ONNX Runtime's DQ -> Clip -> Q integers exactly."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lowbit.export.tflite import convert
from test_tflite import run_ort, run_tflite


def _clip_model(lo: float | None, hi: float | None, s_in: float, s_out: float, z_out: int) -> onnx.ModelProto:
    """x -> Q/DQ (s_in, 0) -> Clip(lo, hi) -> Q/DQ (s_out, z_out) -> y."""
    inits = [
        numpy_helper.from_array(np.array(s_in, np.float32), "si"),
        numpy_helper.from_array(np.array(0, np.int8), "zi"),
        numpy_helper.from_array(np.array(s_out, np.float32), "so"),
        numpy_helper.from_array(np.array(z_out, np.int8), "zo"),
    ]
    bounds = []
    for name, v in (("lo", lo), ("hi", hi)):
        if v is not None:
            inits.append(numpy_helper.from_array(np.array(v, np.float32), name))
        bounds.append(name if v is not None else "")
    while bounds and not bounds[-1]:
        bounds.pop()
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "si", "zi"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "si", "zi"], ["xd"]),
        helper.make_node("Clip", ["xd", *bounds], ["c"], name="clip"),
        helper.make_node("QuantizeLinear", ["c", "so", "zo"], ["cq"]),
        helper.make_node("DequantizeLinear", ["cq", "so", "zo"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "t",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 512])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 512])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize(
    "lo, hi, s_out, z_out",
    [
        (1e-9, None, 0.02, 0),  # mean pooling's floor under a divisor: same parameters in and out
        (-0.37, 0.81, 0.02, 0),  # two arbitrary bounds, off the int8 grid
        (0.25, 1.9, 0.013, -20),  # the output has its own scale and zero point: requantize first
        (-5.0, 5.0, 0.02, 0),  # bounds outside the int8 range: nothing left to clip
    ],
)
def test_int8_clip_matches_onnx_runtime_exactly(lo, hi, s_out, z_out):
    model = _clip_model(lo, hi, 0.02, s_out, z_out)
    result = convert(model, io="int8")  # no --allow-float-fallback: it used to refuse this Clip
    assert result.fallbacks == [] and result.float_nodes == []
    # a rescale to the output's parameters is DEQUANTIZE -> QUANTIZE (float32, as ONNX Runtime rescales)
    assert result.ops.get("DEQUANTIZE", 0) == (s_out != 0.02)
    x = np.linspace(-3.0, 3.0, 512, dtype=np.float32)[None]  # covers both bounds and int8 saturation
    got = run_tflite(result.data, x, dequantize=True)
    want = run_ort(model, x)
    assert want.min() < want.max() and np.isclose(want.min(), max(lo, -128 * s_out), atol=s_out)  # clips for real
    # with an int8 -> int8 QUANTIZE, 6 of these 512 values were one step off (LiteRT's fixed-point rescale)
    np.testing.assert_array_equal(got, want)


def test_relu_fused_into_an_unnamed_conv_is_kept():
    """An unnamed node's fused activation was looked up under its renamed output and dropped (found exporting an
    If branch, whose nodes exporters leave unnamed)."""
    w = np.random.default_rng(1).normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])]
    graph = helper.make_graph(
        nodes,
        "t",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    result = convert(model)
    assert result.ops == {"CONV_2D": 1}
    x = np.random.default_rng(2).normal(0, 1, (1, 3, 8, 8)).astype(np.float32)
    y = run_tflite(result.data, x).transpose(0, 3, 1, 2)
    assert y.min() == 0.0
    np.testing.assert_allclose(y, run_ort(model, x), rtol=1e-5, atol=1e-5)
