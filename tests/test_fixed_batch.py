"""Graphs whose inputs say the batch is dynamic but whose body fixes it at 1 (a Reshape to a constant shape, as
many third-party exports have): a batch of several samples fails inside ONNX Runtime, one sample runs. lowbit says
so in one line with the fix (--batch-size 1), never with ONNX Runtime's traceback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from conftest import run_cli
from test_reliability_errors import one_line_error


def batch_of_one_model(path: Path) -> Path:
    """x [N, 6] -> Reshape to [1, 2, 3] -> MatMul [3, 4] -> y [N, 2, 4]: runs only when N is 1."""
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32), "w")
    shape = numpy_helper.from_array(np.array([1, 2, 3], np.int64), "shape")
    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["r"], name="view"),
        helper.make_node("MatMul", ["r", "w"], ["y"], name="proj"),
    ]
    graph = helper.make_graph(
        nodes,
        "fixed_batch",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 4])],
        [w, shape],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, path)
    return path


def test_eval_of_a_graph_fixed_at_batch_one_names_batch_size_one(tmp_path: Path) -> None:
    model = batch_of_one_model(tmp_path / "m.onnx")
    data = tmp_path / "x.npy"
    np.save(data, np.random.default_rng(1).normal(size=(8, 6)).astype(np.float32))
    failed = run_cli("eval", str(model), "--data", str(data), "--batch-size", "4")
    one_line_error(failed, "fails on a batch of 4 samples but runs on one", "rerun with --batch-size 1")
    assert "/onnxruntime_src/" not in failed.stderr  # ORT's C++ location is noise to the user
    ran = run_cli("eval", str(model), "--data", str(data), "--batch-size", "1")
    assert ran.returncode == 0, ran.stderr


def test_quantize_of_a_graph_fixed_at_batch_one_names_batch_size_one(tmp_path: Path) -> None:
    model = batch_of_one_model(tmp_path / "m.onnx")
    calib = tmp_path / "x.npy"
    np.save(calib, np.random.default_rng(1).normal(size=(8, 6)).astype(np.float32))
    out = tmp_path / "out.onnx"
    failed = run_cli("quantize", str(model), "--calib", str(calib), "-o", str(out), "--quiet")
    one_line_error(failed, "fails on a batch of 8 samples but runs on one", "rerun with --batch-size 1")
    assert not out.exists()
    ran = run_cli("quantize", str(model), "--calib", str(calib), "-o", str(out), "--quiet", "--batch-size", "1")
    assert ran.returncode == 0 and out.exists(), ran.stderr
