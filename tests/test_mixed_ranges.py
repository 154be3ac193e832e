"""Concat of inputs whose ranges do not fit one output scale (a detector head: boxes in pixels beside class
probabilities) stays float, so each input keeps its own scale; a Concat of similar ranges still shares one."""

from __future__ import annotations

import numpy as np

import lowbit
from helpers import model, node, nodes_of, run, weight
from lowbit import settle
from lowbit.decision import Reason

CLASSES = 10


def _head(box_scale: float = 320.0):
    """x -> Conv -> Relu -> {Conv -> Sigmoid -> Mul(box_scale): boxes, Conv -> Sigmoid: class probabilities}
    -> Concat on channels -> out [N, 4 + CLASSES, 8, 8], as YOLOv8's head ends."""
    inits = {
        "w0": weight((8, 3, 3, 3), 1),
        "b0": np.zeros(8, np.float32),
        "wb": weight((4, 8, 1, 1), 2),
        "wc": weight((CLASSES, 8, 1, 1), 3, scale=0.3),
        "px": np.array(box_scale, np.float32),
    }
    nodes = [
        node("Conv", ["x", "w0", "b0"], ["h0"], pads=[1, 1, 1, 1]),
        node("Relu", ["h0"], ["h"]),
        node("Conv", ["h", "wb"], ["bl"]),
        node("Sigmoid", ["bl"], ["bs"]),
        node("Mul", ["bs", "px"], ["boxes"]),
        node("Conv", ["h", "wc"], ["cl"]),
        node("Sigmoid", ["cl"], ["probs"]),
        node("Concat", ["boxes", "probs"], ["out"], name="head_concat", axis=1),
    ]
    return model(nodes, {"x": (1, 3, 8, 8)}, {"out": (1, 4 + CLASSES, 8, 8)}, inits)


def _feeds(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    r = np.random.default_rng(seed)
    return [{"x": r.normal(0, 1, (1, 3, 8, 8)).astype(np.float32)} for _ in range(n)]


def _top_class(out: np.ndarray) -> np.ndarray:
    """Per image and location, the class with the highest probability (the part after the 4 box channels)."""
    return out[:, 4:].argmax(axis=1)


def _agreement(m, q, feeds, mode: str = "simulate") -> float:
    ref, got = run(m, feeds, float_model=True)[0], run(q, feeds, mode=mode)[0]
    return float((_top_class(ref) == _top_class(got)).mean())


def test_detector_concat_stays_float_and_keeps_the_class() -> None:
    m = _head()
    res = lowbit.quantize(m, calib=_feeds(32, 1), progress=False)
    d = res.plan.nodes["head_concat"]
    assert not d.quantized and d.code is Reason.MIXED_RANGES
    assert d.details["tensor"] == "probs" and d.details["steps"] < 1
    assert "ranges too different for one scale" in d.reason
    assert res.plan.nodes["Conv_cl"].quantized and res.plan.nodes["Sigmoid_probs"].quantized
    # The Concat reads each input through its own DequantizeLinear and writes float.
    concat = nodes_of(res.model, "Concat")[0]
    assert "out" not in res.plan.tensors
    assert res.plan.tensors["probs"].scale[0] < 0.01  # its own scale, 1/255
    for mode in ("simulate", "kernels"):  # measured 97.3% in both
        agree = _agreement(m, res.model, _feeds(64, 9), mode)
        assert agree >= 0.95, (mode, agree)
    assert concat.output[0] == "out"


def test_one_shared_scale_loses_the_class(monkeypatch) -> None:
    """What happened before: with the check off, the Concat's output gets one scale (~1.25 for 0..320)."""
    monkeypatch.setattr(settle, "MIN_STEPS", 0)
    m = _head()
    res = lowbit.quantize(m, calib=_feeds(32, 1), progress=False)
    assert res.plan.nodes["head_concat"].quantized
    assert res.plan.tensors["out"].scale[0] > 1.0
    assert _agreement(m, res.model, _feeds(64, 9)) < 0.7  # measured 51%


def test_similar_ranges_share_one_scale() -> None:
    """A plain Concat of two branches of similar range (an Inception/EfficientNet-like block) stays int8."""
    m = _head(box_scale=2.0)
    res = lowbit.quantize(m, calib=_feeds(32, 1), progress=False)
    assert res.plan.nodes["head_concat"].quantized
    assert "out" in res.plan.tensors


def test_plan_replays_the_mixed_ranges_decision(tmp_path) -> None:
    m = _head()
    first = lowbit.quantize(m, tmp_path / "a.onnx", calib=_feeds(32, 1), progress=False)
    again = lowbit.quantize(m, tmp_path / "b.onnx", plan=tmp_path / "a.plan.json", progress=False)
    assert again.plan.nodes["head_concat"].code is Reason.MIXED_RANGES
    assert again.plan.nodes["head_concat"].details == first.plan.nodes["head_concat"].details
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_summary_lists_the_float_concat() -> None:
    from lowbit.cli.summary import summary_text

    res = lowbit.quantize(_head(), calib=_feeds(16, 1), progress=False)
    text = summary_text(res.plan, res.float_bytes, res.quantized_bytes, res.seconds, None)
    assert "ranges too different for one scale" in text and "head_concat" in text


def _two_level_head():
    """Two `_head`-style levels, each [boxes, probabilities] concatenated, reshaped to [1, 4 + CLASSES, 64], joined
    on the anchor axis and transposed to [1, 128, 4 + CLASSES]: how YOLOv5-style heads end (the crash this guards:
    after the level Concats stayed float, the Reshapes after them needed ranges nobody had observed)."""
    inits = {
        "w0": weight((8, 3, 3, 3), 1),
        "b0": np.zeros(8, np.float32),
        "px": np.array(320.0, np.float32),
        "shape": np.array([1, 4 + CLASSES, 64], np.int64),
    }
    nodes = [node("Conv", ["x", "w0", "b0"], ["h0"], pads=[1, 1, 1, 1]), node("Relu", ["h0"], ["h"])]
    for level in (0, 1):
        inits[f"wb{level}"] = weight((4, 8, 1, 1), 2 + level)
        inits[f"wc{level}"] = weight((CLASSES, 8, 1, 1), 4 + level, scale=0.3)
        nodes += [
            node("Conv", ["h", f"wb{level}"], [f"bl{level}"]),
            node("Sigmoid", [f"bl{level}"], [f"bs{level}"]),
            node("Mul", [f"bs{level}", "px"], [f"boxes{level}"]),
            node("Conv", ["h", f"wc{level}"], [f"cl{level}"]),
            node("Sigmoid", [f"cl{level}"], [f"probs{level}"]),
            node("Concat", [f"boxes{level}", f"probs{level}"], [f"lv{level}"], name=f"level{level}", axis=1),
            node("Reshape", [f"lv{level}", "shape"], [f"flat{level}"], name=f"reshape{level}"),
        ]
    nodes += [
        node("Concat", ["flat0", "flat1"], ["joined"], name="levels", axis=2),
        node("Transpose", ["joined"], ["out"], name="to_anchors", perm=[0, 2, 1]),
    ]
    return model(nodes, {"x": (1, 3, 8, 8)}, {"out": (1, 128, 4 + CLASSES)}, inits)


def test_data_movement_after_a_mixed_concat_stays_float(tmp_path) -> None:
    m = _two_level_head()
    res = lowbit.quantize(m, tmp_path / "q.onnx", calib=_feeds(32, 1), progress=False)
    nodes = res.plan.nodes
    assert nodes["level0"].code is Reason.MIXED_RANGES and nodes["level1"].code is Reason.MIXED_RANGES
    for name in ("levels", "to_anchors"):
        assert not nodes[name].quantized and nodes[name].code is Reason.CARRIES_MIXED, (name, nodes[name].reason)
    assert "carries the values of 'level" in nodes["to_anchors"].reason
    assert "out" not in res.plan.tensors and "joined" not in res.plan.tensors
    ref = run(m, _feeds(64, 9), float_model=True)[0]
    got = run(res.model, _feeds(64, 9), mode="kernels")[0]
    # the class probabilities keep their own 1/255 scale: top class per anchor as in float (measured 97.6%)
    agree = float((ref[..., 4:].argmax(-1) == got[..., 4:].argmax(-1)).mean())
    assert agree >= 0.95, agree
    again = lowbit.quantize(m, tmp_path / "r.onnx", plan=tmp_path / "q.plan.json", progress=False)
    assert again.plan.nodes["to_anchors"].code is Reason.CARRIES_MIXED
    assert (tmp_path / "q.onnx").read_bytes() == (tmp_path / "r.onnx").read_bytes()


def test_a_tensor_that_becomes_its_own_source_borrows_the_histogram() -> None:
    from lowbit.planner import Layout

    before = Layout(tensors={"a": "a", "moved": "a"})
    after = Layout(tensors={"moved": "moved", "b": "b"})
    histograms = {"a": object()}
    settle.borrow_ranges(before, after, histograms)
    assert histograms["moved"] is histograms["a"] and "b" not in histograms
