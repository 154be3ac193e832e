"""The portable target gives Sigmoid/Softmax/Tanh outputs TFLite's fixed int8 parameters (targets/fixed_outputs.py):
no requantization after LOGISTIC in the .tflite, and LiteRT computes the integers ONNX Runtime does."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import lowbit
from lowbit.export.tflite import convert
from lowbit.runtimes.ort import session
from test_tflite_int8 import _tflite_int


def _silu(gain: float = 1.0, shift: float = 0.0) -> onnx.ModelProto:
    """Conv -> x * sigmoid(gain * x + shift): YOLO's SiLU (1, 0), or a gate that stays near sigmoid(shift)."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.5, (8, 4, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(np.array(gain, np.float32), "gain"),
        numpy_helper.from_array(np.array(shift, np.float32), "shift"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Mul", ["c", "gain"], ["cg"], name="scale"),
        helper.make_node("Add", ["cg", "shift"], ["cs"], name="shift"),
        helper.make_node("Sigmoid", ["cs"], ["s"], name="sigmoid"),
        helper.make_node("Mul", ["c", "s"], ["y"], name="silu"),
    ]
    graph = helper.make_graph(
        nodes,
        "silu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 8, 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _x(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, 4, 8, 8)).astype(np.float32)


def _sigmoid_params(qmodel: onnx.ModelProto) -> tuple[float, int]:
    inits = {t.name: numpy_helper.to_array(t) for t in qmodel.graph.initializer}
    sig = next(n for n in qmodel.graph.node if n.op_type == "Sigmoid").output[0]
    q = next(n for n in qmodel.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == sig)
    return float(inits[q.input[1]]), int(inits[q.input[2]])


def _steps_apart(qmodel: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """|LiteRT - ONNX Runtime| in output steps, both from the int8 model, int8 io."""
    y_tfl, s, z = _tflite_int(convert(qmodel, io="int8").data, x)
    ref = session(qmodel, "kernels").run(None, {"x": x})[0]
    return np.abs(np.rint(ref / s) + z - y_tfl.astype(np.int64))


def test_sigmoid_output_gets_logistics_fixed_parameters_and_both_runtimes_agree():
    model, calib = _silu(), _x(1, 32)
    portable = lowbit.quantize(model, calib=calib, progress=False).model
    assert _sigmoid_params(portable) == (1 / 256, 0)  # uint8 activations: LOGISTIC's int8 (1/256, -128) + 128
    ops = convert(portable, io="int8").ops
    assert ops["LOGISTIC"] == 1 and "QUANTIZE" not in ops  # nothing to requantize after LOGISTIC
    onnxruntime = lowbit.quantize(model, calib=calib, recipe=lowbit.Recipe(target="onnxruntime"), progress=False)
    assert _sigmoid_params(onnxruntime.model) != (1 / 256, 0)
    assert convert(onnxruntime.model, io="int8").ops["QUANTIZE"] == 1  # LOGISTIC's 1/256, then the model's scale
    x = _x(2, 16)
    fixed, requant = _steps_apart(portable, x), _steps_apart(onnxruntime.model, x)
    # measured: 0 of 8192 outputs apart with the fixed parameters, 0.74% one step apart with LOGISTIC + QUANTIZE
    assert fixed.max() <= 1 and requant.max() >= 1
    assert fixed.mean() < requant.mean() / 2, (fixed.mean(), requant.mean())


def test_a_narrow_sigmoid_range_keeps_its_scale_and_a_replayed_plan_gives_the_same_bytes(tmp_path):
    # a gate that stays below ~0.1: its range [0, 0.1] has a step 10x finer than 1/256, which it keeps
    narrow = lowbit.quantize(_silu(0.05, -3.0), calib=_x(1, 32), progress=False).model
    scale, _ = _sigmoid_params(narrow)
    assert scale < 1 / 512
    lowbit.quantize(_silu(), tmp_path / "a.onnx", calib=_x(1, 32), progress=False)
    lowbit.quantize(_silu(), tmp_path / "b.onnx", plan=tmp_path / "a.plan.json", progress=False)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert _sigmoid_params(onnx.load(str(tmp_path / "b.onnx"))) == (1 / 256, 0)


def test_a_sigmoid_model_output_keeps_its_calibrated_scale():
    # a probability map: thresholds at 0.5 would sit on the 1/256 grid; the .tflite requantizes after LOGISTIC
    model = _silu()
    model.graph.output[0].name = "s"
    del model.graph.node[-1]  # the SiLU Mul: the Sigmoid's output is the model's
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 8
    qmodel = lowbit.quantize(model, calib=_x(1, 32), progress=False).model
    assert _sigmoid_params(qmodel) != (1 / 256, 0)
    assert convert(qmodel).ops["QUANTIZE"] == 2  # the input's, and LOGISTIC's 1/256 to the model's scale
