"""Target onnxruntime: an image stem (a Conv on a graph input of 3 channels) and its activation stay float, the rest
of the network is quantized from their output on; other targets, and wider inputs, are quantized as before."""

from __future__ import annotations

import numpy as np
import onnx

import lowbit
from helpers import model, node, quantize, rel_rms, run, samples, weight
from lowbit.decision import Reason


def _net(channels: int = 3) -> onnx.ModelProto:
    nodes = [
        node("Conv", ["x", "w1", "b1"], ["c1"], name="stem", pads=[1, 1, 1, 1], strides=[2, 2]),
        node("HardSwish", ["c1"], ["h1"], name="stem_act"),
        node("Conv", ["h1", "w2", "b2"], ["c2"], name="pw"),
        node("Relu", ["c2"], ["y"], name="relu"),
    ]
    inits = {
        "w1": weight((16, channels, 3, 3), 1),
        "b1": weight((16,), 2, 0.1),
        "w2": weight((8, 16, 1, 1), 3),
        "b2": weight((8,), 4, 0.1),
    }
    return model(nodes, {"x": (1, channels, 16, 16)}, {"y": (1, 8, 8, 8)}, inits, opset=17)


def _reads_of(m: onnx.ModelProto, tensor: str) -> list[str]:
    return [n.op_type for n in m.graph.node if tensor in n.input]


def test_the_stem_and_its_activation_stay_float_for_onnxruntime() -> None:
    m = _net()
    res = quantize(m, lowbit.Recipe(target="onnxruntime"), n=32)
    for name in ("stem", "stem_act"):
        d = res.plan.nodes[name]
        assert not d.quantized and d.code == Reason.IMAGE_STEM, (name, d.reason)
    assert "3 input channels" in res.plan.nodes["stem"].reason
    assert res.plan.nodes["pw"].quantized
    assert _reads_of(res.model, "x") == ["Conv"]  # the input goes to the float conv, not a QuantizeLinear
    assert "QuantizeLinear" in _reads_of(res.model, "h1")  # quantized from the stem's output on
    feeds = samples(m, 16, seed=7)
    assert rel_rms(run(m, feeds, float_model=True)[0], run(res.model, feeds, mode="kernels")[0]) < 0.05


def test_the_portable_target_and_wider_inputs_quantize_the_first_conv() -> None:
    portable = quantize(_net(), n=32)
    assert portable.plan.nodes["stem"].quantized
    wide = quantize(_net(channels=16), lowbit.Recipe(target="onnxruntime"), n=32)
    assert wide.plan.nodes["stem"].quantized
    assert np.any([n.op_type == "QuantizeLinear" and n.input[0] == "x" for n in wide.model.graph.node])


def test_a_plan_repeats_the_stem_decision(tmp_path) -> None:
    m = _net()
    first = lowbit.quantize(
        m, tmp_path / "a.onnx", calib=samples(m, 32), recipe=lowbit.Recipe(target="onnxruntime"), progress=False
    )
    assert not first.plan.nodes["stem"].quantized
    again = lowbit.quantize(m, tmp_path / "b.onnx", plan=tmp_path / "a.plan.json", progress=False)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert again.plan.nodes["stem"].code == Reason.IMAGE_STEM


def _net_with_depthwise() -> onnx.ModelProto:
    """stem -> HardSwish -> depthwise conv (stride 2) -> Relu -> pointwise conv -> depthwise conv -> Relu."""
    nodes = [
        node("Conv", ["x", "w1", "b1"], ["c1"], name="stem", pads=[1, 1, 1, 1], strides=[2, 2]),
        node("HardSwish", ["c1"], ["h1"], name="stem_act"),
        node("Conv", ["h1", "wd", "bd"], ["d1"], name="dw", pads=[1, 1, 1, 1], strides=[2, 2], group=16),
        node("Relu", ["d1"], ["r1"], name="dw_act"),
        node("Conv", ["r1", "w2", "b2"], ["c2"], name="pw"),
        node("Conv", ["c2", "wd2"], ["d2"], name="dw2", pads=[1, 1, 1, 1], group=16),
        node("Relu", ["d2"], ["y"], name="dw2_act"),
    ]
    inits = {
        "w1": weight((16, 3, 3, 3), 1),
        "b1": weight((16,), 2, 0.1),
        "wd": weight((16, 1, 3, 3), 5),
        "bd": weight((16,), 6, 0.1),
        "w2": weight((16, 16, 1, 1), 3),
        "b2": weight((16,), 4, 0.1),
        "wd2": weight((16, 1, 3, 3), 7),
    }
    return model(nodes, {"x": (1, 3, 32, 32)}, {"y": (1, 16, 8, 8)}, inits, opset=17)


def test_a_depthwise_conv_reading_the_stem_stays_float_with_it() -> None:
    m = _net_with_depthwise()
    res = quantize(m, lowbit.Recipe(target="onnxruntime"), n=32)
    for name in ("stem", "stem_act", "dw", "dw_act"):
        d = res.plan.nodes[name]
        assert not d.quantized and d.code == Reason.IMAGE_STEM, (name, d.reason)
    assert "the depthwise conv after stem" in res.plan.nodes["dw"].reason
    assert res.plan.nodes["pw"].quantized and res.plan.nodes["dw2"].quantized  # a depthwise conv further on: int8
    assert "QuantizeLinear" in _reads_of(res.model, "r1")  # quantized from the depthwise conv's output on
    feeds = samples(m, 16, seed=7)
    assert rel_rms(run(m, feeds, float_model=True)[0], run(res.model, feeds, mode="kernels")[0]) < 0.05
    assert quantize(m, n=32).plan.nodes["dw"].quantized  # the portable target quantizes it
