"""A float weight read by several nodes (an unrolled RNN's steps) is stored once after quantizing, not per node."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lowbit


def _unrolled(steps: int = 4, d: int = 64) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.2, (d, d)).astype(np.float32), "w")]
    nodes, x = [], "x"
    for i in range(steps):
        nodes += [
            helper.make_node("MatMul", [x, "w"], [f"m{i}"], name=f"step{i}"),
            helper.make_node("Relu", [f"m{i}"], [f"h{i}"], name=f"relu{i}"),
        ]
        x = f"h{i}"
    graph = helper.make_graph(
        nodes,
        "unrolled",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", d])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", d])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("mode", ["static", "dynamic", "weight_only"])
def test_a_shared_weight_is_stored_once(mode: str) -> None:
    model = _unrolled()
    calib = np.random.default_rng(1).normal(0, 1, (16, 64)).astype(np.float32)
    recipe = lowbit.Recipe(default=lowbit.Scheme(mode=mode))
    result = lowbit.quantize(model, calib=calib if mode == "static" else None, recipe=recipe, progress=False)
    big = [t for t in result.model.graph.initializer if np.prod(t.dims) == 64 * 64]
    assert len(big) == 1, [t.name for t in big]
    assert big[0].data_type == TensorProto.INT8
    assert result.quantized_bytes < 0.5 * model.ByteSize()
    sess_in = np.random.default_rng(2).normal(0, 1, (4, 64)).astype(np.float32)
    import onnxruntime as ort

    ref = ort.InferenceSession(model.SerializeToString()).run(None, {"x": sess_in})[0]
    got = ort.InferenceSession(result.model.SerializeToString()).run(None, {"x": sess_in})[0]
    cos = np.sum(ref * got) / (np.linalg.norm(ref) * np.linalg.norm(got))
    assert cos > 0.99
