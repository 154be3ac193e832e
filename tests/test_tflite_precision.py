"""TFLite float16 and dynamic-range export of float models, in LiteRT against ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import lowbit
from conftest import tiny_cnn
from lowbit.errors import LowbitError
from lowbit.export.tflite import convert, read_metadata
from test_tflite import _model, run_ort, run_tflite

helper = onnx.helper


def _w(shape, seed, scale=0.2) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, scale, shape).astype(np.float32)


def mobile_block() -> onnx.ModelProto:
    """EfficientNet-ish: conv stem, depthwise, squeeze-excite, projection, pooled classifier."""
    c = 48
    inits = {
        "w1": _w((c, 3, 3, 3), 1),
        "b1": _w((c,), 2, 0.1),
        "dw": _w((c, 1, 3, 3), 3),
        "se1": _w((c, 16), 4),
        "se2": _w((16, c), 5),
        "pw": _w((32, c, 1, 1), 6),
        "fc": _w((32, 100), 7),
        "fcb": _w((100,), 8, 0.1),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2], name="stem"),
        helper.make_node("Clip", ["c1", "lo", "hi"], ["r1"], name="relu6"),
        helper.make_node("Conv", ["r1", "dw"], ["d"], pads=[1, 1, 1, 1], group=c, name="dw"),
        helper.make_node("Relu", ["d"], ["rd"], name="relu"),
        helper.make_node("GlobalAveragePool", ["rd"], ["g"], name="se_pool"),
        helper.make_node("Flatten", ["g"], ["gf"], name="se_flat"),
        helper.make_node("MatMul", ["gf", "se1"], ["s1"], name="se_fc1"),
        helper.make_node("Relu", ["s1"], ["s1r"], name="se_relu"),
        helper.make_node("MatMul", ["s1r", "se2"], ["s2"], name="se_fc2"),
        helper.make_node("Sigmoid", ["s2"], ["gate"], name="se_gate"),
        helper.make_node("Unsqueeze", ["gate", "axes"], ["gate4"], name="se_unsq"),
        helper.make_node("Mul", ["rd", "gate4"], ["se"], name="se_mul"),
        helper.make_node("Conv", ["se", "pw"], ["p"], name="project"),
        helper.make_node("GlobalAveragePool", ["p"], ["gp"], name="pool"),
        helper.make_node("Flatten", ["gp"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "fc", "fcb"], ["y"], name="head"),
    ]
    inits_pb = [numpy_helper.from_array(v, k) for k, v in inits.items()]
    inits_pb += [
        numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
        numpy_helper.from_array(np.array(0, np.float32), "lo"),
        numpy_helper.from_array(np.array(6, np.float32), "hi"),
    ]
    return _model(nodes, inits_pb, ["N", 3, 32, 32], "y", ["N", 100])


def _x(seed: int, n: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, 3, 32, 32)).astype(np.float32)


def _with_weights(model: onnx.ModelProto, fn) -> onnx.ModelProto:
    """A copy of `model` whose float weight matrices went through `fn`."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.dtype == np.float32:
            t.CopyFrom(numpy_helper.from_array(fn(a).astype(np.float32), t.name))
    return out


def test_float16_weights_halve_the_file_and_compute_in_float32():
    model = mobile_block()
    f32, f16 = convert(model), convert(model, precision="float16")
    assert f16.precision == "float16" and f16.ops["DEQUANTIZE"] == 12  # one per weight and bias
    assert len(f16.data) < 0.6 * len(f32.data)
    x = _x(1)
    y16 = run_tflite(f16.data, x)
    # LiteRT computes in float32 on fp16-rounded weights: the same as ONNX Runtime on those weights
    np.testing.assert_allclose(
        y16, run_ort(_with_weights(model, lambda a: a.astype(np.float16)), x), rtol=1e-4, atol=1e-5
    )
    ref = run_ort(model, x)
    err = np.abs(y16 - ref).max() / np.abs(ref).max()
    assert 0 < err < 2e-3
    assert b'"precision": "float16"' in read_metadata(f16.data)["lowbit"]


def test_lowbit_float16_mode_onnx_exports_as_float16():
    model = mobile_block()
    fp16_onnx = lowbit.quantize(
        model, recipe=lowbit.Recipe(default=lowbit.Scheme(mode="float16")), progress=False
    ).model
    result = convert(fp16_onnx)  # auto: the model's float16 constants stay float16
    assert result.precision == "float16" and "CAST" not in result.ops and "DEQUANTIZE" in result.ops
    x = _x(2)
    np.testing.assert_allclose(
        run_tflite(result.data, x), run_tflite(convert(model, precision="float16").data, x), rtol=1e-4, atol=1e-5
    )
    assert convert(fp16_onnx, precision="float32").precision == "float32"


def _hybrid_fc(x: np.ndarray, q: np.ndarray, s_w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """TFLite's hybrid FULLY_CONNECTED with asymmetric inputs: each row quantized to int8 on its own range."""
    lo, hi = np.minimum(x.min(1, keepdims=True), 0), np.maximum(x.max(1, keepdims=True), 0)
    s = (hi - lo) / 255.0
    z = np.round(-128 - lo / s)
    xq = np.clip(np.round(x / s) + z, -128, 127)
    acc = (xq - z) @ q.T.astype(np.float64)
    return (acc * s * s_w + b).astype(np.float32)


def test_dynamic_range_fully_connected_matches_hybrid_arithmetic():
    w, b = _w((64, 96), 1), _w((96,), 2, 0.1)  # MatMul (in, out) -> FULLY_CONNECTED (out, in)
    model = _model(
        [
            helper.make_node("MatMul", ["x", "w"], ["m"], name="fc"),
            helper.make_node("Add", ["m", "b"], ["y"], name="bias"),
        ],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
        [4, 64],
        "y",
        [4, 96],
    )
    result = convert(model, precision="dynamic")
    assert result.ops == {"FULLY_CONNECTED": 1}  # the bias Add rides in the FULLY_CONNECTED
    assert len(result.data) < 0.4 * len(convert(model).data)
    x = np.random.default_rng(3).normal(0.5, 1, (4, 64)).astype(np.float32)
    got = run_tflite(result.data, x)
    # the int8 weights in the file: symmetric, one scale per output channel, [-127, 127]
    s_w = np.abs(w).max(0) / 127
    q = np.clip(np.round(w.T / s_w[:, None]), -127, 127)
    np.testing.assert_allclose(got, _hybrid_fc(x, q, s_w, b), rtol=1e-4, atol=1e-4)
    ref = run_ort(model, x)
    assert 0 < np.abs(got - ref).max() < 0.02 * np.abs(ref).max()


def test_dynamic_range_cnn_close_to_float():
    model = mobile_block()
    result = convert(model, precision="dynamic")
    assert result.precision == "dynamic" and "DEQUANTIZE" not in result.ops
    x = _x(4)
    got = run_tflite(result.data, x)
    # small weights (< 1024 values: depthwise, squeeze-excite) stay float, as TFLite's converter does
    ref = run_ort(model, x)
    assert np.abs(got - ref).max() < 0.03 * np.abs(ref).max()
    cos = float((got * ref).sum() / np.linalg.norm(got) / np.linalg.norm(ref))
    assert cos > 0.999


def test_precision_mistakes_are_one_line_errors():
    model = tiny_cnn()
    calib = np.random.default_rng(1).normal(0, 1, (8, 3, 16, 16)).astype(np.float32)
    qdq = lowbit.quantize(model, calib=[calib], progress=False).model
    with pytest.raises(LowbitError, match="--precision dynamic is for float models"):
        convert(qdq, precision="dynamic")
    with pytest.raises(LowbitError, match="precision must be one of"):
        convert(model, precision="int4")
    mlp = _model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")],
        [numpy_helper.from_array(_w((64, 32), 1), "w")],
        [1, 64],
        "y",
        [1, 32],
    )
    w4 = lowbit.quantize(
        mlp, recipe=lowbit.Recipe(default=lowbit.Scheme(mode="weight_only", weights="int4")), progress=False
    ).model
    with pytest.raises(LowbitError, match=r"\(MatMulNBits\): .*export the float model with --precision dynamic"):
        convert(w4)
