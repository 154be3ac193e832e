"""float16 mode: fp16 weights and compute inside, float32 at the model's edges, fragile ops float32."""

from __future__ import annotations

import numpy as np
import onnx

import lowbit
from conftest import tiny_cnn
from helpers import model, node, op_counts, rel_rms, run, samples, weight
from lowbit import Recipe, Scheme

FP16 = Recipe(default=Scheme(mode="float16"))


def test_cnn_in_float16_runs_close_to_float_with_two_casts():
    m = tiny_cnn()
    res = lowbit.quantize(m, recipe=FP16, progress=False)
    assert op_counts(res.model)["Cast"] == 2  # input in, output out: the region is one piece
    assert res.model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert res.model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert all(t.data_type == onnx.TensorProto.FLOAT16 for t in res.model.graph.initializer)
    feeds = [{"x": np.random.default_rng(i).uniform(-1, 1, (1, 3, 16, 16)).astype(np.float32)} for i in range(4)]
    assert rel_rms(run(m, feeds, float_model=True)[0], run(res.model, feeds, mode="kernels")[0]) < 2e-3
    weight_bytes = lambda mp: sum(onnx.numpy_helper.to_array(t).nbytes for t in mp.graph.initializer)  # noqa: E731
    assert weight_bytes(res.model) * 2 == weight_bytes(m)
    assert res.plan.nodes["conv1"].reason == "float16 weights and compute"


def test_fragile_ops_stay_float32_with_one_cast_per_crossing():
    d = 16
    m = model(
        [
            node("MatMul", ["x", "w1"], ["h"], "q"),
            node("Softmax", ["h"], ["p"], "softmax", axis=-1),
            node("MatMul", ["p", "w2"], ["o"], "v"),
            node("Add", ["o", "h"], ["y"], "add"),
        ],
        {"x": (2, 3, d)},
        {"y": (2, 3, d)},
        {"w1": weight((d, d), 1), "w2": weight((d, d), 2)},
    )
    res = lowbit.quantize(m, recipe=FP16, progress=False)
    nodes = res.plan.nodes
    assert not nodes["softmax"].quantized and "fragile" in nodes["softmax"].reason
    # x in; h out to Softmax (once, though Add also reads h in fp16); p back in; y out.
    assert op_counts(res.model)["Cast"] == 4
    feeds = samples(m, 4)
    assert rel_rms(run(m, feeds, float_model=True)[0], run(res.model, feeds, mode="kernels")[0]) < 2e-3
