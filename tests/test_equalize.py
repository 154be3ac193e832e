"""Cross-layer equalization: the float function stays the same, per-channel ranges of each pair meet, and what is
not exact (Relu6, branches, shared weights) is left alone."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import lowbit
from lowbit.passes.equalize import equalize, find_pairs

RNG = np.random.default_rng(0)


def _w(*shape: int, spread: bool = True) -> np.ndarray:
    w = RNG.normal(0, 0.3, shape).astype(np.float32)
    if spread:  # channels of very different ranges, as trained depthwise convs have
        w *= np.exp(RNG.normal(0, 1.5, (shape[0],) + (1,) * (len(shape) - 1))).astype(np.float32)
    return w


def _model(nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray], x_shape: list, y_shapes: dict) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in y_shapes.items()],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def _same(got: np.ndarray, ref: np.ndarray) -> None:
    """Equal to 1e-5 of the output's scale: rescaled weights are rounded to float32 again, and products that
    cancel (wide channels) keep those roundings' absolute, not relative, size."""
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * float(np.abs(ref).max()))


def _equalized(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool, ir.Model]:
    m = ir.from_proto(model)
    changed = equalize(m)
    return ir.to_proto(m), changed, m


def _conv_chain(act: str = "Relu", depthwise: bool = False) -> onnx.ModelProto:
    c = 8
    inits = {"w1": _w(c, 3, 3, 3), "b1": RNG.normal(0, 0.5, c).astype(np.float32)}
    inits["w2"] = _w(c, 1, 3, 3) if depthwise else _w(c, c, 3, 3)
    inits["b2"] = RNG.normal(0, 0.5, c).astype(np.float32)
    inits["w3"], inits["b3"] = _w(6, c, 1, 1), RNG.normal(0, 0.1, 6).astype(np.float32)
    acts = {
        "Relu": [helper.make_node("Relu", ["c1"], ["a1"])],
        "Identity": [helper.make_node("Identity", ["c1"], ["a1"])],
    }
    acts["Relu6"] = [helper.make_node("Clip", ["c1", "lo", "hi"], ["a1"])]
    acts["LeakyRelu"] = [helper.make_node("LeakyRelu", ["c1"], ["a1"], alpha=0.1)]
    if act == "Relu6":
        inits["lo"], inits["hi"] = np.array(0, np.float32), np.array(6, np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["a1" if act == "none" else "c1"], pads=[1, 1, 1, 1]),
        *acts.get(act, []),
        helper.make_node("Conv", ["a1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], group=c if depthwise else 1),
        helper.make_node("Relu", ["c2"], ["a2"]),
        helper.make_node("MaxPool", ["a2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p2", "w3", "b3"], ["y"]),
    ]
    return _model(nodes, inits, ["N", 3, 16, 16], {"y": ["N", 6, 8, 8]})


X = RNG.normal(0, 1, (2, 3, 16, 16)).astype(np.float32)


@pytest.mark.parametrize("act", ["Relu", "LeakyRelu", "none"])
@pytest.mark.parametrize("depthwise", [False, True])
def test_conv_chain_keeps_its_float_function_and_balances_ranges(act: str, depthwise: bool) -> None:
    model = _conv_chain(act, depthwise)
    precision_before = _precision(find_pairs(ir.from_proto(model)))
    out, changed, m = _equalized(model)
    assert changed
    pairs = find_pairs(m)
    assert len(pairs) == 2  # conv1-conv2 through the activation, conv2-conv3 through Relu + MaxPool
    _same(_run(out, X)[0], _run(model, X)[0])
    for first, second in pairs:  # iterated to convergence: each shared channel's two ranges agree
        np.testing.assert_allclose(first.out_ranges(), second.in_ranges(), rtol=1e-3)
    assert _precision(pairs) > precision_before + 0.1


def _precision(pairs: list) -> float:
    """The paper's objective: sum over pairs and channels of each channel's share of its per-tensor range, in
    both layers (how much of a per-tensor int8 grid a channel uses)."""
    total = 0.0
    for first, second in pairs:
        r1, r2 = first.out_ranges(), second.in_ranges()
        total += float((r1 / r1.max() * r2 / r2.max()).sum())
    return total


def test_an_op_not_known_to_be_homogeneous_stops_a_pair() -> None:
    # Identity is harmless, but prepare removes it anyway; the pass trusts only the ops it lists.
    model = _conv_chain("Identity")
    _, changed, m = _equalized(model)
    assert len(find_pairs(m)) == 1  # only conv2 -> conv3
    assert changed


def test_relu6_pair_is_left_alone() -> None:
    model = _conv_chain("Relu6")
    out, _, m = _equalized(model)
    names = {p[0].node.inputs[1].name for p in find_pairs(m)}
    assert "w1" not in names  # conv1 -> Clip -> conv2 is not rescaled
    w1 = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}["w1"]
    np.testing.assert_array_equal(w1, {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}["w1"])
    _same(_run(out, X)[0], _run(model, X)[0])


def test_gemm_chain_with_transposed_weights() -> None:
    inits = {
        "w1": _w(16, 10),  # transB=1: [N, K]
        "b1": RNG.normal(0, 0.5, 16).astype(np.float32),
        "w2": _w(16, 12).copy(),  # transB=0: [K, N]
        "b2": RNG.normal(0, 0.5, 12).astype(np.float32),
    }
    inits["w2"] *= np.exp(RNG.normal(0, 1.5, (1, 12))).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["g1"], transB=1),
        helper.make_node("PRelu", ["g1", "slope"], ["a1"]),
        helper.make_node("Gemm", ["a1", "w2", "b2"], ["y"], alpha=0.5),
    ]
    inits["slope"] = RNG.uniform(0, 0.3, 16).astype(np.float32)
    model = _model(nodes, inits, ["N", 10], {"y": ["N", 12]})
    x = RNG.normal(0, 2, (5, 10)).astype(np.float32)
    out, changed, m = _equalized(model)
    assert changed and len(find_pairs(m)) == 1
    _same(_run(out, x)[0], _run(model, x)[0])
    first, second = find_pairs(m)[0]
    np.testing.assert_allclose(first.out_ranges(), second.in_ranges(), rtol=1e-3)


def test_branches_and_shared_weights_are_skipped() -> None:
    c = 8
    inits = {"w1": _w(c, 3, 3, 3), "w2": _w(c, c, 1, 1), "w3": _w(c, c, 1, 1)}
    branch = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["a1"]),
        helper.make_node("Conv", ["a1", "w2"], ["y"]),  # a1 has two readers: rescaling it would change z
        helper.make_node("Conv", ["a1", "w3"], ["z"]),
    ]
    model = _model(branch, inits, ["N", 3, 8, 8], {"y": ["N", c, 8, 8], "z": ["N", c, 8, 8]})
    out, changed, _ = _equalized(model)
    assert not changed
    assert out.graph.initializer[0] == model.graph.initializer[0]
    shared = [  # w2 read by two convs
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["a1"]),
        helper.make_node("Conv", ["a1", "w2"], ["c2"]),
        helper.make_node("Conv", ["c2", "w2"], ["y"]),
    ]
    model = _model(shared, inits, ["N", 3, 8, 8], {"y": ["N", c, 8, 8]})
    out, changed, _ = _equalized(model)
    assert not changed
    _same(_run(out, X[:, :, :8, :8])[0], _run(model, X[:, :, :8, :8])[0])


def test_intermediate_graph_output_is_not_rescaled() -> None:
    c = 8
    inits = {"w1": _w(c, 3, 3, 3), "w2": _w(c, c, 1, 1)}
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c1", "w2"], ["y"]),
    ]
    model = _model(nodes, inits, ["N", 3, 8, 8], {"y": ["N", c, 8, 8], "c1": ["N", c, 8, 8]})
    _, changed, _ = _equalized(model)
    assert not changed


def test_recipe_option_is_recorded_in_the_plan_and_helps_per_tensor_weights(tmp_path) -> None:
    model = _conv_chain("Relu", depthwise=True)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    calib = RNG.normal(0, 1, (32, 3, 16, 16)).astype(np.float32)
    x = RNG.normal(0, 1, (16, 3, 16, 16)).astype(np.float32)
    ref = _run(model, x)[0]
    errors = {}
    for eq in (False, True):
        recipe = lowbit.Recipe(default=lowbit.Scheme(per_channel=False), equalize=eq)
        result = lowbit.quantize(path, tmp_path / f"q{eq}.onnx", calib=calib, recipe=recipe, progress=False)
        assert result.plan.recipe["equalize"] is eq
        errors[eq] = float(np.abs(_run(result.model, x)[0] - ref).mean())
    assert errors[True] < errors[False]  # per-tensor weights: the wide channels no longer set every step
    with pytest.raises(lowbit.LowbitError, match="equalize"):
        lowbit.Recipe(equalize="yes")  # type: ignore[arg-type]


@pytest.mark.slow
def test_equalize_end_to_end_on_the_captcha_crnn(tmp_path) -> None:
    """`--equalize` on a real model with pairs to rescale (captcha-whisperer's CRNN: 14 conv pairs). The float
    function is kept, and the quantized model reads the held-out captchas as well as without it (bench: 0.990 vs
    0.975 exact strings on 200)."""
    from lowbit.passes import prepare
    from lowbit.passes.equalize import equalize as run_equalize
    from lowbit.pipeline import load
    from lowbit_zoo.corpus.registry import BY_NAME, ROOT

    entry = BY_NAME["captcha_crnn"]
    path = entry.get(ROOT)
    loaded = load(path)
    prepare(loaded.model)
    assert len(find_pairs(loaded.model)) >= 10
    run_equalize(loaded.model)
    held = entry.eval(path, 32)
    before = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    after = ort.InferenceSession(ir.to_proto(loaded.model).SerializeToString(), providers=["CPUExecutionProvider"])
    for feed in held[:8]:
        a, b = before.run(None, feed)[0], after.run(None, feed)[0]
        assert np.abs(a - b).max() <= 1e-4 * max(1.0, float(np.abs(a).max()))
    recipe = lowbit.Recipe(equalize=True)
    result = lowbit.quantize(path, tmp_path / "q.onnx", calib=entry.calib(path), recipe=recipe, progress=False)
    assert result.plan.recipe["equalize"] is True
    quant = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    ref = [before.run(None, f)[0] for f in held]
    got = [quant.run(None, f)[0] for f in held]
    assert entry.outputs[0].metric(ref, got) >= 0.9  # exact strings, 32 captchas
