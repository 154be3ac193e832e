"""Empirical bias correction (recipe empirical_bias_correction, passes/bias_empirical.py): its invariant on a small
graph, that it changes nothing but biases, its plan record, determinism and its checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import lowbit
from conftest import run_cli
from helpers import model, node, samples, weight
from lowbit.errors import LowbitError
from lowbit.passes.bias_empirical import shrink
from lowbit.runtimes.ort import session, with_outputs

# Each biased layer's output as the layers after it read it: in the float model (after its Relu), and in the
# quantized one (the DequantizeLinear of its output, whose range does the fused Relu's clipping). The classifier's
# logits are a model output, left float: there the output itself is compared.
FLOAT_OUTS = ["r1", "r2", "y"]
QUANT_OUTS = ["r1_dq", "r2_dq", "y"]


def tiny() -> onnx.ModelProto:
    inits = {
        "w1": weight((8, 4, 3, 3), 1),
        "b1": weight((8,), 2, 0.1),
        "w2": weight((8, 8, 3, 3), 3, 0.2),
        "b2": weight((8,), 4, 0.1),
        "w3": weight((10, 8), 5),
        "b3": weight((10,), 6, 0.1),
    }
    nodes = [
        node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        node("Relu", ["c1"], ["r1"], name="relu1"),
        node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        node("Relu", ["c2"], ["r2"], name="relu2"),
        node("GlobalAveragePool", ["r2"], ["p"], name="gap"),
        node("Flatten", ["p"], ["f"], name="flat"),
        node("Gemm", ["f", "w3", "b3"], ["y"], name="fc", transB=1),
    ]
    return model(nodes, {"x": (1, 4, 8, 8)}, {"y": (1, 10)}, inits)


def recipe(empirical: bool) -> lowbit.Recipe:
    # int4 weights without the analytic correction: rounding leaves mean shifts large enough to see
    scheme = lowbit.Scheme(calibration="minmax", weights="int4", bias_correction=False)
    return lowbit.Recipe(default=scheme, empirical_bias_correction=empirical)


def channel_shifts(m: onnx.ModelProto, q: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """Per layer: |mean of quantized output - mean of float output| per channel, over `feeds`, / the float std."""
    fs = session(with_outputs(m, FLOAT_OUTS), mode="simulate")
    qs = session(with_outputs(q, QUANT_OUTS), mode="simulate")
    f = [np.concatenate(x) for x in zip(*[fs.run(FLOAT_OUTS, s) for s in feeds])]
    g = [np.concatenate(x) for x in zip(*[qs.run(QUANT_OUTS, s) for s in feeds])]
    out = []
    for a, b in zip(f, g):
        axes = (0, 2, 3) if a.ndim == 4 else (0,)
        out.append(np.abs(b.mean(axis=axes) - a.mean(axis=axes)) / a.std())
    return out


def test_each_corrected_layer_matches_float_means_on_the_calibration_data() -> None:
    m = tiny()
    calib = samples(m, 64, seed=1)
    before = channel_shifts(m, lowbit.quantize(m, calib=calib, recipe=recipe(False), progress=False).model, calib)
    res = lowbit.quantize(m, calib=calib, recipe=recipe(True), progress=False)
    after = channel_shifts(m, res.model, calib)
    assert sorted(res.plan.bias_shifts) == ["conv1", "conv2", "fc"]
    for name, b, a in zip(FLOAT_OUTS, before, after):
        # int4 rounding shifts the means by up to several percent of the output's spread; corrected, they are
        # within 0.5% (what noise shrinkage, output rounding and int32 bias steps leave)
        assert a.max() < 0.005, (name, a.max(), b.max())
    assert max(b.max() for b in before) > 0.02  # there was something to correct
    # and held-out data, not seen by the correction, moves the same way
    held = samples(m, 64, seed=7)
    worse = channel_shifts(m, lowbit.quantize(m, calib=calib, recipe=recipe(False), progress=False).model, held)
    better = channel_shifts(m, res.model, held)
    assert sum(float(x.mean()) for x in better) < sum(float(x.mean()) for x in worse)


def test_only_biases_change_and_the_plan_reapplies_to_the_same_bytes(tmp_path: Path) -> None:
    m = tiny()
    calib = samples(m, 32, seed=1)
    off = lowbit.quantize(m, calib=calib, recipe=recipe(False), progress=False).model
    on = lowbit.quantize(m, calib=calib, recipe=recipe(True), output=tmp_path / "q.onnx", progress=False)
    assert [(n.op_type, list(n.input)[1:]) for n in off.graph.node] == [
        (n.op_type, [i.replace("_bias_empirical_q", "_bias_q") for i in list(n.input)[1:]]) for n in on.model.graph.node
    ]
    a = {i.name: numpy_helper.to_array(i) for i in off.graph.initializer}
    b = {i.name.replace("_bias_empirical_q", "_bias_q"): numpy_helper.to_array(i) for i in on.model.graph.initializer}
    assert a.keys() == b.keys()
    changed = sorted(k for k in a if not np.array_equal(a[k], b[k]))
    assert changed and all(k.endswith("_bias_q") for k in changed), changed
    # the same run again, and the plan re-applied without data, give the same bytes
    again = lowbit.quantize(m, calib=calib, recipe=recipe(True), progress=False).model
    assert again.SerializeToString() == on.model.SerializeToString()
    replayed = lowbit.quantize(m, plan=tmp_path / "q.plan.json", progress=False)
    assert replayed.model.SerializeToString() == on.model.SerializeToString()
    assert replayed.plan.bias_shifts == on.plan.bias_shifts


def test_shrink_keeps_a_clear_shift_and_drops_noise() -> None:
    raw = np.array([1.0, -1.0, 0.01, 0.02])
    kept = shrink(raw, np.full(4, 1e-4))
    assert np.allclose(kept, raw, rtol=2e-4)
    assert np.all(shrink(raw * 0.01, np.full(4, 1.0)) == 0.0)  # shifts no larger than their noise: none


def test_recipe_option_is_checked_and_round_trips() -> None:
    r = lowbit.Recipe(empirical_bias_correction=True)
    assert lowbit.Recipe.from_dict(r.to_dict()) == r
    with pytest.raises(LowbitError, match="empirical_bias_correction"):
        lowbit.Recipe.from_dict({"empirical_bias_correction": "yes"})


def test_an_iterator_is_refused_before_calibration() -> None:
    m = tiny()
    with pytest.raises(LowbitError, match="iterator can be read once"):
        lowbit.quantize(m, calib=iter(samples(m, 4)), recipe=recipe(True), progress=False)


def test_cli_flag_records_the_shifts_and_refuses_a_plan(tmp_path: Path, tiny_model: Path, tiny_calib: Path) -> None:
    out = tmp_path / "q.onnx"
    flags = ("--check", "0", "--no-speed-check")
    r = run_cli(
        "quantize", str(tiny_model), "-o", str(out), "--calib", str(tiny_calib), "--empirical-bias-correction", *flags
    )
    assert r.returncode == 0, r.stderr
    plan = lowbit.Plan.load(out.with_suffix(".plan.json"))
    assert plan.recipe["empirical_bias_correction"] is True and plan.bias_shifts
    again = run_cli(
        "quantize",
        str(tiny_model),
        "-o",
        str(tmp_path / "r.onnx"),
        "--plan",
        str(out.with_suffix(".plan.json")),
        "--empirical-bias-correction",
        *flags,
    )
    assert again.returncode == 2 and len(again.stderr.strip().splitlines()) == 1 and "Traceback" not in again.stderr


def test_a_model_in_external_data_is_refused_before_calibration(tmp_path: Path) -> None:
    path = tmp_path / "ext.onnx"
    onnx.save(tiny(), str(path), save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    with pytest.raises(LowbitError, match="external data: drop empirical_bias_correction"):
        lowbit.quantize(str(path), calib=samples(tiny(), 4), recipe=recipe(True), progress=False)
