"""Calibration data whose files hold sequences of different lengths: the check after quantizing compares them
(padded alike on both sides) instead of failing to join them."""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from conftest import run_cli
from lowbit.evaluate.metrics import cosine, vector_cosine
from lowbit.runtimes.ort import join, pad_to


def _token_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(0, 0.5, (8, 8)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
    graph = helper.make_graph(
        nodes,
        "tokens",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "L", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "L", 8])],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_join_pads_batches_of_different_lengths() -> None:
    a, b = np.ones((2, 3, 4), np.float32), np.full((1, 5, 4), 2, np.float32)
    joined = join([a, b])
    assert joined.shape == (3, 5, 4)
    assert np.all(joined[:2, 3:] == 0) and np.all(joined[2] == 2)
    assert pad_to(a, (5, 4)).shape == (2, 5, 4)
    assert pad_to(a, (3, 4)) is a


def test_cosine_leaves_out_rows_zero_on_both_sides() -> None:
    ref = np.array([[1.0, 0.0], [0.0, 0.0]])
    assert cosine(ref, ref) == 1.0  # the padded row neither agrees nor disagrees
    assert cosine(ref, np.array([[0.0, 1.0], [0.0, 0.0]])) == 0.0
    assert cosine(ref, np.array([[1.0, 0.0], [1.0, 0.0]])) == 0.5  # one side zero is a disagreement
    assert cosine(np.zeros((2, 3)), np.zeros((2, 3))) == 1.0
    tokens = np.concatenate([np.random.default_rng(1).normal(size=(1, 3, 4)), np.zeros((1, 2, 4))], axis=1)
    assert vector_cosine(tokens, tokens) == 1.0


def test_quantize_checks_sequences_of_different_lengths(tmp_path) -> None:
    model = tmp_path / "tokens.onnx"
    onnx.save(_token_model(), model)
    calib = tmp_path / "calib"
    calib.mkdir()
    rng = np.random.default_rng(2)
    for i, length in enumerate((5, 9, 7)):
        np.save(calib / f"s{i}.npy", rng.normal(0, 1, (4, length, 8)).astype(np.float32))
    run = run_cli("quantize", str(model), "--calib", str(calib), "-o", str(tmp_path / "q.onnx"), "--json")
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    check = json.loads(run.stdout)["check"]
    assert check["samples"] == 12
    first = check["outputs"][0]
    assert first["kernels"]["cosine"] > 0.99  # padded token rows would read 0 each and pull this to ~0.7
