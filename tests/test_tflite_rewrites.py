"""TFLite export of forms with no one-op TFLite equivalent (issue 12): each small float graph is quantized by lowbit,
exported with no float fallback, and run in LiteRT against ONNX Runtime on the int8 ONNX (and float vs float)."""

from __future__ import annotations

import ai_edge_litert.interpreter as litert
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lowbit
from lowbit.export.tflite import convert
from lowbit.runtimes.ort import session
from test_tflite import run_ort, run_tflite
from test_tflite_int8 import _tflite_int


def _model(nodes, inits, x_shape, y_shape) -> onnx.ModelProto:
    x_shape, y_shape = ["N", *x_shape[1:]], ["N", *y_shape[1:]]  # any batch, as exported models
    graph = helper.make_graph(
        nodes,
        "t",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _w(name: str, shape, seed: int, scale: float = 0.4):
    return numpy_helper.from_array(np.random.default_rng(seed).normal(0, scale, shape).astype(np.float32), name)


def _conv(x: str, y: str, name: str, **attrs):
    return helper.make_node("Conv", [x, f"{name}_w"], [y], name=name, **attrs)


def _bn(c: int) -> list:
    r = np.random.default_rng(9)
    return [
        numpy_helper.from_array(r.uniform(0.5, 2, c).astype(np.float32), "gamma"),
        numpy_helper.from_array(r.normal(0, 0.3, c).astype(np.float32), "beta"),
        numpy_helper.from_array(r.normal(0, 0.3, c).astype(np.float32), "mean"),
        numpy_helper.from_array(r.uniform(0.5, 2, c).astype(np.float32), "var"),
    ]


def build(case: str) -> onnx.ModelProto:
    w44 = [_w("c1_w", (4, 4, 1, 1), 1)]
    c1 = _conv("x", "c", "c1")
    if case == "se_hardsigmoid":  # MobileNetV3's squeeze-excite gate: HardSigmoid, GlobalAveragePool, Mul
        nodes = [
            c1,
            helper.make_node("HardSigmoid", ["c"], ["h"], alpha=1 / 6, beta=0.5, name="hsig"),
            helper.make_node("GlobalAveragePool", ["h"], ["p"], name="gap"),
            helper.make_node("Mul", ["c", "p"], ["y"], name="gate"),
        ]
        return _model(nodes, w44, [1, 4, 8, 8], [1, 4, 8, 8])
    if case == "hardsigmoid_alpha":  # ONNX's default alpha 0.2 (tf2onnx exports of Keras' hard_sigmoid)
        nodes = [c1, helper.make_node("HardSigmoid", ["c"], ["y"], name="hsig")]
        return _model(nodes, w44, [1, 4, 8, 8], [1, 4, 8, 8])
    if case == "hardswish_decomposed":  # x * HardSigmoid(x)
        nodes = [
            c1,
            helper.make_node("HardSigmoid", ["c"], ["h"], alpha=1 / 6, beta=0.5, name="hsig"),
            helper.make_node("Mul", ["c", "h"], ["y"], name="mul"),
        ]
        return _model(nodes, w44, [1, 4, 8, 8], [1, 4, 8, 8])
    if case in ("sigmoid", "tanh"):
        nodes = [c1, helper.make_node(case.title(), ["c"], ["y"], name=case)]
        return _model(nodes, w44, [1, 4, 8, 8], [1, 4, 8, 8])
    if case == "softmax":
        inits = [_w("fc_w", (16, 10), 2)]
        nodes = [helper.make_node("MatMul", ["x", "fc_w"], ["m"], name="fc"), helper.make_node("Softmax", ["m"], ["y"])]
        return _model(nodes, inits, [1, 16], [1, 10])
    if case == "concat":  # a skip joined to a conv's output: two ranges, one output
        nodes = [c1, helper.make_node("Concat", ["x", "c"], ["y"], axis=1, name="cat")]
        return _model(nodes, w44, [1, 4, 8, 8], [1, 8, 8, 8])
    if case == "batchnorm_after_relu":  # BatchNorm that no conv absorbs (the next one pads), then a conv
        nodes = [
            c1,
            helper.make_node("Relu", ["c"], ["r"], name="relu"),
            helper.make_node("BatchNormalization", ["r", "gamma", "beta", "mean", "var"], ["b"], name="bn"),
            _conv("b", "y", "c2", pads=[1, 1, 1, 1]),
        ]
        return _model(nodes, w44 + _bn(4) + [_w("c2_w", (4, 4, 3, 3), 3)], [1, 4, 8, 8], [1, 4, 8, 8])
    if case == "conv1d":  # an audio front end: strided 1-D conv, ReLU, BatchNorm1d (unfused), 1-D conv
        nodes = [
            helper.make_node("Conv", ["x", "a_w", "a_b"], ["a"], pads=[2, 2], strides=[2], name="a"),
            helper.make_node("Relu", ["a"], ["r"], name="relu"),
            helper.make_node("BatchNormalization", ["r", "gamma", "beta", "mean", "var"], ["b"], name="bn"),
            helper.make_node("Conv", ["b", "b_w"], ["y"], pads=[1, 1], dilations=[1], name="b"),
        ]
        inits = [_w("a_w", (6, 3, 5), 4), _w("a_b", (6,), 5, 0.1), _w("b_w", (4, 6, 3), 6)]
        return _model(nodes, inits + _bn(6), [1, 3, 32], [1, 4, 16])
    if case == "conv_transpose1d":
        nodes = [
            helper.make_node("Conv", ["x", "a_w"], ["a"], pads=[1, 1], name="a"),
            helper.make_node("ConvTranspose", ["a", "t_w"], ["y"], strides=[2], pads=[1, 1], name="up"),
        ]
        return _model(nodes, [_w("a_w", (6, 3, 3), 4), _w("t_w", (6, 4, 4), 7)], [1, 3, 16], [1, 4, 32])
    raise KeyError(case)


CASES = {  # case -> (TFLite ops it must contain, ops it must not)
    "se_hardsigmoid": ({"MUL", "ADD"}, set()),  # int8: the average is an int32 sum (test_tflite_mean_rounding.py)
    "hardsigmoid_alpha": ({"MUL", "ADD"}, set()),
    "hardswish_decomposed": ({"HARD_SWISH"}, {"MUL"}),
    "sigmoid": ({"LOGISTIC"}, set()),
    "tanh": ({"TANH"}, set()),
    "softmax": ({"SOFTMAX"}, set()),
    "concat": ({"CONCATENATION"}, set()),
    "batchnorm_after_relu": ({"DEPTHWISE_CONV_2D"}, set()),
    "conv1d": ({"CONV_2D", "DEPTHWISE_CONV_2D"}, set()),
    "conv_transpose1d": ({"CONV_2D", "TRANSPOSE_CONV"}, set()),
}


HARD_GATES = {"se_hardsigmoid", "hardsigmoid_alpha", "hardswish_decomposed"}


def _inputs(model: onnx.ModelProto, seed: int, n: int) -> np.ndarray:
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return np.random.default_rng(seed).normal(0, 1, [n, *shape[1:]]).astype(np.float32)


def _nchw(y: np.ndarray) -> np.ndarray:
    return y.transpose(0, 3, 1, 2) if y.ndim == 4 else y


@pytest.mark.parametrize("case", sorted(CASES))
def test_float_export_matches_ort(case):
    model = build(case)
    result = convert(model)
    must, never = CASES[case]
    assert must <= set(result.ops) and not never & set(result.ops), result.ops
    x = _inputs(model, 1, 1)
    np.testing.assert_allclose(_nchw(run_tflite(result.data, x)), run_ort(model, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_int8_export_has_no_float_fallback_and_agrees_with_the_int8_onnx(case):
    model = build(case)
    qmodel = lowbit.quantize(model, calib=[_inputs(model, 0, 32)], progress=False).model
    result = convert(qmodel, io="int8")
    must, never = CASES[case]
    assert result.quantized and not result.fallbacks and not result.float_nodes, result.to_dict()
    assert must <= set(result.ops) and not never & set(result.ops), result.ops
    # hard gates run as DEQUANTIZE -> float -> QUANTIZE (as ONNX Runtime runs the QDQ model), and so does a rescale
    # between two int8 parameter sets (LiteRT's int8 -> int8 QUANTIZE rounds apart); nothing else leaves int8
    assert result.ops.get("DEQUANTIZE", 0) == result.ops.get("QUANTIZE", 0)
    assert (result.ops.get("DEQUANTIZE", 0) > 0) >= (case in HARD_GATES)
    x = _inputs(model, 2, 8)
    y_tfl, s, z = _tflite_int(result.data, x)
    s_in, z_in = litert.Interpreter(model_content=result.data).get_input_details()[0]["quantization"]
    xq = ((np.clip(np.round(x / s_in) + z_in, -128, 127) - z_in) * s_in).astype(np.float32)
    q_ort = np.clip(np.round(session(qmodel, "kernels").run(None, {"x": xq})[0] / s) + z, -128, 127)
    diff = np.abs(q_ort - y_tfl.astype(np.int64))
    # measured: at most 1 step; exact where no requantize sits between (the rest: a second rounding)
    assert diff.max() <= (0 if case in HARD_GATES else 1), f"{case}: {int(diff.max())} steps"
