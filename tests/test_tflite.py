"""TFLite export, float32: the written flatbuffer loads in LiteRT and computes what ONNX Runtime computes."""

from __future__ import annotations

import json

import ai_edge_litert.interpreter as litert
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import tiny_cnn
from lowbit.errors import LowbitError
from lowbit.export.tflite import convert, export_tflite, read_metadata


def run_tflite(data: bytes, x: np.ndarray, dequantize: bool = False) -> np.ndarray:
    """One NCHW input, transposed to the NHWC the .tflite declares (quantized if the input is integer); the output
    as stored, or as real values with `dequantize`."""
    it = litert.Interpreter(model_content=data, num_threads=1)
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    feed = x.transpose(0, 2, 3, 1) if x.ndim == 4 else x
    if inp["dtype"] != np.float32:
        s, z = inp["quantization"]
        info = np.iinfo(inp["dtype"])
        feed = np.clip(np.round(feed / s) + z, info.min, info.max).astype(inp["dtype"])
    it.resize_tensor_input(inp["index"], feed.shape)
    it.allocate_tensors()
    it.set_tensor(inp["index"], feed)
    it.invoke()
    y = it.get_tensor(out["index"])
    if dequantize and out["dtype"] != np.float32:
        s, z = out["quantization"]
        y = (y.astype(np.float32) - z) * s
    return y


def run_ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _model(nodes, inits, x_shape, y_name, y_shape) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "t",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info(y_name, TensorProto.FLOAT, y_shape)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_tiny_cnn_float_matches_ort_and_fuses_activations():
    model = tiny_cnn()
    result = convert(model)
    # Relu and Clip(0, 6) ride on the convs; no transposes inside; the graph keeps its shape
    assert result.ops == {"CONV_2D": 2, "ADD": 1, "MEAN": 1, "RESHAPE": 1, "FULLY_CONNECTED": 1}
    assert result.transposes == []
    x = np.random.default_rng(0).normal(0, 1, (2, 3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(run_tflite(result.data, x), run_ort(model, x), rtol=1e-5, atol=1e-5)


def test_pools_pads_and_activations_float():
    rng = np.random.default_rng(3)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(0, 0.3, (4, 1, 3, 3)).astype(np.float32), "dw"),
        numpy_helper.from_array(rng.normal(0, 1, (1, 4, 1, 1)).astype(np.float32), "k"),
    ]
    nodes = [
        # stride 2 with symmetric pads is not TFLite SAME: needs an explicit PAD
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2], name="conv"),
        helper.make_node("HardSwish", ["c"], ["h"], name="hs"),
        helper.make_node("Conv", ["h", "dw"], ["d"], pads=[1, 1, 1, 1], group=4, name="dwconv"),
        helper.make_node("Mul", ["d", "k"], ["m"], name="mul"),
        helper.make_node("Sigmoid", ["m"], ["sg"], name="sig"),
        helper.make_node("MaxPool", ["sg"], ["mp"], kernel_shape=[2, 2], strides=[2, 2], name="maxpool"),
        helper.make_node("AveragePool", ["mp"], ["ap"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="avgpool"),
        helper.make_node("Concat", ["ap", "mp"], ["cat"], axis=1, name="cat"),
        helper.make_node("Flatten", ["cat"], ["f"], name="flat"),
        helper.make_node("Softmax", ["f"], ["y"], axis=-1, name="softmax"),
    ]
    model = _model(nodes, inits, [1, 3, 16, 16], "y", [1, 8 * 4 * 4])
    result = convert(model)
    assert result.ops["PAD"] == 1 and result.ops["DEPTHWISE_CONV_2D"] == 1
    assert result.transposes == ["cat"]  # flattening a spatial NHWC map is the one place a transpose is needed
    x = np.random.default_rng(4).normal(0, 1, (1, 3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(run_tflite(result.data, x), run_ort(model, x), rtol=1e-5, atol=1e-6)


def test_metadata_and_atomic_write(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(tiny_cnn(), str(path))
    out = tmp_path / "m.tflite"
    result = export_tflite(path, out)
    data = out.read_bytes()
    assert data[4:8] == b"TFL3" and data == result.data
    meta = read_metadata(data)
    assert meta["min_runtime_version"].rstrip(b"\0") == b"2.3.0"
    info = json.loads(meta["lowbit"])
    assert info["lowbit_version"] and info["io"] == "float"
    assert [p.name for p in tmp_path.iterdir()] and not list(tmp_path.glob(".*tmp"))


def test_refuses_bad_paths_and_unknown_ops(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(tiny_cnn(), str(path))
    with pytest.raises(LowbitError, match="is the input model"):
        export_tflite(path, path)
    with pytest.raises(LowbitError, match="must end in .tflite"):
        export_tflite(path, tmp_path / "m.bin")
    model = _model([helper.make_node("Erf", ["x"], ["y"], name="erf1")], [], [1, 4], "y", [1, 4])
    with pytest.raises(LowbitError, match=r"^node erf1 \(Erf\): no TFLite equivalent"):
        convert(model)
    assert not (tmp_path / "m.tflite").exists()
