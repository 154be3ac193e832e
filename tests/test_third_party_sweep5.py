"""Patterns from the fifth sweep (TensorFlow/Keras models through tf2onnx): an NHWC graph whose Transpose pairs
around every Conv were left in place (tf2onnx 1.16's own transpose optimizer fails on Keras MobileNetV3), so the
hard-swish, Pad, squeeze-excitation mean and residual Add all ran in NHWC between Transposes."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

import lowbit
from conftest import run_cli
from helpers import rel_rms, run
from lowbit.evaluate.outputs import output_fidelity
from lowbit.passes import prepare
from lowbit.runtimes.ort import run_all, session

TO_NCHW, TO_NHWC = [0, 3, 1, 2], [0, 2, 3, 1]


def _nhwc_block() -> onnx.ModelProto:
    """x [N, 8, 8, 3] NHWC -> conv -> hard-swish -> Pad -> depthwise conv -> Relu -> SE (mean, 1x1 conv, gate) ->
    residual Add -> mean head, every Conv wrapped in tf2onnx's Transposes, every other op in NHWC."""
    r = np.random.default_rng(0)
    c = 8

    def w(*shape: int) -> np.ndarray:
        return r.normal(0, 0.4, shape).astype(np.float32)

    inits = {
        "w0": w(c, 3, 3, 3), "b0": w(c), "wd": w(c, 1, 3, 3), "bd": w(c), "ws": w(c, c, 1, 1),
        "three": np.array(3, np.float32), "zero": np.array(0, np.float32), "six": np.array(6, np.float32),
        "sixth": np.array(1 / 6, np.float32), "pads": np.array([0, 1, 1, 0, 0, 1, 1, 0], np.int64),
        "shift": w(c),  # a per-channel constant in NHWC (trailing axis): permuted when the Add moves
    }  # fmt: skip

    def t(x: str, perm: list[int], y: str) -> onnx.NodeProto:
        return helper.make_node("Transpose", [x], [y], name=f"T_{y}", perm=perm)

    nodes = [
        t("x", TO_NCHW, "x_nchw"),
        helper.make_node("Conv", ["x_nchw", "w0", "b0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
        t("c0", TO_NHWC, "c0_nhwc"),
        helper.make_node("Add", ["c0_nhwc", "three"], ["hs_a"], name="hs_add"),
        helper.make_node("Clip", ["hs_a", "zero", "six"], ["hs_c"], name="hs_clip"),
        helper.make_node("Mul", ["hs_c", "sixth"], ["hs_s"], name="hs_scale"),
        helper.make_node("Mul", ["c0_nhwc", "hs_s"], ["hs"], name="hs_mul"),
        helper.make_node("Pad", ["hs", "pads"], ["padded"], name="pad"),
        t("padded", TO_NCHW, "p_nchw"),
        helper.make_node("Conv", ["p_nchw", "wd", "bd"], ["dw"], name="dw", group=c),
        t("dw", TO_NHWC, "dw_nhwc"),
        helper.make_node("Relu", ["dw_nhwc"], ["act"], name="relu"),
        helper.make_node("ReduceMean", ["act"], ["se_mean"], name="se_mean", axes=[1, 2], keepdims=1),
        t("se_mean", TO_NCHW, "se_nchw"),
        helper.make_node("Conv", ["se_nchw", "ws"], ["se_c"], name="se_conv"),
        t("se_c", TO_NHWC, "se_nhwc"),
        helper.make_node("Sigmoid", ["se_nhwc"], ["gate"], name="gate"),
        helper.make_node("Mul", ["act", "gate"], ["se"], name="se_mul"),
        helper.make_node("Add", ["se", "hs"], ["res"], name="residual"),
        helper.make_node("Add", ["res", "shift"], ["shifted"], name="shift"),
        helper.make_node("ReduceMean", ["shifted"], ["y"], name="head", axes=[1, 2], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "nhwc",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 8, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def _feeds(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    r = np.random.default_rng(seed)
    return [{"x": r.uniform(-1, 1, (1, 8, 8, 3)).astype(np.float32)} for _ in range(n)]


def _prepared(m: onnx.ModelProto) -> onnx.ModelProto:
    model = ir.serde.deserialize_model(m)
    prepare(model)
    return ir.serde.serialize_model(model)


def test_tf2onnx_transpose_pairs_cancel_and_the_float_function_stays() -> None:
    m = _nhwc_block()
    p = _prepared(m)
    ops = Counter(n.op_type for n in p.graph.node)
    # Before: all 8 Transposes stayed, the Pad stayed outside its conv, the SE mean stayed a ReduceMean.
    # Two stay: the input's (NHWC data into the first conv) and the one before the head's mean (keepdims=0).
    assert ops["Transpose"] == 2, ops
    assert ops["Pad"] == 0 and ops["GlobalAveragePool"] >= 1 and ops["HardSwish"] == 1, ops
    feeds = _feeds(4, 1)
    x = np.concatenate([f["x"] for f in feeds])
    ref = session(m).run(None, {"x": x})[0]
    got = session(p).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_tf2onnx_nhwc_block_quantizes_without_transposes() -> None:
    m = _nhwc_block()
    res = lowbit.quantize(m, calib=_feeds(32, 1), progress=False)
    q = res.model
    ops = Counter(n.op_type for n in q.graph.node)
    assert ops["Transpose"] == 2, ops
    held = _feeds(16, 2)
    ref = run(m, held, float_model=True)[0]
    got = run(q, held, mode="kernels")[0]
    assert rel_rms(ref, got) < 0.05


def test_a_transpose_with_a_reader_that_cannot_move_is_not_duplicated() -> None:
    """A Transpose read by a Relu and a Reshape: moving the Relu would leave the original for the Reshape and add a
    second after the Relu, so nothing moves."""
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], name="t", perm=TO_NHWC),
        helper.make_node("Relu", ["t"], ["a"], name="relu"),
        helper.make_node("Reshape", ["t", "shape"], ["b"], name="flat"),
    ]
    graph = helper.make_graph(
        nodes,
        "kept",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 3, 3])],
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 3, 3, 2]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 18]),
        ],
        [numpy_helper.from_array(np.array([-1, 18], np.int64), "shape")],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    p = _prepared(m)
    assert Counter(n.op_type for n in p.graph.node)["Transpose"] == 1
    x = np.random.default_rng(0).normal(size=(2, 2, 3, 3)).astype(np.float32)
    for a, b in zip(run_all(session(m), [{"x": x}]), run_all(session(p), [{"x": x}])):
        np.testing.assert_array_equal(a, b)


def test_a_transpose_whose_sibling_reader_adds_a_plain_tensor_is_not_duplicated() -> None:
    """Relu(t) could move, but Add(t, y) with y a graph input cannot: moving the Relu alone would add a Transpose."""
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], name="t", perm=TO_NHWC),
        helper.make_node("Relu", ["t"], ["a"], name="relu"),
        helper.make_node("Add", ["t", "y"], ["b"], name="add"),
    ]
    shape = ["N", 3, 3, 2]
    graph = helper.make_graph(
        nodes,
        "sibling",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 3, 3]),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, shape),
        ],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("a", "b")],
    )
    p = _prepared(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    assert Counter(n.op_type for n in p.graph.node)["Transpose"] == 1


def test_integer_label_outputs_are_scored_by_exact_match() -> None:
    """skl2onnx classifiers (and TF graphs ending in ArgMax) output an int64 `label` beside the probabilities.
    Measured as SQNR, one wrong label of 8 read as 11 dB and a right one as inf; it is exact match now."""
    ref = np.array([0, 2, 1, 1, 0, 2, 2, 1], np.int64)
    wrong = ref.copy()
    wrong[3] = 2
    f = output_fidelity(ref, wrong, "label")
    assert f["task"]["metric"] == "exact_match" and f["task"]["value"] == 0.875 and f["task"]["poor"]
    assert output_fidelity(ref, ref.copy(), "label")["task"]["value"] == 1.0
    floats = output_fidelity(ref.astype(np.float32), wrong.astype(np.float32), "y")
    assert floats["task"]["metric"] == "sqnr_db"  # float regression values keep SQNR


def test_eval_of_a_classifier_with_a_label_output_reports_exact_match(tmp_path: Path) -> None:
    r = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["logits"], name="fc"),
        helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=1),
        helper.make_node("ArgMax", ["logits"], ["label"], name="argmax", axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 20])],
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 3]),
        ],
        [numpy_helper.from_array(r.normal(0, 1, (20, 3)).astype(np.float32), "w")],
    )
    path = tmp_path / "clf.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    data = tmp_path / "x.npy"
    np.save(data, r.normal(0, 1, (64, 20)).astype(np.float32))
    out = tmp_path / "clf.int8.onnx"
    assert run_cli("quantize", str(path), "--calib", str(data), "-o", str(out)).returncode == 0
    res = run_cli("eval", str(out), "--reference", str(path), "--data", str(data))
    assert res.returncode == 0, res.stderr
    row = next(line for line in res.stdout.splitlines() if line.startswith("label"))
    assert "exact match" in row and "SQNR dB" not in row.split("exact match")[0], row
