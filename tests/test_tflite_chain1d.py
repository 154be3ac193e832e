"""1-D conv chains stay in the expanded (N, L, 1, C) layout between convs (issue 12: each CONV_2D from a 1-D conv
had a RESHAPE and a TRANSPOSE on both sides). The chain here has what sits between a U-Net's 1-D convs: ReLU,
an unfused BatchNorm1d, GELU, a residual Add with a per-channel constant, a Concat skip and a Slice."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lowbit
from lowbit.export.tflite import convert
from test_tflite import run_ort, run_tflite
from test_tflite_rewrites import _bn, _w


def _chain() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Conv", ["x", "a_w", "a_b"], ["a"], pads=[1, 1], name="a"),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("BatchNormalization", ["r", "gamma", "beta", "mean", "var"], ["n"], name="bn"),
        helper.make_node("Conv", ["n", "b_w"], ["b"], pads=[1, 1], name="b"),
        helper.make_node("Gelu", ["b"], ["g"], name="gelu", domain=""),
        helper.make_node("Add", ["g", "a"], ["s"], name="residual"),
        helper.make_node("Mul", ["s", "gain"], ["m"], name="gain"),
        helper.make_node("Concat", ["m", "r"], ["c"], axis=-2, name="skip"),
        helper.make_node("Slice", ["c", "starts", "ends", "axes"], ["t"], name="crop"),
        helper.make_node("Conv", ["t", "c_w"], ["y"], pads=[0, 0], strides=[2], kernel_shape=[2], name="c"),
    ]
    inits = [
        _w("a_w", (6, 3, 3), 4),
        _w("a_b", (6,), 5, 0.1),
        _w("b_w", (6, 6, 3), 6),
        _w("c_w", (4, 12, 2), 7),
        numpy_helper.from_array(np.linspace(0.5, 1.5, 6, dtype=np.float32).reshape(6, 1), "gain"),
        numpy_helper.from_array(np.array([1], np.int64), "starts"),
        numpy_helper.from_array(np.array([31], np.int64), "ends"),
        numpy_helper.from_array(np.array([-1], np.int64), "axes"),
        *_bn(6),
    ]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 15])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 9
    return model


def _x(seed: int, n: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, 3, 32)).astype(np.float32)


def _without_pass(monkeypatch: pytest.MonkeyPatch, model, **kw):
    import importlib

    mod = importlib.import_module("lowbit.export.tflite.convert")  # the module (the package exports the function)
    monkeypatch.setattr(mod, "keep_expanded", lambda *a, **k: 0)
    return mod.convert(model, **kw)


def test_float_chain_has_one_transpose_at_each_end_and_matches_ort(monkeypatch):
    model = _chain()
    result = convert(model)
    before = _without_pass(monkeypatch, model)
    # one expand + transpose where the chain starts, one transpose + squeeze where it ends
    assert result.ops["TRANSPOSE"] == 2 and result.ops["RESHAPE"] == 2, result.ops
    assert before.ops["TRANSPOSE"] == 8, before.ops  # each of the 3 convs and the BatchNorm wrapped in a pair
    x = _x(1)
    np.testing.assert_allclose(run_tflite(result.data, x), run_ort(model, x), rtol=1e-4, atol=1e-5)


def test_int8_chain_computes_the_same_integers_as_without_the_pass(monkeypatch):
    model = _chain()
    qmodel = lowbit.quantize(model, calib=[_x(0, 32)], progress=False).model
    result = convert(qmodel)
    assert not result.fallbacks and not result.float_nodes, result.to_dict()
    assert result.ops["TRANSPOSE"] == 2, result.ops
    before = _without_pass(monkeypatch, qmodel)
    for seed in range(4):  # the layout changed, not one integer
        x = _x(10 + seed)
        np.testing.assert_array_equal(run_tflite(result.data, x), run_tflite(before.data, x))
    # and it is the int8 ONNX's answer, within a step of the output
    x = _x(20)
    ref = run_ort(qmodel, x)
    step = float(np.abs(ref).max()) / 100
    assert np.abs(run_tflite(result.data, x) - ref).max() <= 2 * step
