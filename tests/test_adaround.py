"""AdaRound (src/lowbit/adaround.py): learned rounding stays on floor/ceil, never loses to round-to-nearest on its
layer's objective, is deterministic, replays from the plan, and wins back most of W4A8's loss on a real model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import numpy_helper

import lowbit
import lowbit.adaround as ada
from conftest import run_cli
from helpers import model, node, rng, weight
from lowbit.adaround import Layer, grid, layer_loss, round_layer, to_matrix_np
from lowbit.adaround_data import rows
from lowbit.errors import LowbitError
from lowbit.numerics import unpack_int4

INT4 = lowbit.Scheme(weights="int4", adaround=True)


@pytest.fixture(autouse=True)
def few_iterations(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests check invariants, not convergence: 300 steps keep them quick."""
    monkeypatch.setattr(ada, "ITERATIONS", 300)


def small_net(seed: int = 0) -> onnx.ModelProto:
    """Conv (stride 2) -> Relu -> depthwise Conv (asymmetric pads) -> Relu -> Flatten -> MatMul + Add."""
    inits = {
        "w1": weight((8, 4, 3, 3), seed, 0.3),
        "b1": weight((8,), seed + 1, 0.1),
        "w2": weight((8, 1, 3, 3), seed + 2, 0.3),
        "w3": weight((8 * 6 * 6, 10), seed + 3, 0.05),
        "b3": weight((10,), seed + 4, 0.1),
    }
    nodes = [
        node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1], strides=[2, 2]),
        node("Relu", ["c1"], ["r1"], name="relu1"),
        node("Conv", ["r1", "w2"], ["c2"], name="dw", group=8, pads=[0, 1, 2, 1]),
        node("Relu", ["c2"], ["r2"], name="relu2"),
        node("Flatten", ["r2"], ["f"], name="flat"),
        node("MatMul", ["f", "w3"], ["m"], name="fc"),
        node("Add", ["m", "b3"], ["y"], name="bias"),
    ]
    return model(nodes, {"x": ("N", 4, 12, 12)}, {"y": ("N", 10)}, inits)


def calib(n: int = 64, seed: int = 1) -> np.ndarray:
    return rng(seed).standard_normal((n, 4, 12, 12)).astype(np.float32)


def int_weight(m: onnx.ModelProto, node_name: str) -> tuple[np.ndarray, np.ndarray]:
    """The stored integers and scale of the weight (input 1) of a node of the quantized model."""
    target = next(n for n in m.graph.node if n.name == node_name)
    dq = next(n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == target.input[1])
    inits = {t.name: t for t in m.graph.initializer}
    t = inits[dq.input[0]]
    if t.data_type == onnx.TensorProto.INT4:
        q = unpack_int4(np.frombuffer(t.raw_data, np.uint8), int(np.prod(t.dims))).reshape(tuple(t.dims))
    else:
        q = numpy_helper.to_array(t)
    return q.astype(np.int64), numpy_helper.to_array(inits[dq.input[1]])


@pytest.mark.parametrize("scheme", [INT4, lowbit.Scheme(adaround=True, avoid_overflow=False)], ids=["int4", "int8"])
def test_every_weight_is_floor_or_ceil_and_no_layer_loses(scheme: lowbit.Scheme) -> None:
    m = small_net()
    res = lowbit.quantize(m, calib=calib(), recipe=lowbit.Recipe(default=scheme), progress=False)
    assert sorted(res.plan.adaround) == ["conv1:1", "dw:1", "fc:1"]
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    qmax = 7 if scheme.weights == "int4" else 127
    moved = 0
    for name, w_name, axis in (("conv1", "w1", 0), ("dw", "w2", 0), ("fc", "w3", 1)):
        q, scale = int_weight(res.model, name)
        shape = [1] * q.ndim
        shape[axis] = -1
        x = (inits[w_name] / scale.reshape(shape)).astype(np.float64)
        inside = np.abs(x) <= qmax
        assert np.all((q == np.floor(x)) | (q == np.ceil(x)) | ~inside), name
        assert np.all(np.abs(q[~inside]) == qmax)  # outside the grid: the clipped end
        assert np.all(q[x == np.floor(x)] == x[x == np.floor(x)])  # a weight on the grid never moves
        moved += int(np.sum(q != np.clip(np.rint(x), -qmax, qmax)))
        entry = res.plan.adaround[f"{name}:1"]
        assert entry["loss"] <= entry["loss_nearest"]
    assert moved > 0  # it learned something: some weights round the other way than nearest


def test_learned_rounding_beats_nearest_on_its_layer() -> None:
    """A MatMul on correlated inputs (as real activations are): choosing roundings jointly cancels errors that
    rounding each weight alone cannot."""
    g_rng = rng(3)
    w = (g_rng.standard_normal((32, 16)) * 0.2).astype(np.float32)
    onnx_model = model([node("MatMul", ["x", "w"], ["y"], name="mm")], {"x": ("N", 32)}, {"y": ("N", 16)}, {"w": w})
    mm = ir.from_proto(onnx_model).graph.node("mm")
    layer = Layer(mm, "mm:1", "x", w, 1, INT4)
    mix = g_rng.standard_normal((8, 32))
    xf = (g_rng.standard_normal((1, 2048, 8)) @ mix + 0.1 * g_rng.standard_normal((1, 2048, 32))).astype(np.float32)
    xq = xf
    scale = (np.abs(w).max(axis=0) / 7).astype(np.float32)
    gr = grid(w, scale, np.zeros(16, np.int8), 1, INT4)
    up, stats = round_layer(layer, gr, xf, xq, seed=0)
    nearest = layer_loss(mm, w, gr, gr.nearest(), xf, xq)
    learned = layer_loss(mm, w, gr, up, xf, xq)
    assert stats["kept_nearest"] is False
    assert learned < 0.9 * nearest
    assert stats["loss"] == pytest.approx(learned) and stats["loss_nearest"] == pytest.approx(nearest)
    # and when learning cannot win, round-to-nearest is kept: here (no iterations) it has no chance to
    zero = Layer(mm, "mm:1", "x", w, 1, INT4)
    ada.ITERATIONS = 0
    up0, stats0 = round_layer(zero, gr, xf, xf, seed=0)
    assert stats0["loss"] <= stats0["loss_nearest"]
    assert layer_loss(mm, w, gr, up0, xf, xf) <= layer_loss(mm, w, gr, gr.nearest(), xf, xf)


@pytest.mark.parametrize(
    ("shape", "attrs"),
    [
        ((6, 2, 3, 3), {"group": 2, "strides": [2, 1], "dilations": [1, 2], "pads": [1, 0, 2, 2]}),
        ((4, 4, 3), {"pads": [1, 2], "strides": [2]}),
        ((4, 1, 3, 3), {"group": 4, "pads": [1, 1, 1, 1]}),
    ],
    ids=["grouped-strided-dilated", "conv1d", "depthwise"],
)
def test_rows_times_weight_is_the_conv(shape: tuple[int, ...], attrs: dict) -> None:
    """A sampled row times the weight matrix is the conv's output at that position (ONNX Runtime computes it)."""
    w = weight(shape, 5)
    c_in = shape[1] * attrs.get("group", 1)
    spatial = (9, 11) if len(shape) == 4 else (13,)
    m = model(
        [node("Conv", ["x", "w"], ["y"], name="conv", **attrs)], {"x": (2, c_in, *spatial)}, {"y": None}, {"w": w}
    )
    conv = ir.from_proto(m).graph.node("conv")
    layer = Layer(conv, "conv:1", "x", w, 0, INT4)
    x = rng(6).standard_normal((2, c_in, *spatial)).astype(np.float32)
    y = lowbit.runtimes.ort.session(m, mode="simulate").run(None, {"x": x})[0]
    flat = np.moveaxis(y, 1, -1).reshape(-1, shape[0])  # (batch x positions, out channels)
    pos = np.arange(len(flat))
    got = np.matmul(rows(layer, x, pos).astype(np.float64), to_matrix_np(conv, w.astype(np.float64)))
    got = np.moveaxis(got, 0, 1).reshape(len(pos), -1)  # groups side by side = output channels in order
    np.testing.assert_allclose(got, flat, rtol=1e-4, atol=1e-4)


def test_same_bytes_every_run_and_from_the_plan(tmp_path: Path) -> None:
    m = small_net(1)
    recipe = lowbit.Recipe(default=INT4)
    first = lowbit.quantize(m, tmp_path / "a.onnx", calib=calib(), recipe=recipe, progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the learning pins its own thread count
    try:
        again = lowbit.quantize(m, calib=calib(), recipe=recipe, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert first.model.SerializeToString() == again.model.SerializeToString()
    assert json.dumps(first.plan.adaround, sort_keys=True) == json.dumps(again.plan.adaround, sort_keys=True)
    # Re-applying the saved plan needs no data and gives the same model, byte for byte.
    replay = lowbit.quantize(m, plan=tmp_path / "a.plan.json", progress=False)
    assert replay.model.SerializeToString() == first.model.SerializeToString()
    assert replay.plan.adaround == first.plan.adaround and not replay.warnings
    # Without AdaRound the model differs (the test above would pass trivially otherwise).
    plain = lowbit.quantize(
        m, calib=calib(), recipe=lowbit.Recipe(default=lowbit.Scheme(weights="int4")), progress=False
    )
    assert plain.model.SerializeToString() != first.model.SerializeToString()


def test_a_changed_weight_is_rounded_to_nearest_with_a_warning(tmp_path: Path) -> None:
    m = small_net(1)
    lowbit.quantize(m, tmp_path / "a.onnx", calib=calib(), recipe=lowbit.Recipe(default=INT4), progress=False)
    retrained = onnx.ModelProto()
    retrained.CopyFrom(m)
    w1 = next(t for t in retrained.graph.initializer if t.name == "w1")
    w1.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w1) * np.float32(1.01), "w1"))
    res = lowbit.quantize(retrained, plan=tmp_path / "a.plan.json", progress=False)
    assert any("AdaRound: 1 weight(s) differ" in w and "conv1:1" in w for w in res.warnings)
    assert sorted(res.plan.adaround) == ["dw:1", "fc:1"]
    q, scale = int_weight(res.model, "conv1")
    x = numpy_helper.to_array(w1) / scale.reshape(-1, 1, 1, 1)
    np.testing.assert_array_equal(q, np.clip(np.rint(x), -7, 7))


def test_bad_options_fail_in_one_line(tmp_path: Path, tiny_model: Path, tiny_calib: Path) -> None:
    with pytest.raises(LowbitError, match="adaround learns weight rounding on calibrated static layers"):
        lowbit.Scheme(mode="dynamic", adaround=True)
    with pytest.raises(LowbitError, match="'adaround' must be true or false"):
        lowbit.Scheme(adaround="yes")  # type: ignore[arg-type]
    with pytest.raises(LowbitError, match="an iterator can be read once"):
        lowbit.quantize(small_net(), calib=iter([{"x": calib(4)}]), recipe=lowbit.Recipe(default=INT4))
    r = run_cli("quantize", str(tiny_model), "-o", str(tmp_path / "d.onnx"), "--adaround", "--mode", "dynamic")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "adaround" in r.stderr
    assert "Traceback" not in r.stderr
    bad = tmp_path / "bad.plan.json"
    ok = lowbit.quantize(small_net(), tmp_path / "q.onnx", calib=calib(8), recipe=lowbit.Recipe(default=INT4))
    data = json.loads(ok.plan.to_json())
    data["adaround"]["fc:1"]["up"] = 5
    bad.write_text(json.dumps(data))
    with pytest.raises(LowbitError, match="adaround entry"):
        lowbit.Plan.load(bad)


def test_cli_flag_reports_time_and_records_the_recipe(tmp_path: Path, tiny_model: Path, tiny_calib: Path) -> None:
    out = tmp_path / "q.onnx"
    r = run_cli(
        "quantize", str(tiny_model), "-o", str(out), "--calib", str(tiny_calib), "--weights", "int4",
        "--adaround", "--check", "0", "--no-speed-check",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "adaround: learned the rounding of 3 weights in" in r.stdout
    assert "adaround 3/3 fc" in r.stderr  # per-layer progress
    plan = lowbit.Plan.load(out.with_suffix(".plan.json"))
    assert plan.recipe["default"]["adaround"] is True and sorted(plan.adaround) == ["conv1:1", "conv2:1", "fc:1"]


@pytest.mark.slow
def test_fashion_mnist_w4a8_within_a_point_of_float(monkeypatch: pytest.MonkeyPatch) -> None:
    """Real data end to end: examples/qat_fashion_mnist.py's CNN, trained briefly here (2 epochs on 20k images, not
    the example's 6 on 60k), W4A8 with AdaRound vs round-to-nearest on 2000 held-out test images in ONNX Runtime."""
    import qat_fashion_mnist as fm

    if not (fm.DATA / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.fail("Fashion-MNIST missing: apt-get install dataset-fashion-mnist")
    monkeypatch.setattr(ada, "ITERATIONS", 1000)
    torch.manual_seed(0)
    xtr, ytr = fm.load("train", fm.DATA)
    xte, yte = fm.load("test", fm.DATA)
    xte, yte = xte[:2000], yte[:2000]
    net = fm.SmallMobileNet()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fm.train(net, xtr[:20000], ytr[:20000], 2, 2e-3, 128, 0)
    finally:
        torch.set_num_threads(threads)
    acc_float = fm.torch_accuracy(net, xte, yte)
    calib = xtr[np.random.default_rng(1).choice(len(xtr), 256, replace=False)]
    example = (torch.from_numpy(xte[:1]),)
    acc = {}
    for name, scheme in (("nearest", lowbit.Scheme(weights="int4")), ("adaround", INT4)):
        res = lowbit.quantize(net, example_inputs=example, calib=calib, recipe=lowbit.Recipe(default=scheme))
        acc[name] = fm.ort_accuracy(res.model, xte, yte)
    assert acc_float > 80.0, acc_float  # the model learned something
    assert acc["adaround"] >= acc_float - 1.0, (acc_float, acc)
    assert acc["adaround"] > acc["nearest"], (acc_float, acc)
