"""Calibration's runs a sample at a time into reused arrays (observe/runner.py) give exactly the values of plain
batch runs, and fall back to plain runs where that is not safe: outputs not batch-first, per-sample values that
differ from the batch's, output shapes that depend on the data. Kept arrays are never overwritten."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

import lowbit
from conftest import tiny_cnn
from lowbit.observe.runner import Runner
from lowbit.runtimes.ort import with_outputs

OPTS = ort.SessionOptions()
OPTS.log_severity_level = 3


def _session(model: onnx.ModelProto, outputs: list[str]) -> ort.InferenceSession:
    m = with_outputs(model, outputs)
    return ort.InferenceSession(m.SerializeToString(), OPTS, providers=["CPUExecutionProvider"])


def _batches(n: int, size: int, shape: tuple[int, ...] = (3, 16, 16), seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(0, 1, (size, *shape)).astype(np.float32) for _ in range(n)]


def _compare(model: onnx.ModelProto, fetch: list[str], batches: list[np.ndarray], name: str = "x") -> Runner:
    """Run `batches` through a Runner and through plain session.run; every value must be bit-identical."""
    sess = _session(model, fetch)
    runner = Runner(sess, fetch)
    for x in batches:
        got = [v.copy() for v in runner.run({name: x}, len(x))]
        want = sess.run(fetch, {name: x})
        assert [v.shape for v in got] == [v.shape for v in want]
        assert all(np.array_equal(a, b) for a, b in zip(got, want))
    return runner


def test_samples_run_alone_give_the_batch_values() -> None:
    fetch = ["x", "r1", "c2", "r2", "s", "g", "f", "y"]  # the graph input too: ORT hands its feed over
    runner = _compare(tiny_cnn(), fetch, _batches(4, 8))
    assert runner.split is True  # the sample-at-a-time path was really taken
    assert sorted(runner.buffers) == sorted(set(fetch) - {"x"})  # the fetched input is its feed, not a copy


def test_a_smaller_last_batch_and_one_sample_batches_run_plain() -> None:
    batches = _batches(3, 8) + _batches(1, 5, seed=1) + _batches(2, 8, seed=2)
    runner = _compare(tiny_cnn(), ["r1", "y"], batches)
    assert runner.split is True
    ones = _compare(tiny_cnn(), ["r1", "y"], _batches(3, 1))
    assert ones.split is None  # a batch of one sample says nothing about batching


def test_outputs_mixing_samples_keep_plain_batches() -> None:
    """x - mean over the batch: each sample alone gives zeros, not the batch's values."""
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["m"], axes=[0], keepdims=1),
        helper.make_node("Sub", ["x", "m"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mix",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    runner = _compare(model, ["y"], _batches(3, 8, (4,)))
    assert runner.split is False


def test_outputs_not_batch_first_keep_plain_batches() -> None:
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0]), helper.make_node("Relu", ["t"], ["y"])]
    graph = helper.make_graph(
        nodes,
        "t",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, "N"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    runner = _compare(model, ["y"], _batches(3, 8, (4,)))
    assert runner.split is False


def test_data_dependent_shapes_fall_back_to_plain_batches(capfd) -> None:
    """NonZero's output size follows the data: a later batch cannot reuse the first one's arrays."""
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("NonZero", ["r"], ["nz"])]
    graph = helper.make_graph(
        nodes,
        "nz",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
        [helper.make_tensor_value_info("nz", TensorProto.INT64, [2, "K"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    runner = _compare(model, ["r", "nz"], _batches(4, 8, (6,)))
    assert runner.split is False  # (its outputs are not batch-first either)
    # Batch-first and the same sample by sample, but the output's width follows the data: y = x[:, :k], k the
    # largest first column. The first batch (k = 3) allows sample runs; a later one (k = 5) no longer fits them.
    init = [
        helper.make_tensor("zero", TensorProto.INT64, [1], [0]),
        helper.make_tensor("one", TensorProto.INT64, [1], [1]),
        helper.make_tensor("col", TensorProto.INT64, [], [0]),
    ]
    nodes = [
        helper.make_node("Gather", ["x", "col"], ["c"], axis=1),
        helper.make_node("ReduceMax", ["c"], ["m"], keepdims=1),
        helper.make_node("Cast", ["m"], ["k"], to=TensorProto.INT64),
        helper.make_node("Slice", ["x", "zero", "k", "one"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "width",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "K"])],
        init,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    first, later = _batches(2, 8, (6,))
    first[:, 0], later[:, 0] = 3.0, 5.0
    runner = Runner(_session(model, ["y"]), ["y"])
    assert runner.run({"x": first}, 8)[0].shape == (8, 3)
    assert runner.split is True
    assert np.array_equal(runner.run({"x": later}, 8)[0], later[:, :5])
    assert runner.split is False  # the bound run failed; this batch and every later one run plain
    assert "rror" not in capfd.readouterr().err  # quietly: ONNX Runtime's own error log stays off the terminal


def test_kept_arrays_are_not_overwritten_by_later_batches() -> None:
    fetch = ["r1", "y"]
    sess = _session(tiny_cnn(), fetch)
    runner = Runner(sess, fetch)
    batches = _batches(5, 8)
    kept = []
    for i, x in enumerate(batches):
        outs = runner.run({"x": x}, 8, frozenset({"r1"}) if i in (0, 2) else frozenset())
        if i in (0, 2):
            kept.append(outs[0])
    assert runner.split is True
    assert np.array_equal(kept[0], sess.run(["r1"], {"x": batches[0]})[0])
    assert np.array_equal(kept[1], sess.run(["r1"], {"x": batches[2]})[0])


def test_quantize_gives_the_same_bytes_with_and_without_sample_runs(monkeypatch) -> None:
    """The whole pipeline (layer_error_fast default, its held tensors included) writes the same model."""
    data = np.concatenate(_batches(5, 8))
    fast = lowbit.quantize(tiny_cnn(), calib=data, progress=False)
    monkeypatch.setattr(Runner, "_check", lambda self, feeds, n, outs: False)  # plain batches only
    plain = lowbit.quantize(tiny_cnn(), calib=data, progress=False)
    assert fast.model.SerializeToString() == plain.model.SerializeToString()
    assert fast.plan.to_json() == plain.plan.to_json()
