"""Transformer blocks: tensors whose calibrated range reaches a sentinel (-1e4, float32's lowest) stay float, and so
do Add/Mul whose output only float ops read (the residual Add before LayerNormalization)."""

from __future__ import annotations

import numpy as np
import pytest

import lowbit
from helpers import model, node, rel_rms, rng, run, weight


def _attention(sentinel: float):
    """scores = x Wq (x Wk)^T + mask, mask = Where(keep, 0, sentinel) over the key axis; out = softmax(scores) x Wv."""
    inits = {
        "wq": weight((8, 8), 1),
        "wk": weight((8, 8), 2),
        "wv": weight((8, 8), 3),
        "zero": np.zeros((), np.float32),
        "hide": np.array(sentinel, np.float32),
        "ax": np.array([1]),
    }
    nodes = [
        node("MatMul", ["x", "wq"], ["q"]),
        node("MatMul", ["x", "wk"], ["k"]),
        node("MatMul", ["x", "wv"], ["v"]),
        node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        node("MatMul", ["q", "kt"], ["s"]),
        node("Cast", ["keep"], ["keepb"], to=9),
        node("Where", ["keepb", "zero", "hide"], ["m2"]),
        node("Unsqueeze", ["m2", "ax"], ["m"]),
        node("Add", ["s", "m"], ["sm"], name="mask_add"),
        node("Softmax", ["sm"], ["p"], axis=-1),
        node("MatMul", ["p", "v"], ["y"]),
    ]
    return model(nodes, {"x": (1, 6, 8), "keep": (1, 6)}, {"y": (1, 6, 8)}, inits)


def _feeds(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    r = rng(seed)
    out = []
    for i in range(n):
        keep = np.ones((1, 6), np.float32)
        keep[0, 6 - i % 3 :] = 0  # 0, 1 or 2 padded positions
        out.append({"x": r.normal(0, 1, (1, 6, 8)).astype(np.float32), "keep": keep})
    return out


@pytest.mark.parametrize("sentinel", [float(np.finfo(np.float32).min), -1e4])
def test_mask_add_stays_float_and_output_is_sane(sentinel: float) -> None:
    m = _attention(sentinel)
    res = lowbit.quantize(m, calib=_feeds(24, 1), progress=False)
    add = res.plan.nodes["mask_add"]
    assert not add.quantized and add.reason.startswith("calibrated range reaches")
    assert not res.plan.nodes["Softmax_p"].quantized  # its input holds the sentinel too
    assert res.plan.nodes["MatMul_s"].quantized  # the scores' MatMul is still int8
    feeds = _feeds(12, 7)
    ref = run(m, feeds, float_model=True)[0]
    for mode in ("simulate", "kernels"):
        assert rel_rms(ref, run(res.model, feeds, mode=mode)[0]) < 0.05


def test_plan_reuse_keeps_the_mask_float(tmp_path) -> None:
    m = _attention(float(np.finfo(np.float32).min))
    lowbit.quantize(m, tmp_path / "a.onnx", calib=_feeds(24, 1), progress=False)
    again = lowbit.quantize(m, tmp_path / "b.onnx", plan=tmp_path / "a.plan.json", progress=False)
    assert not again.plan.nodes["mask_add"].quantized
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_residual_add_before_layernorm_stays_float() -> None:
    # x W + b + x -> LayerNorm -> W2: the two Adds feed only the float LayerNorm (directly or through each other)
    inits = {
        "w": weight((8, 8), 1),
        "b": weight((8,), 2),
        "g": np.ones(8, np.float32),
        "beta": np.zeros(8, np.float32),
        "w2": weight((8, 8), 3),
    }
    nodes = [
        node("MatMul", ["x", "w"], ["h"]),
        node("Add", ["h", "b"], ["hb"], name="bias"),
        node("Add", ["hb", "x"], ["r"], name="residual"),
        node("LayerNormalization", ["r", "g", "beta"], ["n"], axis=-1),
        node("MatMul", ["n", "w2"], ["y"]),
        node("Add", ["y", "b"], ["z"], name="kept"),
    ]
    m = model(nodes, {"x": (1, 6, 8)}, {"z": (1, 6, 8)}, inits)
    res = lowbit.quantize(m, calib=[{"x": f["x"]} for f in _feeds(16, 1)], progress=False)
    for name in ("bias", "residual"):
        assert not res.plan.nodes[name].quantized and "only float ops" in res.plan.nodes[name].reason
    assert res.plan.nodes["kept"].quantized  # a model output: kept as before
    assert res.plan.nodes["MatMul_h"].quantized and res.plan.nodes["MatMul_y"].quantized


def test_mask_never_padded_in_calibration_still_stays_float() -> None:
    # Calibration without padding never sees the sentinel; the mask constant upstream still marks the tensors.
    m = _attention(float(np.finfo(np.float32).min))
    unpadded = [{**f, "keep": np.ones((1, 6), np.float32)} for f in _feeds(24, 1)]
    res = lowbit.quantize(m, calib=unpadded, progress=False)
    assert not res.plan.nodes["mask_add"].quantized and "mask constant" in res.plan.nodes["mask_add"].reason
    assert res.plan.nodes["MatMul_s"].quantized
    feeds = _feeds(12, 7)  # padded at inference
    ref = run(m, feeds, float_model=True)[0]
    assert rel_rms(ref, run(res.model, feeds, mode="kernels")[0]) < 0.05
