"""A GELU the int8 ONNX rounds inside (its Erf, Add and first Mul quantized, as lowbit quantizes PyTorch's Erf GELU)
gives ONNX Runtime's integers in LiteRT: the export looks them up in a 256-entry table ONNX Runtime computed on the
chain's QDQ sub-model (`export/tflite/table.py`). TFLite's one GELU op rounds once, and on these parameters (the
spindle EEG U-Net's block 2, uint8 as lowbit wrote them) some inputs come out a step apart."""

from __future__ import annotations

import ai_edge_litert.interpreter as litert
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lowbit.export.tflite.gelu as gelu
from lowbit.export.tflite import convert
from lowbit.runtimes.ort import session

f32, u8 = np.float32, np.uint8
# value -> (scale, uint8 zero point): /model/model/conv/conv_net/conv_net.2/... of spindle-detector-eeg.onnx
PARAMS = {
    "x": (0.03731011599302292, 96),
    "erf": (0.007843135856091976, 127),
    "add": (0.007843137718737125, 0),
    "mul": (0.05068564414978027, 7),
    "y": (0.02534284070134163, 7),
    "one": (0.00392157, 0),  # the constants 1.0 and 0.5, uint8 255 behind a DequantizeLinear
    "half": (0.00196078, 0),
}


def gelu_model() -> onnx.ModelProto:
    inits = [numpy_helper.from_array(np.array(1 / np.sqrt(2), f32), "r2")]
    for k, (s, z) in PARAMS.items():
        inits += [numpy_helper.from_array(np.array(s, f32), f"{k}_s")]
        inits += [numpy_helper.from_array(np.array(z, u8), f"{k}_z")]
    inits += [numpy_helper.from_array(np.array(255, u8), "one_q"), numpy_helper.from_array(np.array(255, u8), "half_q")]

    def qdq(v: str, k: str) -> list[onnx.NodeProto]:
        return [
            helper.make_node("QuantizeLinear", [v, f"{k}_s", f"{k}_z"], [f"{v}_q"]),
            helper.make_node("DequantizeLinear", [f"{v}_q", f"{k}_s", f"{k}_z"], [f"{v}_d"]),
        ]

    nodes = [
        *qdq("x", "x"),
        helper.make_node("DequantizeLinear", ["one_q", "one_s", "one_z"], ["one"]),
        helper.make_node("DequantizeLinear", ["half_q", "half_s", "half_z"], ["half"]),
        helper.make_node("Mul", ["x_d", "r2"], ["scaled"]),
        helper.make_node("Erf", ["scaled"], ["erf"]),
        *qdq("erf", "erf"),
        helper.make_node("Add", ["erf_d", "one"], ["add"]),
        *qdq("add", "add"),
        helper.make_node("Mul", ["x_d", "add_d"], ["mul"]),
        *qdq("mul", "mul"),
        helper.make_node("Mul", ["mul_d", "half"], ["g"]),
        helper.make_node("QuantizeLinear", ["g", "y_s", "y_z"], ["g_q"]),
        helper.make_node("DequantizeLinear", ["g_q", "y_s", "y_z"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "gelu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 256])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _both() -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Every uint8 input: ONNX Runtime's output integers (kernels) and LiteRT's (XNNPACK, int8 I/O), as uint8."""
    model = gelu_model()
    (sx, zx), (sy, zy) = PARAMS["x"], PARAMS["y"]
    q = np.arange(256)
    y = session(model, "kernels").run(None, {"x": ((q - zx) * f32(sx)).astype(f32)[None]})[0]
    q_ort = np.rint(y / f32(sy)).astype(np.int64).ravel() + zy
    res = convert(model, io="int8")
    it = litert.Interpreter(model_content=res.data, num_threads=1)
    it.allocate_tensors()
    it.set_tensor(it.get_input_details()[0]["index"], (q - 128).astype(np.int8)[None])
    it.invoke()
    return q_ort, it.get_tensor(it.get_output_details()[0]["index"]).astype(np.int64).ravel() + 128, res.ops


def test_a_gelu_rounded_inside_gives_onnx_runtimes_integers():
    q_ort, q_lite, ops = _both()
    assert ops.get("GATHER") == 1 and "GELU" not in ops
    assert np.array_equal(q_ort, q_lite)


def test_one_gelu_op_rounds_once_and_misses(monkeypatch: pytest.MonkeyPatch):
    """The check above can fail: the exporter's single GELU (no table) puts some of these inputs a step apart."""
    monkeypatch.setattr(gelu, "rounded_inside", lambda *args: False)
    q_ort, q_lite, ops = _both()
    assert ops.get("GELU") == 1 and "GATHER" not in ops
    assert 0 < np.count_nonzero(q_ort != q_lite) and np.abs(q_ort - q_lite).max() >= 1
