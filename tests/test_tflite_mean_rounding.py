"""An int8 GlobalAveragePool in LiteRT gives ONNX Runtime's integers: the export writes it as a FULLY_CONNECTED
summing with all-ones weights (the int32 sum, scaled in float32 and rounded once, as QLinearGlobalAveragePool does).
LiteRT's int8 MEAN rounds twice (the sum times si/so to an integer, then that divided by the count); with
MobileNetV3-Large's parameters (a squeeze-excite average over 28 x 28) some sums near a half step come out one step
apart there. (A float MEAN between DEQUANTIZE and QUANTIZE was tried too: it also missed one of these sums.)"""

from __future__ import annotations

import tempfile
from pathlib import Path

import ai_edge_litert.interpreter as litert
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lowbit.export.tflite.layers as layers
from lowbit.export.tflite import convert
from lowbit.runtimes.ort import session

f32 = np.float32
SI, ZI, SO, ZO, H = f32(0.049960118), -128, f32(0.004559421), -128, 28  # MobileNetV3-Large, block 5 (int8 form)


def gap_model(channels: int, batch: int = 1) -> onnx.ModelProto:
    inits = [
        numpy_helper.from_array(np.array(SI, f32), "si"),
        numpy_helper.from_array(np.array(ZI, np.int8), "zi"),
        numpy_helper.from_array(np.array(SO, f32), "so"),
        numpy_helper.from_array(np.array(ZO, np.int8), "zo"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "si", "zi"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "si", "zi"], ["xd"]),
        helper.make_node("GlobalAveragePool", ["xd"], ["h"]),
        helper.make_node("QuantizeLinear", ["h", "so", "zo"], ["hq"]),
        helper.make_node("DequantizeLinear", ["hq", "so", "zo"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "gap",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, channels, H, H])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, channels, 1, 1])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def inputs_near_half_steps() -> np.ndarray:
    """One channel per integer sum whose average lands within 1e-4 of a half step of the output (in range)."""
    n = H * H
    sums = np.arange((-128 - ZI) * n, (127 - ZI) * n + 1)
    exact = sums * (float(SI) / float(SO) / n) + ZO
    sums = sums[(np.abs(exact - np.floor(exact) - 0.5) < 1e-4) & (exact < 127)]
    q = np.full((len(sums), n), ZI, np.int64)
    for c, total in enumerate(sums):  # spread each sum over the pixels, each within int8
        rest = int(total)
        for j in range(n):
            step = max(min(rest, 127 - ZI), -128 - ZI)
            q[c, j] += step
            rest -= step
    assert np.array_equal((q - ZI).sum(1), sums)
    return q.reshape(1, len(sums), H, H)


def _both(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    model = gap_model(q.shape[1])
    y = session(model, "kernels").run(None, {"x": ((q - ZI) * SI).astype(f32)})[0]
    q_ort = np.rint(y / SO).astype(np.int64).ravel() + ZO
    it = litert.Interpreter(model_content=convert(model, io="int8").data, num_threads=1)  # XNNPACK
    it.allocate_tensors()
    it.set_tensor(it.get_input_details()[0]["index"], q.transpose(0, 2, 3, 1).astype(np.int8))
    it.invoke()
    return q_ort, it.get_tensor(it.get_output_details()[0]["index"]).astype(np.int64).ravel()


def test_int8_mean_rounds_twice(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(layers, "_global_average_as_sum", lambda *a: False)  # the plain MEAN
    q_ort, q_lite = _both(inputs_near_half_steps())
    assert 1 <= int(np.sum(q_ort != q_lite)) and int(np.abs(q_ort - q_lite).max()) == 1


def test_exported_mean_gives_onnx_runtimes_integers():
    q = inputs_near_half_steps()
    q_ort, q_lite = _both(q)
    np.testing.assert_array_equal(q_lite, q_ort)
    assert convert(gap_model(4), io="int8").ops == {"TRANSPOSE": 1, "RESHAPE": 2, "FULLY_CONNECTED": 1}


def test_float_io_and_batches_run_the_sum_too():
    """Float edges (QUANTIZE / DEQUANTIZE around it) and a batch of 3: the same averages as ONNX Runtime's."""
    from lowbit.runtimes.litert import LiteRTSession

    rng = np.random.default_rng(0)
    model = gap_model(16, batch=3)
    x = ((rng.integers(-128, 128, (3, 16, H, H)) - ZI) * SI).astype(f32)
    path = Path(tempfile.mkdtemp()) / "gap.tflite"
    path.write_bytes(convert(model, batch=3).data)
    y_lite = LiteRTSession(path, threads=1).run(None, {"x": x})[0]
    y_ort = session(model, "kernels").run(None, {"x": x})[0]
    np.testing.assert_array_equal(y_lite, y_ort)
