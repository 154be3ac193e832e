"""Full-integer TFLite export of lowbit's QDQ models: bit-level conformance with ONNX Runtime's integer kernels.

LiteRT's XNNPACK kernels scale conv / fully-connected accumulators in float32 and round half to even, as ONNX
Runtime does; its ADD keeps 21-bit fixed-point scale ratios (docs/tflite.md, tests/test_tflite_rounding.py).
LiteRT's built-in kernels (no XNNPACK) use 32-bit fixed-point multipliers and round ties away from zero
(lowbit.numerics.requantize), so there outputs may differ by one step where the exact value sits near a half.
"""

from __future__ import annotations

import ai_edge_litert.interpreter as litert
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lowbit
from lowbit.errors import LowbitError
from lowbit.export.tflite import convert
from lowbit.runtimes.ort import session
from test_tflite import run_tflite


def _model(nodes, inits, x_shape, y_shape) -> onnx.ModelProto:
    x_shape, y_shape = ["N"] + x_shape[1:], ["N"] + y_shape[1:]  # any batch, as exported classifiers
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


def _w(shape, seed, scale=0.4) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, scale, shape).astype(np.float32)


def conv_model() -> onnx.ModelProto:
    inits = [numpy_helper.from_array(_w((8, 3, 3, 3), 1), "w"), numpy_helper.from_array(_w((8,), 2, 0.1), "b")]
    return _model(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1], strides=[2, 2], name="conv")],
        inits,
        [1, 3, 12, 12],
        [1, 8, 6, 6],
    )


def depthwise_model() -> onnx.ModelProto:
    inits = [numpy_helper.from_array(_w((6, 1, 3, 3), 3), "w"), numpy_helper.from_array(_w((6,), 4, 0.1), "b")]
    return _model(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1], group=6, name="dw")],
        inits,
        [1, 6, 10, 10],
        [1, 6, 10, 10],
    )


def fc_model() -> onnx.ModelProto:
    inits = [numpy_helper.from_array(_w((16, 24), 5), "w"), numpy_helper.from_array(_w((16,), 6, 0.1), "b")]
    nodes = [
        helper.make_node("Gemm", ["x", "w", "b"], ["g"], transB=1, name="fc"),
        helper.make_node("Relu", ["g"], ["y"], name="relu"),
    ]
    return _model(nodes, inits, [1, 24], [1, 16])


def residual_model() -> onnx.ModelProto:
    inits = [numpy_helper.from_array(_w((4, 4, 1, 1), 7), "w")]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("Add", ["x", "c"], ["y"], name="add"),
    ]
    return _model(nodes, inits, [1, 4, 8, 8], [1, 4, 8, 8])


def _calib(model: onnx.ModelProto, seed: int, n: int = 32) -> np.ndarray:
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return np.random.default_rng(seed).normal(0, 1, [n] + shape[1:]).astype(np.float32)


def _tflite_int(data: bytes, x: np.ndarray) -> tuple[np.ndarray, float, int]:
    """Run with int8 input and output: the integers and the output's (scale, zero point)."""
    it = litert.Interpreter(model_content=data, num_threads=1)
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    it.resize_tensor_input(inp["index"], x.shape if x.ndim != 4 else x.transpose(0, 2, 3, 1).shape)
    it.allocate_tensors()
    s, z = inp["quantization"]
    feed = x.transpose(0, 2, 3, 1) if x.ndim == 4 else x
    it.set_tensor(inp["index"], np.clip(np.round(feed / s) + z, -128, 127).astype(np.int8))
    it.invoke()
    y = it.get_tensor(out["index"])
    y = y.transpose(0, 3, 1, 2) if y.ndim == 4 else y
    return y, *out["quantization"]


@pytest.mark.parametrize("build", [conv_model, depthwise_model, fc_model, residual_model])
def test_int8_equals_ort_integer_kernels_within_one_step(build):
    model = build()
    calib = _calib(model, 1)
    qmodel = lowbit.quantize(model, calib=[calib], progress=False).model
    result = convert(qmodel, io="int8")
    assert result.quantized and not result.float_nodes and not result.fallbacks
    assert "DEQUANTIZE" not in result.ops and result.transposes == []
    x = _calib(model, 2, 8)
    # feed both runtimes the same integers: quantize x with the model's input parameters first
    sess = session(qmodel, "kernels")
    y_tfl, s, z = _tflite_int(result.data, x)
    it_in = litert.Interpreter(model_content=result.data).get_input_details()[0]["quantization"]
    xq = (np.clip(np.round(x / it_in[0]) + it_in[1], -128, 127) - it_in[1]) * it_in[0]
    y_ort = sess.run(None, {"x": xq.astype(np.float32)})[0]
    # ORT's output is dequantized uint8: back to TFLite's int8 grid
    q_ort = np.round(y_ort / s) + z
    diff = np.abs(q_ort - y_tfl.astype(np.int64))
    assert diff.max() <= 1, f"{build.__name__}: {int(diff.max())} steps"
    assert (diff == 0).mean() >= 0.99  # off-by-one only at rounding ties (measured: none)


def test_int8_uint8_and_float_io_agree():
    model = conv_model()
    qmodel = lowbit.quantize(model, calib=[_calib(model, 1)], progress=False).model
    x = _calib(model, 3, 4)
    runs = {}
    for io in ("float", "int8", "uint8"):
        data = convert(qmodel, io=io).data
        dtype = litert.Interpreter(model_content=data).get_input_details()[0]["dtype"]
        assert dtype == {"float": np.float32, "int8": np.int8, "uint8": np.uint8}[io]
        runs[io] = run_tflite(data, x, dequantize=True)
    np.testing.assert_array_equal(runs["float"], runs["int8"])
    np.testing.assert_array_equal(runs["int8"], runs["uint8"])


def test_weights_keep_per_channel_scales_on_output_axis():
    import importlib

    qmodel = lowbit.quantize(depthwise_model(), calib=[_calib(depthwise_model(), 1)], progress=False).model
    data = convert(qmodel).data
    m = importlib.import_module("tflite.Model").Model.GetRootAs(data, 0)
    sg = m.Subgraphs(0)
    tensors = {sg.Tensors(i).Name().decode(): sg.Tensors(i) for i in range(sg.TensorsLength())}
    w = tensors["dw_weights"]
    assert list(w.ShapeAsNumpy()) == [1, 3, 3, 6] and w.Type() == 9  # 1HWO, int8
    q = w.Quantization()
    assert q.QuantizedDimension() == 3 and q.ScaleLength() == 6 and not q.ZeroPointAsNumpy().any()
    b = tensors["dw_bias"]
    assert b.Type() == 2 and b.Quantization().ScaleLength() == 6  # int32, s_in * s_w per channel


def test_int8_softmax_with_other_output_scale_is_requantized_not_refused():
    # SOFTMAX's int8 kernel writes (1/256, -128); lowbit's output parameters follow with one rescale, written as
    # DEQUANTIZE -> QUANTIZE (float32 as ONNX Runtime rescales; LiteRT's int8 -> int8 QUANTIZE rounds apart)
    nodes = [helper.make_node("Softmax", ["x"], ["y"], axis=-1, name="sm")]
    model = _model(nodes, [], [1, 10], [1, 10])
    recipe = lowbit.Recipe(target="onnxruntime")  # keeps the calibrated output scale (no fixed_outputs)
    qmodel = lowbit.quantize(model, calib=[_calib(model, 1)], recipe=recipe, progress=False).model
    result = convert(qmodel, io="int8")
    assert not result.fallbacks and not result.float_nodes
    assert result.ops == {"SOFTMAX": 1, "DEQUANTIZE": 1, "QUANTIZE": 1}
    # the default target (portable) too: SOFTMAX's fixed parameters go to Softmax outputs inside the network, and
    # this one is the model's output (tests/test_tflite_fixed_outputs.py)
    qmodel = lowbit.quantize(model, calib=[_calib(model, 1)], progress=False).model
    assert convert(qmodel, io="int8").ops == {"SOFTMAX": 1, "DEQUANTIZE": 1, "QUANTIZE": 1}


@pytest.mark.parametrize("scheme", [lowbit.Scheme(per_channel=False), lowbit.Scheme(activations="int8")])
def test_per_tensor_weights_and_int8_activations(scheme):
    model = residual_model()
    qmodel = lowbit.quantize(
        model, calib=[_calib(model, 1)], recipe=lowbit.Recipe(default=scheme), progress=False
    ).model
    before = qmodel.SerializeToString()
    result = convert(qmodel, io="int8")
    assert qmodel.SerializeToString() == before  # the caller's model is left alone
    x = _calib(model, 2, 8)
    y_tfl, s, z = _tflite_int(result.data, x)
    s_in, z_in = litert.Interpreter(model_content=result.data).get_input_details()[0]["quantization"]
    xq = ((np.clip(np.round(x / s_in) + z_in, -128, 127) - z_in) * s_in).astype(np.float32)
    q_ort = np.round(session(qmodel, "kernels").run(None, {"x": xq})[0] / s) + z
    assert np.abs(q_ort - y_tfl).max() <= 1


def test_int8_io_quantizes_a_float_classifier_output_from_calibration():
    from conftest import tiny_cnn

    model = tiny_cnn()
    calib = _calib(model, 1)
    qmodel = lowbit.quantize(model, calib=[calib], progress=False).model
    assert convert(qmodel).float_nodes == ["fc (Gemm)"]
    with pytest.raises(LowbitError, match="^output y is float in the model .* pass --calib DATA"):
        convert(qmodel, io="int8")
    result = convert(qmodel, io="int8", calib=[calib])
    assert not result.float_nodes and "DEQUANTIZE" not in result.ops
    x = _calib(model, 2, 8)
    y_tfl, s, z = _tflite_int(result.data, x)
    assert y_tfl.dtype == np.int8 and s > 0
    s_in, z_in = litert.Interpreter(model_content=result.data).get_input_details()[0]["quantization"]
    xq = ((np.clip(np.round(x / s_in) + z_in, -128, 127) - z_in) * s_in).astype(np.float32)
    y_ort = session(qmodel, "kernels").run(None, {"x": xq})[0]  # float logits from QGemm
    q_ort = np.clip(np.round(y_ort / s) + z, -128, 127)
    assert np.abs(q_ort - y_tfl).max() <= 1


def test_int8_clip_to_arbitrary_bounds_exports_without_fallback():
    inits = [
        numpy_helper.from_array(_w((4, 4, 1, 1), 8), "w1"),
        numpy_helper.from_array(_w((4, 4, 1, 1), 9), "w2"),
        numpy_helper.from_array(np.array(-0.5, np.float32), "lo"),
        numpy_helper.from_array(np.array(4.0, np.float32), "hi"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c"], name="conv1"),
        helper.make_node("Clip", ["c", "lo", "hi"], ["k"], name="clip"),
        helper.make_node("Conv", ["k", "w2"], ["y"], name="conv2"),
    ]
    model = _model(nodes, inits, [1, 4, 8, 8], [1, 4, 8, 8])
    qmodel = lowbit.quantize(model, calib=[_calib(model, 1)], progress=False).model
    result = convert(qmodel)
    assert result.fallbacks == [] and result.float_nodes == []
    assert result.ops["CONV_2D"] == 2  # the quantizer folds this Clip into conv1's range; test_tflite_clip.py has one
    x = _calib(model, 2, 1)
    y = run_tflite(result.data, x).transpose(0, 3, 1, 2)
    ref = session(qmodel, "kernels").run(None, {"x": x})[0]
    assert np.abs(y - ref).max() <= 2 * float(np.abs(ref).max()) / 127


def test_add_of_scales_too_far_apart_for_tflite_is_refused_not_crashed():
    # a vanishing operand (tiny range) next to a normal one: TFLite's int8 ADD would abort at load. (A huge range,
    # like an attention mask's, no longer gets here: lowbit keeps ops on such tensors float, see test_masks.py.)
    inits = [
        numpy_helper.from_array(_w((4, 4, 1, 1), 10) * 1e-12, "w1"),
        numpy_helper.from_array(_w((4, 4, 1, 1), 11), "w2"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], name="conv1"),
        helper.make_node("Conv", ["x", "w2"], ["c"], name="conv2"),
        helper.make_node("Relu", ["c"], ["b"], name="relu"),  # else the summed convs of one input merge
        helper.make_node("Add", ["a", "b"], ["y"], name="add"),
    ]
    model = _model(nodes, inits, [1, 4, 8, 8], [1, 4, 8, 8])
    qmodel = lowbit.quantize(model, calib=[_calib(model, 1)], progress=False).model
    with pytest.raises(LowbitError, match=r"^node add \(Add\): input scales .* too far apart"):
        convert(qmodel)
    result = convert(qmodel, allow_float_fallback=True)
    it = litert.Interpreter(model_content=result.data, num_threads=1)
    it.allocate_tensors()  # loads: the add runs in float
    assert result.fallbacks[0].startswith("add (Add)")
