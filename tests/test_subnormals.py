"""Float weights full of subnormal values: reported when they stay float, set to zero with flush_subnormals."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import lowbit
from conftest import run_cli
from helpers import init, model, node, run, samples, weight
from lowbit.errors import LowbitError
from lowbit.recipe import Recipe

TINY = float(np.finfo(np.float32).tiny)


def _subnormal_weight() -> np.ndarray:
    """16x16 normal weights, 20% of them replaced by subnormals (what brainmaze-eeg modelB's LSTM holds)."""
    w = weight((16, 16), 2)
    r = np.random.default_rng(5)
    hit = r.random(w.shape) < 0.2
    w[hit] = (r.uniform(0.01, 0.9, hit.sum()) * TINY * np.sign(r.standard_normal(hit.sum()))).astype(np.float32)
    return w


def _model() -> onnx.ModelProto:
    """x -> MatMul (w1, quantized) -> MatMul "slow" (w2 with subnormals) -> y."""
    nodes = [node("MatMul", ["x", "w1"], ["h"]), node("MatMul", ["h", "w2"], ["y"], name="slow")]
    return model(nodes, {"x": (1, 4, 16)}, {"y": (1, 4, 16)}, {"w1": weight((16, 16), 1), "w2": _subnormal_weight()})


def test_weights_left_float_are_reported() -> None:
    m = _model()
    res = lowbit.quantize(m, calib=samples(m, 8), recipe=Recipe(exclude_names=("slow",)), progress=False)
    assert len(res.warnings) == 1
    text = res.warnings[0]
    assert "'w2'" in text and "'w1'" not in text and "--flush-subnormals" in text
    frac = float(text.split("'w2' (")[1].split("%")[0]) / 100
    w2 = _subnormal_weight()
    assert frac == pytest.approx(np.mean((np.abs(w2) < TINY) & (w2 != 0)) / np.mean(w2 != 0), abs=1e-3)


def test_quantized_weights_need_no_warning() -> None:
    m = _model()
    res = lowbit.quantize(m, calib=samples(m, 8), progress=False)
    assert res.plan.nodes["slow"].quantized and res.warnings == []


def test_flush_sets_them_to_zero_and_outputs_barely_move() -> None:
    m = _model()
    recipe = Recipe(exclude_names=("slow",))
    kept = lowbit.quantize(m, calib=samples(m, 8), recipe=recipe, progress=False)
    flushed = lowbit.quantize(
        m, calib=samples(m, 8), recipe=Recipe(exclude_names=("slow",), flush_subnormals=True), progress=False
    )
    assert flushed.warnings == []
    w2, orig = init(flushed.model, "w2"), _subnormal_weight()
    small = np.abs(orig) < TINY
    assert np.all(w2[small] == 0) and np.array_equal(w2[~small], orig[~small])
    assert np.array_equal(init(kept.model, "w2"), orig)
    feeds = samples(m, 8, seed=3)
    diff = np.abs(run(flushed.model, feeds)[0].astype(np.float64) - run(kept.model, feeds)[0])
    assert diff.max() < 1e-30


def test_recipe_option_round_trips_and_is_checked() -> None:
    r = Recipe(flush_subnormals=True)
    assert Recipe.from_dict(r.to_dict()) == r
    with pytest.raises(LowbitError, match="flush_subnormals"):
        Recipe.from_dict({"flush_subnormals": "yes"})


def test_cli_flag_and_warning(tmp_path) -> None:
    m = _model()
    onnx.save(m, tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", np.concatenate([s["x"] for s in samples(m, 8)]))
    args = ["quantize", str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "x.npy"), "--quiet", "--check", "0"]
    args += ["--exclude-names", "slow"]
    plain = run_cli(*args, "-o", str(tmp_path / "a.onnx"))
    assert plain.returncode == 0, plain.stderr
    assert "warning: 1 weight(s) left float hold subnormal values" in plain.stdout
    flushed = run_cli(*args, "--flush-subnormals", "-o", str(tmp_path / "b.onnx"))
    assert flushed.returncode == 0, flushed.stderr
    assert "subnormal" not in flushed.stdout
    w2 = init(onnx.load(tmp_path / "b.onnx"), "w2")
    assert not np.any((w2 != 0) & (np.abs(w2) < TINY))
