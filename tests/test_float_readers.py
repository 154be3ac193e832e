"""Several float layers reading one quantized tensor: each reaches ONNX Runtime through a per-channel
DequantizeLinear (rewrite.insert_qdq), shared by the readers of one channel count."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import lowbit
from lowbit.runtimes.ort import run_all, session


def _fork() -> onnx.ModelProto:
    rng = np.random.default_rng(0)

    def w(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.normal(0, 0.3, shape).astype(np.float32), name)

    pads = [1, 1, 1, 1]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], name="c1", pads=pads),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["b"], name="c2", pads=pads),
        helper.make_node("Conv", ["r", "w3"], ["c"], name="c3", pads=pads),
        helper.make_node("Relu", ["c"], ["rc"], name="relu3"),  # else the summed convs of one input merge
        helper.make_node("Add", ["b", "rc"], ["d"], name="add"),
        helper.make_node("Conv", ["d", "w4"], ["y"], name="c4", pads=pads),
    ]
    graph = helper.make_graph(
        nodes,
        "fork",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 16, 16])],
        [w("w1", (8, 3, 3, 3)), w("w2", (8, 8, 3, 3)), w("w3", (8, 8, 3, 3)), w("w4", (8, 8, 3, 3))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_two_float_convs_share_one_per_channel_dequantize() -> None:
    x = np.random.default_rng(1).normal(0, 1, (16, 3, 16, 16)).astype(np.float32)
    recipe = lowbit.Recipe(exclude_names=("c2", "c3"))
    model = lowbit.quantize(_fork(), calib=x, recipe=recipe, progress=False).model
    onnx.checker.check_model(model)
    nodes = {n.name: n for n in model.graph.node}
    producer = {o: n for n in model.graph.node for o in n.output}
    dq = [producer[nodes[c].input[0]] for c in ("c2", "c3")]
    assert dq[0] is dq[1] and dq[0].op_type == "DequantizeLinear"
    assert [a.i for a in dq[0].attribute if a.name == "axis"] == [1]
    kern = run_all(session(model, "kernels"), [{"x": x}])[0]
    sim = run_all(session(model, "simulate"), [{"x": x}])[0]
    assert np.abs(kern - sim).max() <= 1e-3 * np.abs(sim).max()
