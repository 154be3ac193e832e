"""MatMul of two int8 activations (attention's probabilities x values) gives ONNX Runtime's integers in LiteRT:
the export multiplies them in float (DEQUANTIZE -> BATCH_MATMUL -> QUANTIZE). With an int8 BATCH_MATMUL, 0.36% of
the outputs at MiniLM's parameters came out one step apart (docs/tflite.md)."""

from __future__ import annotations

import ai_edge_litert.interpreter as litert
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lowbit.export.tflite.transformer as transformer
from lowbit.export.tflite import convert
from lowbit.runtimes.ort import session

f32 = np.float32
# MiniLM layer 0: softmax output (uint8, 1/255), values, context (lowbit's static int8 ONNX)
PA, PB, PC = (f32(0.00392157), 0), (f32(0.02446691), 137), (f32(0.02030584), 160)
SA, SB, SC = [1, 12, 64, 64], [1, 12, 64, 32], [1, 12, 64, 32]


def attention_context() -> onnx.ModelProto:
    inits, nodes = [], []
    for t, (s, z) in zip("abc", (PA, PB, PC)):
        inits += [
            numpy_helper.from_array(np.array(s, f32), f"{t}_s"),
            numpy_helper.from_array(np.array(z, np.uint8), f"{t}_z"),
        ]
    for t in "ab":
        nodes += [
            helper.make_node("QuantizeLinear", [t, f"{t}_s", f"{t}_z"], [f"{t}_q"]),
            helper.make_node("DequantizeLinear", [f"{t}_q", f"{t}_s", f"{t}_z"], [f"{t}_d"]),
        ]
    nodes += [
        helper.make_node("MatMul", ["a_d", "b_d"], ["c"], name="context"),
        helper.make_node("QuantizeLinear", ["c", "c_s", "c_z"], ["c_q"]),
        helper.make_node("DequantizeLinear", ["c_q", "c_s", "c_z"], ["y"]),
    ]
    io = [
        helper.make_tensor_value_info("a", TensorProto.FLOAT, SA),
        helper.make_tensor_value_info("b", TensorProto.FLOAT, SB),
    ]
    out = [helper.make_tensor_value_info("y", TensorProto.FLOAT, SC)]
    model = helper.make_model(
        helper.make_graph(nodes, "bmm", io, out, inits), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    return model


def _both() -> tuple[np.ndarray, np.ndarray, dict]:
    rng = np.random.default_rng(0)
    qa, qb = rng.integers(0, 40, SA), rng.integers(60, 220, SB)  # small probabilities, values around zero
    model = attention_context()
    feeds = {"a": ((qa - PA[1]) * PA[0]).astype(f32), "b": ((qb - PB[1]) * PB[0]).astype(f32)}
    y = session(model, "kernels").run(None, feeds)[0]
    q_ort = np.rint(y / PC[0]).astype(np.int64) + PC[1]
    result = convert(model, io="int8")
    it = litert.Interpreter(model_content=result.data, num_threads=1)  # XNNPACK
    it.allocate_tensors()
    for d, q in zip(it.get_input_details(), (qa, qb)):
        it.set_tensor(d["index"], (q - 128).astype(np.int8).transpose(0, 2, 3, 1))  # uint8 -> int8, NHWC
    it.invoke()
    q_lite = it.get_tensor(it.get_output_details()[0]["index"]).astype(np.int64).transpose(0, 3, 1, 2) + 128
    return q_ort, q_lite, result.ops


def test_int8_batch_matmul_rounds_apart(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(transformer, "batch_matmul_kind", lambda kind: kind)
    q_ort, q_lite, ops = _both()
    assert "DEQUANTIZE" not in ops
    assert int(np.sum(q_ort != q_lite)) > 0.001 * q_ort.size and int(np.abs(q_ort - q_lite).max()) == 1


def test_exported_batch_matmul_gives_onnx_runtimes_integers():
    q_ort, q_lite, ops = _both()
    assert ops["BATCH_MATMUL"] == 1 and ops["DEQUANTIZE"] == 2 and ops["QUANTIZE"] == 1
    np.testing.assert_array_equal(q_lite, q_ort)
