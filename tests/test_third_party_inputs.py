"""Model inputs and outputs as third-party exports shape them (second sweep of PyPI models): a converted
scikit-learn classifier's ZipMap output, time-first [frames, features] inputs with no batch axis (madmom's audio
models), and recurrent states of fixed size with no batch axis. Each used to end in a traceback or in an error
that named no way out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lowbit
from conftest import run_cli
from lowbit.errors import LowbitError


def _zipmap_classifier() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])
    label = helper.make_tensor_value_info("label", TensorProto.INT64, [None])
    seq = helper.make_sequence_type_proto(
        helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, []))
    )
    probs = helper.make_value_info("probabilities", seq)
    clf = helper.make_node(
        "LinearClassifier",
        ["x"],
        ["label", "scores"],
        domain="ai.onnx.ml",
        classlabels_ints=[0, 1],
        coefficients=[0.1] * 8,
        intercepts=[0.0, 0.0],
    )
    zipmap = helper.make_node("ZipMap", ["scores"], ["probabilities"], domain="ai.onnx.ml", classlabels_int64s=[0, 1])
    graph = helper.make_graph([clf, zipmap], "sklearn", [x], [label, probs])
    opsets = [helper.make_opsetid("", 13), helper.make_opsetid("ai.onnx.ml", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def test_a_zipmap_output_is_one_line_naming_the_reexport(tmp_path: Path) -> None:
    model = _zipmap_classifier()
    onnx.checker.check_model(model)  # a valid model: the problem is its output type, not the file
    path = tmp_path / "clf.onnx"
    onnx.save(model, path)
    calib = tmp_path / "x.npy"
    np.save(calib, np.random.default_rng(0).random((8, 4), dtype=np.float32))
    run = run_cli("quantize", str(path), "--calib", str(calib), "-o", str(tmp_path / "out.onnx"), "--quiet")
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith("lowbit: error: ") and run.stderr.strip().count("\n") == 0, run.stderr
    assert "'probabilities' is a sequence" in run.stderr and "zipmap" in run.stderr
    with pytest.raises(LowbitError, match="not a tensor"):
        lowbit.quantize(model, calib=[{"x": np.zeros((1, 4), np.float32)}], progress=False)
    assert not list(tmp_path.glob("out*"))


def _time_first(kernel: int, state: bool = False) -> onnx.ModelProto:
    """[frames, 4] -> a 1-D conv over frames (no padding), as madmom's converter writes it: frames are no batch."""
    rng = np.random.default_rng(1)
    w = numpy_helper.from_array(rng.standard_normal((6, 4, kernel)).astype(np.float32) * 0.3, "w")
    axes = numpy_helper.from_array(np.array([0], np.int64), "axes")
    nodes = [
        helper.make_node("Transpose", ["input"], ["t"], perm=[1, 0]),
        helper.make_node("Unsqueeze", ["t", "axes"], ["u"]),
        helper.make_node("Conv", ["u", "w"], ["c"]),
        helper.make_node("Relu", ["c"], ["output"]),
    ]
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["frames", 4])]
    outputs = [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 6, "out_frames"])]
    if state:  # a recurrent state of fixed size, no batch axis
        inputs.append(helper.make_tensor_value_info("state_in", TensorProto.FLOAT, [5]))
        nodes.append(helper.make_node("Neg", ["state_in"], ["state_out"]))
        outputs.append(helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [5]))
    graph = helper.make_graph(nodes, "time_first", inputs, outputs, [w, axes])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _files(folder: Path, state: bool = False) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(2)
    for i in range(4):
        arrays = {"input": rng.random((20, 4), dtype=np.float32)}
        if state:
            arrays["state_in"] = np.zeros(5, np.float32)
        np.savez(folder / f"{i}.npz", **arrays)
    return folder


def test_a_time_first_input_that_fails_in_batches_names_batch_axis_none(tmp_path: Path) -> None:
    path = tmp_path / "tf.onnx"
    onnx.save(_time_first(kernel=9), path)  # 8 frames (a batch of 8 "samples") are too few for the kernel
    calib = _files(tmp_path / "calib")
    out = tmp_path / "out.onnx"
    run = run_cli("quantize", str(path), "--calib", str(calib), "-o", str(out), "--quiet")
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0, run.stderr
    assert "--batch-axis input=none" in run.stderr, run.stderr
    run = run_cli("quantize", str(path), "--calib", str(calib), "-o", str(out), "--quiet", "--batch-axis", "input=none")
    assert run.returncode == 0, run.stderr
    assert "speed: " in run.stdout


def test_speed_check_on_a_model_that_runs_in_batches_but_not_on_one_row(tmp_path: Path) -> None:
    path = tmp_path / "tf.onnx"
    onnx.save(_time_first(kernel=3), path)  # 8 frames run, 1 frame does not: the speed check used to crash
    calib = _files(tmp_path / "calib")
    run = run_cli("quantize", str(path), "--calib", str(calib), "-o", str(tmp_path / "out.onnx"), "--quiet")
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    assert "speed: " in run.stdout
    assert "not on one" in run.stderr and "--batch-axis input=none" in run.stderr, run.stderr


def test_states_of_fixed_size_name_batch_axis_none(tmp_path: Path) -> None:
    path = tmp_path / "st.onnx"
    onnx.save(_time_first(kernel=3, state=True), path)
    calib = _files(tmp_path / "calib", state=True)
    out = tmp_path / "out.onnx"
    run = run_cli("quantize", str(path), "--calib", str(calib), "-o", str(out), "--quiet")
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0, run.stderr
    assert "state_in=5" in run.stderr and "state_in=none" in run.stderr, run.stderr
    args = ("--batch-axis", "input=none", "state_in=none")
    run = run_cli("quantize", str(path), "--calib", str(calib), "-o", str(out), "--quiet", *args)
    assert run.returncode == 0, run.stderr


def _frames_model(pool: bool) -> onnx.ModelProto:
    """[frames, 4] -> per-frame scores [frames, 3], or (pool) one score vector for the whole sequence [3]."""
    w = numpy_helper.from_array(np.random.default_rng(3).standard_normal((4, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["input", "w"], ["s" if pool else "output"])]
    if pool:
        nodes.append(helper.make_node("ReduceMean", ["s"], ["output"], axes=[0], keepdims=0))
    out = helper.make_tensor_value_info("output", TensorProto.FLOAT, [3] if pool else ["frames", 3])
    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["frames", 4])
    graph = helper.make_graph(nodes, "frames", [inp], [out], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_sequence_read_as_samples_is_warned_before_calibrating(tmp_path: Path) -> None:
    calib = _files(tmp_path / "calib")
    for pool in (True, False):
        path = tmp_path / f"m{pool}.onnx"
        onnx.save(_frames_model(pool), path)
        run = run_cli("quantize", str(path), "--calib", str(calib), "-o", str(tmp_path / "out.onnx"), "--quiet")
        assert run.returncode == 0, run.stderr
        # Pooled over frames: 8 "samples" came back as one vector, so frames are no batch; per-frame: they may be.
        assert ("gave no output with 8" in run.stderr) == pool, run.stderr
        assert ("--batch-axis input=none" in run.stderr) == pool
    args = ("--batch-axis", "input=none")
    run = run_cli(
        "quantize", str(tmp_path / "mTrue.onnx"), "--calib", str(calib), "-o", str(tmp_path / "o.onnx"), *args
    )
    assert run.returncode == 0 and "gave no output" not in run.stderr, run.stderr


def test_bench_on_inputs_a_model_cannot_run_is_one_line_and_takes_batch_axes(tmp_path: Path) -> None:
    path = tmp_path / "tf.onnx"
    onnx.save(_time_first(kernel=3), path)  # random inputs give 1 frame: too few for the kernel
    run = run_cli("bench", str(path), "--runs", "2", "--warmup", "0", "--no-profile", "--quiet")
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0, run.stderr
    assert "fails on the benchmark inputs" in run.stderr and "--data" in run.stderr, run.stderr
    calib = _files(tmp_path / "calib")
    args = ("--data", str(calib), "--batch-axis", "input=none")
    run = run_cli("bench", str(path), "--runs", "2", "--warmup", "0", "--no-profile", "--quiet", *args)
    assert run.returncode == 0, run.stderr
    assert "1.00x" in run.stdout
