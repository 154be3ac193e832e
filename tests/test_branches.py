"""A model whose body sits inside an If on a runtime value (Silero VAD's sample-rate switch): the branch the
calibration data takes is quantized as a model of its own, the other stays float with a note, and a plan re-applies
both decisions byte for byte."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import lowbit
from helpers import run, weight


def _branch(tag: str, seed: int) -> onnx.GraphProto:
    """x -> Conv 3x3 -> Relu -> Conv 1x1 -> y_<tag>: weights held by the branch itself, as exporters inline them."""
    inits = [
        numpy_helper.from_array(weight((8, 3, 3, 3), seed), f"{tag}_w1"),
        numpy_helper.from_array(np.zeros(8, np.float32), f"{tag}_b1"),
        numpy_helper.from_array(weight((4, 8, 1, 1), seed + 1), f"{tag}_w2"),
    ]
    nodes = [
        helper.make_node(
            "Conv", ["x", f"{tag}_w1", f"{tag}_b1"], [f"{tag}_c1"], pads=[1, 1, 1, 1], name=f"{tag}_conv1"
        ),
        helper.make_node("Relu", [f"{tag}_c1"], [f"{tag}_r1"], name=f"{tag}_relu"),
        helper.make_node("Conv", [f"{tag}_r1", f"{tag}_w2"], [f"{tag}_y"], name=f"{tag}_conv2"),
    ]
    out = helper.make_tensor_value_info(f"{tag}_y", TensorProto.FLOAT, None)
    return helper.make_graph(nodes, f"{tag}_branch", [], [out], inits)


def _switch_model() -> onnx.ModelProto:
    rate = numpy_helper.from_array(np.array(16000, np.int64), "rate16k")
    nodes = [
        helper.make_node("Equal", ["sr", "rate16k"], ["is16k"], name="is16k"),
        helper.make_node(
            "If", ["is16k"], ["y"], name="switch", then_branch=_branch("hi", 1), else_branch=_branch("lo", 5)
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "switch",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [rate],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    return m


def _feeds(n: int, seed: int, sr: int = 16000) -> list[dict[str, np.ndarray]]:
    r = np.random.default_rng(seed)
    return [{"x": r.normal(0, 1, (1, 3, 8, 8)).astype(np.float32), "sr": np.array(sr, np.int64)} for _ in range(n)]


def _branch_nodes(m: onnx.ModelProto, branch: str) -> list[onnx.NodeProto]:
    switch = next(n for n in m.graph.node if n.op_type == "If")
    return list(next(a.g for a in switch.attribute if a.name == branch).node)


def _subgraph_ops(m: onnx.ModelProto, branch: str) -> list[str]:
    return [n.op_type for n in _branch_nodes(m, branch)]


def test_the_branch_the_data_takes_is_quantized_and_the_other_stays_float(tmp_path: Path) -> None:
    m = _switch_model()
    res = lowbit.quantize(m, tmp_path / "q.onnx", calib=_feeds(16, 1), progress=False)
    onnx.checker.check_model(res.model)
    assert "QuantizeLinear" in _subgraph_ops(res.model, "then_branch")
    assert "QuantizeLinear" not in _subgraph_ops(res.model, "else_branch")
    assert res.plan.nodes["hi_conv1"].quantized and res.plan.nodes["hi_conv2"].quantized
    assert "lo_conv1" not in res.plan.nodes
    assert any("else branch of If 'switch' stays float" in w and "no calibration batch" in w for w in res.warnings)
    for sr in (16000, 8000):  # both branches still run; the quantized one stays close to float
        ref = run(m, _feeds(32, 9, sr), float_model=True)[0]
        got = run(res.model, _feeds(32, 9, sr), mode="kernels")[0]
        cos = float(np.dot(ref.ravel(), got.ravel()) / np.linalg.norm(ref) / np.linalg.norm(got))
        assert cos > (0.999 if sr == 16000 else 0.999999), (sr, cos)  # measured 0.9995 quantized


def test_a_plan_requantizes_the_branch_without_data(tmp_path: Path) -> None:
    m = _switch_model()
    lowbit.quantize(m, tmp_path / "a.onnx", calib=_feeds(16, 1), progress=False)
    again = lowbit.quantize(m, tmp_path / "b.onnx", plan=tmp_path / "a.plan.json", progress=False)
    assert again.plan.nodes["hi_conv1"].quantized
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_each_branch_reads_what_it_uses_from_the_enclosing_graph() -> None:
    from lowbit.branches import runtime_ifs

    found = {(b.node, b.attr): b.reads for b in runtime_ifs(_switch_model())}
    assert found == {("switch", "then_branch"): ["x"], ("switch", "else_branch"): ["x"]}


@pytest.mark.slow
def test_silero_vad_v5_is_quantized_inside_its_sample_rate_switch(tmp_path: Path) -> None:
    """silero-vad 6.2.3's model: the whole network inside an If on the 0-d sample rate. Both branches are
    calibrated (espeak-ng speech at 16 and 8 kHz) and agree with float on speech / no speech (p > 0.5)."""
    from lowbit_zoo.corpus.registry import BY_NAME, ROOT

    entry = BY_NAME["silero_vad"]
    path = entry.get(ROOT)
    res = lowbit.quantize(path, tmp_path / "q.onnx", calib=entry.calib(path), progress=False, batch_axes={"state": 1})
    for branch in ("then_branch", "else_branch"):
        assert "QuantizeLinear" in _subgraph_ops(res.model, branch) or any(
            n.op_type == "If" for n in _branch_nodes(res.model, branch)
        )
    assert res.quantized_bytes < 0.75 * res.float_bytes  # measured 67%
    held = entry.eval(path)
    ref, got = ort.InferenceSession(str(path)), ort.InferenceSession(str(tmp_path / "q.onnx"))
    for rate in (16000, 8000):
        feeds = [f for f in held if int(f["sr"]) == rate]
        p = np.array([ref.run(None, f)[0].item() for f in feeds])
        q = np.array([got.run(None, f)[0].item() for f in feeds])
        assert 0.2 < np.mean(p > 0.5) < 0.8  # the data holds speech and silence
        # measured with the default (layer_error_fast): agreement 100% at both rates, mean difference 0.017 / 0.018
        # and largest 0.31 / 0.16 (16 / 8 kHz); min-max ranges give mean 0.023 / 0.017 and largest 0.14 / 0.09
        assert np.mean((p > 0.5) == (q > 0.5)) >= 0.95, rate
        assert np.abs(p - q).mean() < 0.03, rate
        assert np.abs(p - q).max() < 0.4, rate


def test_an_unnamed_if_is_found_and_replaced() -> None:
    m = _switch_model()
    for n in m.graph.node:
        n.name = ""
    res = lowbit.quantize(m, calib=_feeds(16, 1), progress=False)
    assert "QuantizeLinear" in _subgraph_ops(res.model, "then_branch")
    assert any("else branch of If 'If_1' stays float" in w for w in res.warnings)


def _untyped_inner(tag: str, seed: int) -> onnx.GraphProto:
    """x -> MatMul -> com.microsoft Gelu: ONNX shape inference knows no contrib op, so the output has no type."""
    inits = [numpy_helper.from_array(weight((16, 16), seed), f"{tag}_w")]
    nodes = [
        helper.make_node("MatMul", ["x", f"{tag}_w"], [f"{tag}_m"], name=f"{tag}_matmul"),
        helper.make_node("Gelu", [f"{tag}_m"], [f"{tag}_y"], name=f"{tag}_gelu", domain="com.microsoft"),
    ]
    return helper.make_graph(nodes, f"{tag}_branch", [], [onnx.ValueInfoProto(name=f"{tag}_y")], inits)


def _nested_model() -> onnx.ModelProto:
    """If (sr == 16 kHz) -> [inner If (sr < 20 kHz) -> MatMul + contrib Gelu | ...] | float MatMul: the inner If's
    outputs, and so the outer branch's, carry no type, as Silero VAD's LSTM branch two Ifs deep."""
    outer_then = helper.make_graph(
        [
            helper.make_node("Less", ["sr", "rate20k"], ["below"], name="below"),
            helper.make_node(
                "If",
                ["below"],
                ["inner_y"],
                name="inner",
                then_branch=_untyped_inner("a", 1),
                else_branch=_untyped_inner("b", 3),
            ),
        ],
        "outer_then",
        [],
        [onnx.ValueInfoProto(name="inner_y")],
    )
    outer_else = _untyped_inner("c", 5)
    graph = helper.make_graph(
        [
            helper.make_node("Equal", ["sr", "rate16k"], ["is16k"], name="is16k"),
            helper.make_node("If", ["is16k"], ["y"], name="switch", then_branch=outer_then, else_branch=outer_else),
        ],
        "nested",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])],
        [
            numpy_helper.from_array(np.array(16000, np.int64), "rate16k"),
            numpy_helper.from_array(np.array(20000, np.int64), "rate20k"),
        ],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )


def _inner_then_ops(m: onnx.ModelProto) -> list[str]:
    inner = next(n for n in _branch_nodes(m, "then_branch") if n.op_type == "If")
    return [n.op_type for n in next(a.g for a in inner.attribute if a.name == "then_branch").node]


def test_a_nested_if_with_untyped_outputs_is_typed_from_calibration_and_quantized(tmp_path: Path) -> None:
    m = _nested_model()
    feeds = [{"x": f["x"].reshape(1, -1)[:, :16].copy(), "sr": f["sr"]} for f in _feeds(16, 1)]
    res = lowbit.quantize(m, tmp_path / "q.onnx", calib=feeds, progress=False)
    assert not any("no known type" in w for w in res.warnings), res.warnings
    assert "QuantizeLinear" in _inner_then_ops(res.model)
    assert res.plan.nodes["a_matmul"].quantized
    test = [{"x": f["x"].reshape(1, -1)[:, :16].copy(), "sr": f["sr"]} for f in _feeds(16, 9)]
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    got = ort.InferenceSession(res.model.SerializeToString(), providers=["CPUExecutionProvider"])
    r = np.concatenate([ref.run(None, f)[0] for f in test])
    q = np.concatenate([got.run(None, f)[0] for f in test])
    assert not np.array_equal(r, q)  # the branch the data takes runs quantized...
    cos = float(np.dot(r.ravel(), q.ravel()) / np.linalg.norm(r) / np.linalg.norm(q))
    assert cos > 0.99, cos  # ...and stays close to float


def _lstm_branch(tag: str, seed: int) -> onnx.GraphProto:
    """seq [T, N, 8] -> LSTM (hidden 8) -> Y [T, 1, N, 8]; weights sliced out of one constant, as exporters do."""
    big = weight((1, 64, 8), seed)
    nodes = [
        helper.make_node("Constant", [], [f"{tag}_all"], value=numpy_helper.from_array(big)),
        helper.make_node("Constant", [], [f"{tag}_lo"], value=numpy_helper.from_array(np.array([0], np.int64))),
        helper.make_node("Constant", [], [f"{tag}_mid"], value=numpy_helper.from_array(np.array([32], np.int64))),
        helper.make_node("Constant", [], [f"{tag}_hi"], value=numpy_helper.from_array(np.array([64], np.int64))),
        helper.make_node("Constant", [], [f"{tag}_ax"], value=numpy_helper.from_array(np.array([1], np.int64))),
        helper.make_node("Slice", [f"{tag}_all", f"{tag}_lo", f"{tag}_mid", f"{tag}_ax"], [f"{tag}_W"]),
        helper.make_node("Slice", [f"{tag}_all", f"{tag}_mid", f"{tag}_hi", f"{tag}_ax"], [f"{tag}_R"]),
        helper.make_node("LSTM", ["seq", f"{tag}_W", f"{tag}_R"], [f"{tag}_y"], hidden_size=8, name=f"{tag}_lstm"),
    ]
    return helper.make_graph(nodes, f"{tag}_branch", [], [onnx.ValueInfoProto(name=f"{tag}_y")])


def test_a_branch_with_nothing_quantized_is_left_as_it_was(tmp_path: Path) -> None:
    """An LSTM has no static form: the branch holding it stays float with that reason, as exported (not with
    prepare's folded copy of its weights beside the originals)."""
    graph = helper.make_graph(
        [
            helper.make_node("Equal", ["sr", "rate16k"], ["is16k"], name="is16k"),
            helper.make_node(
                "If",
                ["is16k"],
                ["y"],
                name="switch",
                then_branch=_lstm_branch("p", 1),
                else_branch=_lstm_branch("q", 2),
            ),
        ],
        "lstm_switch",
        [
            helper.make_tensor_value_info("seq", TensorProto.FLOAT, [4, "N", 8]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 1, "N", 8])],
        [numpy_helper.from_array(np.array(16000, np.int64), "rate16k")],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    r = np.random.default_rng(0)
    feeds = [{"seq": r.normal(0, 1, (4, 1, 8)).astype(np.float32), "sr": np.array(16000, np.int64)} for _ in range(8)]
    res = lowbit.quantize(m, tmp_path / "q.onnx", calib=feeds, progress=False, batch_axes={"seq": 1})
    # the branch's own run folds the Slices away into new float weights; the branch is kept as it was instead
    assert _subgraph_ops(res.model, "then_branch") == ["Slice", "Slice", "LSTM"]
    assert any("then branch of If 'switch' stays float: LSTM" in w for w in res.warnings), res.warnings


def test_dynamic_quantizes_the_untaken_twin_typed_from_the_taken_one(tmp_path: Path) -> None:
    """Dynamic needs no ranges: a branch no calibration batch takes is quantized too, typed from what its If returned
    (Silero VAD's two LSTM branches share weights: quantizing one only kept the float copy for the other)."""
    from lowbit.recipe import preset

    m = _nested_model()
    feeds = [{"x": f["x"].reshape(1, -1)[:, :16].copy(), "sr": f["sr"]} for f in _feeds(8, 1)]
    res = lowbit.quantize(m, tmp_path / "q.onnx", calib=feeds, recipe=preset("dynamic"), progress=False)
    assert res.plan.nodes["a_matmul"].quantized and res.plan.nodes["b_matmul"].quantized  # b: no batch takes it
    inner = next(n for n in _branch_nodes(res.model, "then_branch") if n.op_type == "If")
    for attr in ("then_branch", "else_branch"):
        ops = [n.op_type for n in next(a.g for a in inner.attribute if a.name == attr).node]
        assert "MatMulInteger" in ops or "DynamicQuantizeLinear" in ops, (attr, ops)
    static = lowbit.quantize(m, tmp_path / "s.onnx", calib=feeds, progress=False)
    assert "b_matmul" not in static.plan.nodes  # static still needs the branch's own data
    assert any("else branch of If 'inner' stays float" in w and "no calibration batch" in w for w in static.warnings)
