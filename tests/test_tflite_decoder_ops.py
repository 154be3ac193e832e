"""Decoder patterns from the corpus romanizer: one constant -1 indexing axes of two sizes, and LogSoftmax."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from lowbit.export.tflite import convert
from test_tflite import run_ort, run_tflite


def test_a_shared_negative_index_is_normalized_per_gather_and_log_softmax_exports():
    # x [1, 3, 5]: Gather(x, -1, axis=1) -> [1, 5] (row 2), Gather(x, -1, axis=2) -> [1, 3] (column 4)
    nodes = [
        helper.make_node("Gather", ["x", "last"], ["row"], axis=1, name="last_row"),
        helper.make_node("Gather", ["x", "last"], ["col"], axis=2, name="last_col"),
        helper.make_node("Concat", ["row", "col"], ["rc"], axis=1, name="join"),
        helper.make_node("LogSoftmax", ["rc"], ["y"], axis=-1, name="logp"),
    ]
    graph = helper.make_graph(
        nodes,
        "decoder",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        [numpy_helper.from_array(np.array(-1, np.int64), "last")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    result = convert(model)
    assert result.ops["GATHER"] == 2 and result.ops["LOG_SOFTMAX"] == 1
    x = np.random.default_rng(0).normal(0, 1, (1, 3, 5)).astype(np.float32)
    np.testing.assert_allclose(run_tflite(result.data, x), run_ort(model, x), rtol=1e-5, atol=1e-6)
