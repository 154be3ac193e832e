"""TFLite export details from issue 12: 0-d quantized constants, a Reshape whose scales differ, the classifier's
last layer full-integer when its output range is known, HardSigmoid's float forms."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lowbit
from lowbit.export.tflite import convert
from lowbit.runtimes.ort import session
from test_tflite import run_ort, run_tflite
from test_tflite_rewrites import _inputs, build


def _qdq_scalar_model() -> onnx.ModelProto:
    """x -> Q/DQ -> Add(x, DQ(int8 0-d) * 2.0) -> Q/DQ -> y: a constant subgraph on a 0-d quantized scalar, as
    in detector heads (YOLOv8's stride multiply)."""
    inits = [
        numpy_helper.from_array(np.array(0.02, np.float32), "s"),
        numpy_helper.from_array(np.array(0, np.int8), "z"),
        numpy_helper.from_array(np.array(50, np.int8), "k_q"),
        numpy_helper.from_array(np.array(0.01, np.float32), "k_s"),
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
        helper.make_node("DequantizeLinear", ["k_q", "k_s"], ["k"]),
        helper.make_node("Mul", ["k", "two"], ["k2"], name="stride"),
        helper.make_node("Add", ["xd", "k2"], ["a"], name="add"),
        helper.make_node("QuantizeLinear", ["a", "s", "z"], ["aq"]),
        helper.make_node("DequantizeLinear", ["aq", "s", "z"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "t",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_constant_folding_on_a_0d_quantized_constant():
    model = _qdq_scalar_model()
    result = convert(model, allow_float_fallback=True)  # crashed: "Unable to handle object of type numpy.float32"
    x = np.random.default_rng(0).uniform(-1, 1, (1, 6)).astype(np.float32)
    np.testing.assert_allclose(run_tflite(result.data, x, dequantize=True), run_ort(model, x), atol=0.0201)


def _rescale_output(qmodel: onnx.ModelProto, value: str, factor: float) -> onnx.ModelProto:
    """Give `value`'s QuantizeLinear/DequantizeLinear pair its own scale, `factor` times the old one (what other
    quantizers and hand-edited models do around a Reshape)."""
    out = onnx.ModelProto()
    out.CopyFrom(qmodel)
    q = next(n for n in out.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == value)
    dq = next(n for n in out.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0])
    old = next(t for t in out.graph.initializer if t.name == q.input[1])
    out.graph.initializer.append(
        numpy_helper.from_array(numpy_helper.to_array(old) * np.float32(factor), f"{value}_own_scale")
    )
    q.input[1] = dq.input[1] = f"{value}_own_scale"
    return out


def test_reshape_with_its_own_output_scale_gets_a_requantize():
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("Reshape", ["c", "shape"], ["r"], name="flat"),
        helper.make_node("Relu", ["r"], ["y"], name="relu"),
    ]
    inits = [
        numpy_helper.from_array(np.random.default_rng(1).normal(0, 0.4, (4, 4, 1, 1)).astype(np.float32), "w"),
        numpy_helper.from_array(np.array([1, -1], np.int64), "shape"),
    ]
    graph = helper.make_graph(
        nodes,
        "t",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = np.random.default_rng(0).normal(0, 1, (16, 4, 4, 4)).astype(np.float32)
    qmodel = _rescale_output(lowbit.quantize(model, calib=[x], progress=False).model, "r", 1.7)
    result = convert(qmodel)
    assert not result.fallbacks and not result.float_nodes
    assert result.ops["QUANTIZE"] == 2 and result.ops["RESHAPE"] == 1  # the input edge, and the requantize
    xs = x[:1]
    y = run_tflite(result.data, xs)
    ref = session(qmodel, "kernels").run(None, {"x": xs})[0]
    step = float(onnx.numpy_helper.to_array(next(t for t in qmodel.graph.initializer if t.name == "r_own_scale")))
    assert np.abs(y - ref).max() <= step * 1.01


def test_float_io_classifier_runs_int8_when_calib_or_plan_gives_the_output_range(tmp_path: Path):
    from conftest import tiny_cnn

    model = tiny_cnn()
    calib = _inputs(model, 1, 32)
    path = tmp_path / "q.onnx"
    qmodel = lowbit.quantize(model, path, calib=[calib], progress=False).model
    plain = convert(qmodel)  # a model without its plan: no range known, the classifier stays float
    assert plain.float_nodes == ["fc (Gemm)"]
    full = convert(path, calib=[calib])
    assert not full.float_nodes and full.ops["DEQUANTIZE"] == 1 and full.ops["QUANTIZE"] == 1
    assert sum(full.ops.values()) < sum(plain.ops.values())
    x = _inputs(model, 2, 1)
    ref = session(qmodel, "kernels").run(None, {"x": x})[0]
    y = run_tflite(full.data, x)
    assert np.abs(y - ref).max() <= 1.01 * float(np.ptp(ref)) / 255 + 1e-6  # one output step of the new range
    # the plan's output range (what quantize records): no calib needed; the same range gives the same bytes
    plan_file = path.with_name("q.plan.json")
    plan = json.loads(plan_file.read_text())
    assert set(plan["output_ranges"]) == {"y"}
    assert not convert(path).float_nodes
    y_calib = session(qmodel, "kernels").run(None, {"x": calib})[0]
    plan["output_ranges"]["y"] = [float(y_calib.min()), float(y_calib.max())]
    plan_file.write_text(json.dumps(plan))
    from_plan = convert(path)
    assert not from_plan.float_nodes and from_plan.data == full.data


@pytest.mark.parametrize("precision", ["float16", "dynamic"])
def test_hardsigmoid_float_forms(precision):
    model = build("se_hardsigmoid")
    result = convert(model, precision=precision)
    assert {"MUL", "ADD", "MAXIMUM", "MINIMUM"} <= set(result.ops)
    x = _inputs(model, 1, 1)
    y = run_tflite(result.data, x).transpose(0, 3, 1, 2)
    ref = run_ort(model, x)
    assert np.abs(y - ref).max() <= 2e-2 * np.abs(ref).max()


def _if_model(cond: bool) -> onnx.ModelProto:
    """conv -> If(constant) {then: Relu, else: Sigmoid} -> conv: a graph wrapped in an If, as some exporters do."""
    value = helper.make_tensor_value_info
    then_g = helper.make_graph(
        [helper.make_node("Relu", ["c"], ["t"])], "then", [], [value("t", TensorProto.FLOAT, None)]
    )
    else_g = helper.make_graph(
        [helper.make_node("Sigmoid", ["c"], ["e"])], "else", [], [value("e", TensorProto.FLOAT, None)]
    )
    w = np.random.default_rng(0).normal(0, 0.4, (4, 4, 1, 1)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("Constant", [], ["cond"], value=numpy_helper.from_array(np.array(cond))),
        helper.make_node("If", ["cond"], ["i"], then_branch=then_g, else_branch=else_g, name="if"),
        helper.make_node("Conv", ["i", "w"], ["y"], name="conv2"),
    ]
    graph = helper.make_graph(
        nodes,
        "t",
        [value("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [value("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("cond", [True, False])
def test_if_with_a_constant_condition_exports_the_taken_branch(cond: bool):
    model = _if_model(cond)
    x = np.random.default_rng(1).normal(0, 1, (1, 4, 8, 8)).astype(np.float32)
    result = convert(model)
    assert ("LOGISTIC" in result.ops) == (not cond)
    np.testing.assert_allclose(run_tflite(result.data, x).transpose(0, 3, 1, 2), run_ort(model, x), atol=1e-5)
    calib = np.random.default_rng(2).normal(0, 1, (16, 4, 8, 8)).astype(np.float32)
    qmodel = lowbit.quantize(model, calib=[calib], progress=False).model
    result = convert(qmodel)
    assert not result.fallbacks
    y = run_tflite(result.data, x).transpose(0, 3, 1, 2)
    ref = session(qmodel, "kernels").run(None, {"x": x})[0]
    assert np.abs(y - ref).max() <= 2 * float(np.ptp(ref)) / 255


def _written_out_hard_swish() -> onnx.ModelProto:
    """conv -> x * Clip(x + 3, 0, 6) / 6, as tf2onnx and paddle2onnx write hard-swish (opset 11)."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.8, (4, 4, 1, 1)).astype(np.float32), "w"),
        numpy_helper.from_array(np.float32(3), "three"),
        numpy_helper.from_array(np.float32(0), "zero"),
        numpy_helper.from_array(np.float32(6), "six"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("Add", ["c", "three"], ["a"], name="add"),
        helper.make_node("Clip", ["a", "zero", "six"], ["k"], name="clip"),
        helper.make_node("Mul", ["c", "k"], ["m"], name="mul"),
        helper.make_node("Div", ["m", "six"], ["y"], name="div"),
    ]
    value = helper.make_tensor_value_info
    graph = helper.make_graph(
        nodes, "t", [value("x", TensorProto.FLOAT, [1, 4, 8, 8])], [value("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 7
    return model


def test_written_out_hard_swish_becomes_one_hard_swish():
    model = _written_out_hard_swish()
    x = np.random.default_rng(1).normal(0, 2, (1, 4, 8, 8)).astype(np.float32)
    result = convert(model)
    assert result.ops == {"CONV_2D": 1, "HARD_SWISH": 1}
    np.testing.assert_allclose(run_tflite(result.data, x).transpose(0, 3, 1, 2), run_ort(model, x), atol=1e-5)
    # lowbit's int8 form: the Clip became the Add's output range [0, 6]; the pattern still holds
    calib = np.random.default_rng(2).normal(0, 2, (16, 4, 8, 8)).astype(np.float32)
    qmodel = lowbit.quantize(model, calib=[calib], progress=False).model
    assert "Clip" not in {n.op_type for n in qmodel.graph.node}
    result = convert(qmodel)
    assert result.ops["HARD_SWISH"] == 1 and not {"ADD", "MUL", "DIV"} & set(result.ops)
    ref = session(qmodel, "kernels").run(None, {"x": x})[0]
    y = run_tflite(result.data, x).transpose(0, 3, 1, 2)
    # ONNX rounds x + 3 to a step of 6/255 before the product; TFLite's hard-swish does not
    assert np.abs(y - ref).max() <= float(np.abs(ref).max()) * 6 / 255
