"""Plan decisions on tiny models: what stays float and why, constants as weights, graph output names."""

from __future__ import annotations

import numpy as np
import onnx

import lowbit
from helpers import (
    const_node,
    dq_source,
    init,
    model,
    node,
    nodes_of,
    op_counts,
    optimized,
    quantize,
    rel_rms,
    run,
    samples,
    weight,
)
from test_ops import conv_model

I64 = np.int64


def _two_convs():
    return model(
        [
            node("Conv", ["x", "w1"], ["a"], name="conv1", pads=[1] * 4),
            node("Sigmoid", ["a"], ["s"], name="sig"),
            node("Conv", ["s", "w2"], ["y"], name="conv2", pads=[1] * 4),
        ],
        {"x": (1, 3, 8, 8)},
        {"y": (1, 2, 8, 8)},
        {"w1": weight((4, 3, 3, 3), 1), "w2": weight((2, 4, 3, 3), 2)},
    )


def _float_conv_inputs_untouched(m: onnx.ModelProto, name: str) -> None:
    (n,) = [x for x in m.graph.node if x.name == name]
    w = [p for p in m.graph.node if n.input[1] in p.output]
    assert not w and init(m, n.input[1]).dtype == np.float32  # weight stays a float initializer


def test_excluded_by_name_stays_float():
    m = _two_convs()
    res = quantize(m, lowbit.Recipe(exclude_names=("conv2",)))
    assert not res.plan.nodes["conv2"].quantized
    assert "exclu" in res.plan.nodes["conv2"].reason
    assert res.plan.nodes["conv1"].quantized
    _float_conv_inputs_untouched(res.model, "conv2")
    assert "conv2:1" not in res.plan.tensors
    assert dq_source(res.model, nodes_of(res.model, "Conv")[0].input[1])  # conv1's weight is still quantized
    onnx.checker.check_model(res.model)
    feeds = samples(m, 4, seed=3)
    assert rel_rms(run(m, feeds, float_model=True)[0], run(res.model, feeds, "kernels")[0]) < 0.05
    assert op_counts(optimized(res.model))["Conv"] >= 1


def test_excluded_by_op_type_stays_float():
    m = _two_convs()
    res = quantize(m, lowbit.Recipe(exclude_op_types=("Conv",)))
    for name in ("conv1", "conv2"):
        assert not res.plan.nodes[name].quantized
        assert "exclu" in res.plan.nodes[name].reason and "Conv" in res.plan.nodes[name].reason
        _float_conv_inputs_untouched(res.model, name)
    assert res.plan.nodes["sig"].quantized
    onnx.checker.check_model(res.model)
    feeds = samples(m, 4, seed=3)
    assert rel_rms(run(m, feeds, float_model=True)[0], run(res.model, feeds, "kernels")[0]) < 0.05


def test_runtime_weight_conv_stays_float():
    # the conv weight is the output of a node that depends on an input: it cannot be quantized ahead of time
    m = model(
        [node("Mul", ["wx", "g"], ["w"], name="scale_w"), node("Conv", ["x", "w"], ["y"], name="conv", pads=[1] * 4)],
        {"x": (1, 3, 8, 8), "g": (1, 1, 1, 1)},
        {"y": (1, 4, 8, 8)},
        {"wx": weight((4, 3, 3, 3), 1)},
    )
    calib = [{"x": f["x"], "g": np.abs(f["g"]) + 0.5} for f in samples(m, 8)]
    res = lowbit.quantize(m, calib=calib, progress=False)
    d = res.plan.nodes["conv"]
    assert not d.quantized and "run time" in d.reason
    (conv,) = nodes_of(res.model, "Conv")
    assert "conv:1" not in res.plan.tensors and "x" not in res.plan.tensors
    assert conv.input[0] == "x"  # float conv: its input is not quantized for it
    # the Mul feeding the weight stays float too: only the float conv reads it
    assert not res.plan.nodes["scale_w"].quantized and "only float ops" in res.plan.nodes["scale_w"].reason
    assert conv.input[1] == "w"
    onnx.checker.check_model(res.model)
    feeds = calib[:3]
    for mode in ("simulate", "kernels"):
        assert rel_rms(run(m, feeds, float_model=True)[0], run(res.model, feeds, mode)[0]) < 0.05


def test_constant_node_weights_quantized_like_initializers():
    w, b = weight((4, 3, 3, 3), 1), weight((4,), 2, 0.2)
    with_inits = conv_model()  # same seeds: same values
    with_consts = model(
        [
            const_node("w", w),
            const_node("b", b),
            node("Conv", ["x", "w", "b"], ["y"], name="op", pads=[1] * 4, group=1),
        ],
        {"x": (1, 3, 8, 8)},
        {"y": (1, 4, 8, 8)},
    )
    r1, r2 = quantize(with_inits), quantize(with_consts)
    assert not nodes_of(r2.model, "Constant")
    assert r2.plan.nodes["op"].quantized
    for key in ("op:1", "op:2", "x", "y"):
        assert r1.plan.tensors[key] == r2.plan.tensors[key], key
    (c1,), (c2,) = nodes_of(r1.model, "Conv"), nodes_of(r2.model, "Conv")
    for i in (1, 2):
        d1, d2 = dq_source(r1.model, c1.input[i]), dq_source(r2.model, c2.input[i])
        np.testing.assert_array_equal(init(r1.model, d1.input[0]), init(r2.model, d2.input[0]))
    assert op_counts(optimized(r2.model))["QLinearConv"] == 1
    feeds = samples(with_inits, 4, seed=5)
    np.testing.assert_array_equal(run(r1.model, feeds, "kernels")[0], run(r2.model, feeds, "kernels")[0])


def test_quantized_graph_output_keeps_its_name():
    m = model(
        [
            node("Conv", ["x", "w"], ["logits"], name="conv", pads=[1] * 4),
            node("Sigmoid", ["logits"], ["prob"], name="sig"),
        ],
        {"x": (1, 3, 8, 8)},
        {"logits": (1, 4, 8, 8), "prob": (1, 4, 8, 8)},
        {"w": weight((4, 3, 3, 3), 1)},
    )
    res = quantize(m)
    g = res.model.graph
    assert [o.name for o in g.output] == ["logits", "prob"]
    assert [i.name for i in g.input] == ["x"]
    for o in ("logits", "prob"):
        assert dq_source(res.model, o)  # the graph output is the dequantized tensor
    # the Sigmoid still reads the quantized logits, not the float tensor behind them
    (sig,) = nodes_of(res.model, "Sigmoid")
    assert dq_source(res.model, sig.input[0])
    feeds = samples(m, 4, seed=2)
    ref = run(m, feeds, float_model=True)
    for mode in ("simulate", "kernels"):
        out = run(res.model, feeds, mode)
        for r, o in zip(ref, out):
            assert rel_rms(r, o) < 0.03


def test_every_float_node_has_a_reason():
    inits = {"w1": weight((4, 3, 3, 3), 1), "w2": weight((2, 4, 1, 1), 2), "shape": np.array([1, -1], I64)}
    m = model(
        [
            node("Conv", ["x", "w1"], ["a"], name="conv1", pads=[1] * 4),
            node("Erf", ["a"], ["e"], name="erf"),  # no quantized form
            node("Conv", ["e", "w2"], ["c"], name="conv2"),
            node("Shape", ["c"], ["shp"], name="shape_of"),  # integer shape arithmetic
            node("Cos", ["u"], ["cx"], name="cos"),  # no quantized form
            node("Reshape", ["cx", "shape"], ["flat"], name="reshape"),  # data movement between float ops
            node("Conv", ["x", "w1"], ["z"], name="excluded"),
        ],
        {"x": (1, 3, 8, 8), "u": (1, 6)},
        {"c": None, "shp": None, "flat": None, "z": None},
        inits,
        int_outputs=("shp",),
    )
    res = quantize(m, lowbit.Recipe(exclude_names=("excl*",)))
    floats = {k: v for k, v in res.plan.nodes.items() if not v.quantized}
    assert set(floats) >= {"erf", "shape_of", "cos", "reshape", "excluded"}
    for name, entry in res.plan.nodes.items():
        assert entry.reason.strip(), name
    assert "Erf" in floats["erf"].reason
    assert "float ops" in floats["reshape"].reason
    assert "excluded" in floats["excluded"].reason
    assert res.plan.nodes["conv1"].quantized and res.plan.nodes["conv2"].quantized
    onnx.checker.check_model(res.model)
    feeds = samples(m, 2)
    ref = run(m, feeds, float_model=True)
    out = run(res.model, feeds, "kernels")
    np.testing.assert_array_equal(ref[1], out[1])
    np.testing.assert_array_equal(ref[2], out[2])  # the all-float branch computes exactly what it did
    assert "u" not in res.plan.tensors and "cx" not in res.plan.tensors
    assert rel_rms(ref[0], out[0]) < 0.05
    assert rel_rms(ref[3], out[3]) < 0.05  # excluded conv: float, but reads the quantized x it shares
