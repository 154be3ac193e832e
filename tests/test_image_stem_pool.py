"""Target onnxruntime: a MaxPool reading the float image stem stays float with it (PP-OCRv6's detector: the stem's
ReLU feeds a conv and a 2x2 max pool whose outputs are concatenated). Quantized, that pool ran as ORT's int8 MaxPool
in NCHW: 6.4 of 21 ms per run in PP-OCRv6 tiny det, and the onnxruntime target 1.37-1.46x float where the portable
one ran at 0.94-1.00x (bench/RESULTS_CORPUS.md, seventh session)."""

from __future__ import annotations

import onnx

import lowbit
from helpers import model, node, quantize, rel_rms, run, samples, weight
from lowbit.decision import Reason


def _net() -> onnx.ModelProto:
    nodes = [
        node("Conv", ["x", "w1", "b1"], ["c1"], name="stem", pads=[1, 1, 1, 1], strides=[2, 2]),
        node("Relu", ["c1"], ["r1"], name="stem_act"),
        node("MaxPool", ["r1"], ["p1"], name="pool", kernel_shape=[2, 2], strides=[1, 1], auto_pad="SAME_UPPER"),
        node("Conv", ["r1", "w2", "b2"], ["c2"], name="side", pads=[1, 1, 1, 1]),
        node("Concat", ["p1", "c2"], ["cat"], name="cat", axis=1),
        node("Conv", ["cat", "w3", "b3"], ["y"], name="mix"),
    ]
    inits = {
        "w1": weight((16, 3, 3, 3), 1),
        "b1": weight((16,), 2, 0.1),
        "w2": weight((16, 16, 3, 3), 3),
        "b2": weight((16,), 4, 0.1),
        "w3": weight((8, 32, 1, 1), 5),
        "b3": weight((8,), 6, 0.1),
    }
    return model(nodes, {"x": (1, 3, 16, 16)}, {"y": (1, 8, 8, 8)}, inits, opset=17)


def test_a_max_pool_reading_the_float_stem_stays_float_for_onnxruntime() -> None:
    m = _net()
    res = quantize(m, lowbit.Recipe(target="onnxruntime"), n=32)
    d = res.plan.nodes["pool"]
    assert not d.quantized and d.code == Reason.IMAGE_STEM, d.reason
    assert res.plan.nodes["side"].quantized and res.plan.nodes["mix"].quantized
    pool = next(n for n in res.model.graph.node if n.name == "pool")
    assert [n.op_type for n in res.model.graph.node if pool.output[0] in n.input] == ["QuantizeLinear"]
    feeds = samples(m, 16, seed=7)
    assert rel_rms(run(m, feeds, float_model=True)[0], run(res.model, feeds, mode="kernels")[0]) < 0.05
    portable = quantize(m, n=32)  # the portable target quantizes the stem, and the pool with it
    assert portable.plan.nodes["pool"].quantized
