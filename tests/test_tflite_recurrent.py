"""LSTM and GRU export as their cell unrolled over the fixed sequence length (issue 12: the seizure EEG models'
bidirectional LSTMs, the romanizer's GRU encoder, the VAD's stateful LSTM), float as lowbit's quantizer leaves
them, and LiteRT gives what ONNX Runtime gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lowbit
from lowbit.export.tflite import export_tflite
from lowbit.runtimes.litert import LiteRTSession
from lowbit.runtimes.ort import session

SEQ, BATCH, SIZE, HIDDEN = 6, 2, 5, 4


def _rnn(op: str, direction: str, states: str, lbr: int = 0) -> onnx.ModelProto:
    """x [seq, batch, size] -> op -> Y, Y_h (, Y_c); states: "none", "const" (nonzero) or "input"."""
    n = 2 if direction == "bidirectional" else 1
    gates = 4 if op == "LSTM" else 3
    r = np.random.default_rng(3)
    inits = [
        numpy_helper.from_array(r.normal(0, 0.5, (n, gates * HIDDEN, SIZE)).astype(np.float32), "W"),
        numpy_helper.from_array(r.normal(0, 0.5, (n, gates * HIDDEN, HIDDEN)).astype(np.float32), "R"),
        numpy_helper.from_array(r.normal(0, 0.3, (n, 2 * gates * HIDDEN)).astype(np.float32), "B"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [SEQ, BATCH, SIZE])]
    names = ["h0", "c0"] if op == "LSTM" else ["h0"]
    for s in names:
        if states == "const":
            inits.append(numpy_helper.from_array(r.normal(0, 0.5, (n, BATCH, HIDDEN)).astype(np.float32), s))
        elif states == "input":
            inputs.append(helper.make_tensor_value_info(s, TensorProto.FLOAT, [n, BATCH, HIDDEN]))
    state_in = names if states != "none" else [""] * len(names)
    outs = ["y", "yh", "yc"] if op == "LSTM" else ["y", "yh"]
    attrs = {"hidden_size": HIDDEN, "direction": direction}
    if op == "GRU":
        attrs["linear_before_reset"] = lbr
    node = helper.make_node(op, ["x", "W", "R", "B", "", *state_in], outs, name="rnn", **attrs)
    shapes = {"y": [SEQ, n, BATCH, HIDDEN], "yh": [n, BATCH, HIDDEN], "yc": [n, BATCH, HIDDEN]}
    graph = helper.make_graph(
        [node], "rnn", inputs, [helper.make_tensor_value_info(o, TensorProto.FLOAT, shapes[o]) for o in outs], inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _feeds(model: onnx.ModelProto, seed: int) -> dict[str, np.ndarray]:
    r = np.random.default_rng(seed)
    return {
        vi.name: r.normal(0, 1, [d.dim_value for d in vi.type.tensor_type.shape.dim]).astype(np.float32)
        for vi in model.graph.input
    }


CASES = [
    ("LSTM", "forward", "none", 0),
    ("LSTM", "bidirectional", "input", 0),
    ("LSTM", "reverse", "const", 0),
    ("GRU", "bidirectional", "none", 1),  # PyTorch's GRU
    ("GRU", "forward", "input", 0),
    ("GRU", "reverse", "const", 1),
]


@pytest.mark.parametrize("op, direction, states, lbr", CASES)
def test_unrolled_cell_matches_onnx_runtime(tmp_path: Path, op, direction, states, lbr):
    model = _rnn(op, direction, states, lbr)
    out = tmp_path / "m.tflite"
    result = export_tflite(model, out)
    assert "FULLY_CONNECTED" in result.ops and "LOGISTIC" in result.ops and "TANH" in result.ops
    ref, lite = session(model), LiteRTSession(out, threads=1)
    for seed in range(2):
        feeds = _feeds(model, seed)
        for want, got in zip(ref.run(None, feeds), lite.run(None, feeds)):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)


def _lstm_classifier() -> onnx.ModelProto:
    """Conv1d front end -> LSTM over its time axis -> the last step's hidden state -> Gemm: the seizure models'
    shape, small."""
    r = np.random.default_rng(5)
    nodes = [
        helper.make_node("Conv", ["x", "cw"], ["c"], pads=[1, 1], name="conv"),
        helper.make_node("Relu", ["c"], ["cr"], name="relu"),
        helper.make_node("Transpose", ["cr"], ["t"], perm=[2, 0, 1], name="to_time"),
        helper.make_node("LSTM", ["t", "W", "R", "B"], ["y", "yh"], hidden_size=8, name="lstm"),
        helper.make_node("Reshape", ["yh", "flat"], ["h"], name="flat"),
        helper.make_node("Gemm", ["h", "fw", "fb"], ["logits"], transB=1, name="fc"),
    ]
    inits = [
        numpy_helper.from_array(r.normal(0, 0.4, (6, 3, 3)).astype(np.float32), "cw"),
        numpy_helper.from_array(r.normal(0, 0.4, (1, 32, 6)).astype(np.float32), "W"),
        numpy_helper.from_array(r.normal(0, 0.4, (1, 32, 8)).astype(np.float32), "R"),
        numpy_helper.from_array(r.normal(0, 0.2, (1, 64)).astype(np.float32), "B"),
        numpy_helper.from_array(np.array([1, 8], np.int64), "flat"),
        numpy_helper.from_array(r.normal(0, 0.5, (3, 8)).astype(np.float32), "fw"),
        numpy_helper.from_array(np.zeros(3, np.float32), "fb"),
    ]
    graph = helper.make_graph(
        nodes,
        "clf",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 12])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_int8_model_with_an_lstm_exports_without_fallback(tmp_path: Path):
    model = _lstm_classifier()
    r = np.random.default_rng(0)
    q = tmp_path / "q.onnx"
    lowbit.quantize(model, q, calib=[r.normal(0, 1, (1, 3, 12)).astype(np.float32) for _ in range(32)], progress=False)
    out = tmp_path / "q.tflite"
    result = export_tflite(q, out)
    assert result.fallbacks == []
    # float in the int8 ONNX too, with what reads its float state: reported once, not per unrolled step
    assert result.float_nodes[0] == "lstm (LSTM)" and len(result.float_nodes) <= 3, result.float_nodes
    assert result.ops["CONV_2D"] == 1 and "QUANTIZE" in result.ops
    ref, lite = session(q), LiteRTSession(out, threads=1)
    xs = [r.normal(0, 1, (1, 3, 12)).astype(np.float32) for _ in range(16)]
    want = np.concatenate([ref.run(None, {"x": x})[0] for x in xs])
    got = np.concatenate([lite.run(None, {"x": x})[0] for x in xs])
    assert (want.argmax(1) == got.argmax(1)).mean() >= 15 / 16
    cos = (want * got).sum(1) / np.linalg.norm(want, axis=1) / np.linalg.norm(got, axis=1)
    assert cos.min() > 0.999
