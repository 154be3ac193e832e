"""calibration "layer_error" (ranges_by_error.py): each activation's range is the histogram candidate that least
disturbs the nodes reading the tensor. The same tensor gets a different range under a different reader."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import lowbit
from helpers import model, node, run, samples, weight
from lowbit.numerics import dequantize, quantize, scale_zero_point
from lowbit.observe import Histogram
from lowbit.ranges_by_error import candidates
from lowbit.recipe import Recipe, Scheme

LAYER_ERROR = Recipe(default=Scheme(calibration="layer_error"))
# DBNet-style detector, IoU of map > 0.5 on its 64 held-out images: layer_error 0.863, min-max 0.827 (AMD EPYC,
# bench/RESULTS_CORPUS.md); the floor sits a little below.
DBNET_FLOOR = 0.85


def _outliers(n: int = 16, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """[1, 4, 32, 32] feeds: a N(0, 1) bulk and 0.05% of the values at +40 (always positive): the 99.9th
    percentile clips them, the MSE range does not."""
    r = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = r.standard_normal((1, 4, 32, 32)).astype(np.float32)
        x.flat[r.choice(x.size, 2, replace=False)] = 40.0
        out.append({"x": x})
    return out


def _reader_model(op: str) -> onnx.ModelProto:
    return model([node(op, ["x"], ["y"], name="reader")], {"x": (1, 4, 32, 32)}, {"y": None})


def test_a_sigmoid_reader_clips_outliers_an_average_keeps_them() -> None:
    """Clipping +40 to ~4 moves sigmoid(x) by 0.02 but the mean of x by ~0.2 per clipped value: the same tensor
    gets a clipped range under a Sigmoid and its full range under a GlobalAveragePool (rounding noise averages
    away, clipping does not)."""
    calib = _outliers()
    by_reader = {}
    for op in ("Sigmoid", "GlobalAveragePool"):
        result = lowbit.quantize(_reader_model(op), calib=calib, recipe=LAYER_ERROR, progress=False)
        by_reader[op] = result.plan.tensors["x"].range
    assert by_reader["GlobalAveragePool"][1] == pytest.approx(40.0)
    assert by_reader["Sigmoid"][1] < 10.0
    # The Sigmoid's choice is the better one for it: less error at its output than min-max on held-out data.
    feeds = _outliers(8, seed=1)
    ref = run(_reader_model("Sigmoid"), feeds, float_model=True)[0]
    errors = {}
    for method in ("layer_error", "minmax"):
        recipe = Recipe(default=Scheme(calibration=method))  # type: ignore[arg-type]
        q = lowbit.quantize(_reader_model("Sigmoid"), calib=calib, recipe=recipe, progress=False).model
        errors[method] = float(np.mean((run(q, feeds)[0] - ref) ** 2))
    assert errors["layer_error"] < 0.5 * errors["minmax"]


def test_candidates_are_distinct_and_min_max_comes_first() -> None:
    h = Histogram()
    h.update(np.concatenate([np.random.default_rng(0).standard_normal(10000), [50.0]]).astype(np.float32))
    found = candidates(h, Scheme())
    assert found[0] == ("minmax", (h.min, h.max))
    params = [scale_zero_point(a, b, "uint8", False) for _, (a, b) in found]
    assert len({(float(s), int(z)) for s, z in params}) == len(found) > 2
    flat = Histogram()
    flat.update(np.zeros(100, np.float32))
    assert [name for name, _ in candidates(flat, Scheme())] == ["minmax"]  # every rule gives the same range


@pytest.mark.parametrize("dtype", ["uint8", "int8", "uint16"])
def test_the_measuring_graph_quantizes_as_quantize_then_dequantize(dtype: str) -> None:
    """The copies inside ONNX Runtime see x quantized exactly as QuantizeLinear/DequantizeLinear would: the summed
    squared error it reports is numpy's, to float32 summation."""
    import onnxruntime as ort

    from lowbit.ranges_by_error import _Group, _Unit, error_model

    m = model([node("Relu", ["x"], ["y"])], {"x": (4, 1000)}, {"y": (4, 1000)})
    x = np.random.default_rng(0).normal(0, 3, (4, 1000)).astype(np.float32)
    scheme = Scheme(activations=dtype)  # type: ignore[arg-type]
    group = _Group("x", ["x"], scheme, [("a", (-2.5, 4.0)), ("b", (-9.0, 9.0))], [_Unit(None, {"x"}, ["x"])])
    measuring, names = error_model(m, [group])
    got = dict(zip(names, ort.InferenceSession(measuring.SerializeToString()).run(names, {"x": x})))
    for c, (lo, hi) in enumerate([(-2.5, 4.0), (-9.0, 9.0)]):
        s, z = scale_zero_point(lo, hi, dtype, False)
        expected = np.sum((dequantize(quantize(x, s, z, dtype), s, z).astype(np.float64) - x) ** 2)
        assert float(got[f"err/0/0/{c}/0"]) == pytest.approx(expected, rel=1e-4)
    assert float(got["var/0/0/0"]) == pytest.approx(np.sum((x - x.mean()) ** 2, dtype=np.float64), rel=1e-4)


def _pool_then_conv() -> onnx.ModelProto:
    """x -> Conv -> MaxPool -> Conv -> y: MaxPool shares its input's scale, so the second Conv reads that group."""
    return model(
        [
            node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
            node("MaxPool", ["c1"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
            node("Conv", ["p", "w2"], ["y"], name="conv2"),
        ],
        {"x": (1, 3, 8, 8)},
        {"y": None},
        {"w1": weight((4, 3, 3, 3)), "w2": weight((2, 4, 1, 1), seed=1)},
    )


def test_readers_are_found_through_data_movement_that_shares_the_scale() -> None:
    from lowbit.passes import prepare
    from lowbit.planner import make_layout
    from lowbit.ranges_by_error import _groups

    m = onnx.load_from_string(_pool_then_conv().SerializeToString())
    import onnx_ir as ir

    irm = ir.from_proto(m)
    prepare(irm)
    layout = make_layout(irm, LAYER_ERROR)
    h = Histogram()
    h.update(np.linspace(-1, 1, 100, dtype=np.float32))
    groups = {g.source: g for g in _groups(ir.to_proto(irm), layout, {t: h for t in layout.sources()})}
    assert layout.tensors["p"] == "c1"  # the pooled tensor uses the conv output's parameters
    assert [r.node.name for r in groups["c1"].readers if r.node is not None] == ["conv2"]
    assert "y" not in groups  # a model output keeps min-max


def test_same_bytes_twice_and_outputs_keep_min_max(tmp_path: Path) -> None:
    m = _pool_then_conv()
    calib = samples(m, 16)
    a = lowbit.quantize(m, tmp_path / "a.onnx", calib=calib, recipe=LAYER_ERROR, progress=False)
    lowbit.quantize(m, tmp_path / "b.onnx", calib=calib, recipe=LAYER_ERROR, progress=False)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    minmax = lowbit.quantize(m, calib=calib, progress=False)
    assert a.plan.tensors["y"].range == minmax.plan.tensors["y"].range
    assert a.plan.recipe["default"]["calibration"] == "layer_error"


def test_a_reader_that_cannot_be_copied_leaves_the_tensors_own_error() -> None:
    """Only a node of another domain reads x: its own quantization error decides (one outlier in 4001 values:
    clip it); a Sigmoid reading it too is measured instead."""
    from lowbit.planner import Layout
    from lowbit.ranges_by_error import _groups

    h = Histogram()
    h.update(np.concatenate([np.random.default_rng(0).standard_normal(4000), [60.0]]).astype(np.float32))
    layout = Layout(tensors={"x": "x"}, tensor_scheme={"x": Scheme(calibration="layer_error")})
    custom = node("Foo", ["x"], ["z"], name="foo", domain="com.example")
    for nodes, readers in (([custom], [None]), ([custom, node("Sigmoid", ["x"], ["y"], name="sig")], ["sig"])):
        g = onnx.helper.make_graph(
            nodes, "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4001])], []
        )
        m = onnx.helper.make_model(
            g, opset_imports=[onnx.helper.make_opsetid("", 17), onnx.helper.make_opsetid("com.example", 1)]
        )
        (group,) = _groups(m, layout, {"x": h})
        assert [u.node.name if u.node is not None else None for u in group.readers] == readers


def test_the_cli_offers_it(tmp_path: Path, tiny_model: Path) -> None:
    from conftest import run_cli

    np.save(tmp_path / "calib.npy", np.random.default_rng(0).uniform(-1, 1, (8, 3, 16, 16)).astype(np.float32))
    out = tmp_path / "q.onnx"
    run = run_cli(
        "quantize",
        str(tiny_model),
        "-o",
        str(out),
        "--calib",
        str(tmp_path / "calib.npy"),
        "--calibration",
        "layer_error",
    )
    assert run.returncode == 0, run.stderr
    plan = lowbit.Plan.load(tmp_path / "q.plan.json")
    assert plan.recipe["default"]["calibration"] == "layer_error"


def test_rules_can_ask_for_it_on_some_nodes_only() -> None:
    recipe = dataclasses.replace(
        Recipe(), rules=(lowbit.Rule(op_types=("Sigmoid",), scheme=Scheme(calibration="layer_error")),)
    )
    result = lowbit.quantize(_reader_model("Sigmoid"), calib=_outliers(), recipe=recipe, progress=False)
    assert result.plan.tensors["x"].range[1] < 10.0


@pytest.mark.slow
def test_layer_error_on_the_corpus_text_detector() -> None:
    """DBNet-style detector (its Sigmoid map thresholded at 0.5): ranges chosen by the error at their readers keep
    more of the map than min-max on held-out images (bench/RESULTS_CORPUS.md, layer_error section)."""
    from lowbit_zoo.corpus.registry import BY_NAME, ROOT

    entry = BY_NAME["dbnet_text"]
    path = entry.get(ROOT)
    calib, held = entry.calib(path), entry.eval(path)
    out = entry.outputs[0]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ref = [sess.run([out.name], f)[0] for f in held]
    iou = {}
    for method in ("minmax", "layer_error"):
        recipe = Recipe(default=Scheme(calibration=method))  # type: ignore[arg-type]
        q = lowbit.quantize(str(path), calib=calib, recipe=recipe, progress=False).model
        qs = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"])
        iou[method] = out.metric(ref, [qs.run([out.name], f)[0] for f in held])
    assert iou["layer_error"] >= DBNET_FLOOR and iou["layer_error"] > iou["minmax"]


@pytest.mark.slow  # starts a Ray cluster
def test_sharded_calibration_measures_the_same_samples(tmp_path: Path, tiny_model: Path) -> None:
    """With Ray workers the first samples are read again in the main process: the same ranges and bytes."""
    data = tmp_path / "calib.npy"
    np.save(data, np.random.default_rng(3).normal(0, 1, (64, 3, 16, 16)).astype(np.float32))
    recipe = dataclasses.replace(LAYER_ERROR, batch_size=4)
    single = lowbit.quantize(str(tiny_model), calib=str(data), recipe=recipe, progress=False)
    sharded = lowbit.quantize(str(tiny_model), calib=str(data), recipe=recipe, progress=False, workers=2)
    assert single.plan.to_json() == sharded.plan.to_json()
    assert single.model.SerializeToString() == sharded.model.SerializeToString()
