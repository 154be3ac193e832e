"""Patterns from the third sweep of PyPI models (a Graphormer-style reaction model, a weight-tied transformer):
a table of attention biases whose padding row is -inf, a layer's weights reused through Identity, a weight holding
infinities, and an output with no batch axis in the kernels-vs-simulation pass. Each used to end in an error that
blamed the data, a traceback, or a quantized model bigger and slower than its float one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lowbit
from conftest import run_cli
from helpers import rel_rms, run
from lowbit.data import InputSpec, open_data
from lowbit.decision import Reason
from lowbit.errors import LowbitError
from lowbit.evaluate.kernel_gap import compare
from lowbit.evaluate.outputs import classify
from lowbit.export.tflite.probe import static_shapes
from lowbit.runtimes.ort import run_all, session

D = 16


def _attention_with_bias_table() -> onnx.ModelProto:
    """x [N, D] and ids [N] -> softmax(x @ W + table[ids]) @ V. Row 0 of the table is -inf in half its columns,
    as a spatial encoder masks padding: the float output stays finite, every logit row keeps finite entries."""
    r = np.random.default_rng(0)
    table = r.normal(0, 1, (5, D)).astype(np.float32)
    table[0, : D // 2] = -np.inf
    inits = [
        numpy_helper.from_array(table, "table"),
        numpy_helper.from_array(r.normal(0, 0.5, (D, D)).astype(np.float32), "w"),
        numpy_helper.from_array(r.normal(0, 0.5, (D, 4)).astype(np.float32), "v"),
    ]
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["bias"], name="bias", axis=0),
        helper.make_node("MatMul", ["x", "w"], ["scores"], name="scores"),
        helper.make_node("Add", ["scores", "bias"], ["masked"], name="mask"),
        helper.make_node("Softmax", ["masked"], ["p"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["y"], name="out"),
    ]
    graph = helper.make_graph(
        nodes,
        "bias_table",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", D]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["N"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    return m


def _bias_feeds(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    r = np.random.default_rng(seed)
    return [
        {"x": r.uniform(-1, 1, (1, D)).astype(np.float32), "ids": r.integers(0, 5, (1,)).astype(np.int64)}
        for _ in range(n)
    ]


def test_a_bias_table_with_a_minus_inf_row_quantizes_and_keeps_the_mask_float() -> None:
    m = _attention_with_bias_table()
    calib = _bias_feeds(32, 1)
    assert all(np.isfinite(run(m, [f], float_model=True)[0]).all() for f in calib)
    assert any(f["ids"].min() == 0 for f in calib)  # the -inf row is read: calibration sees infinities
    # Before: "cannot quantize a range that is NaN or infinite; check the calibration data" (the table's SQNR was
    # measured on int8 copies of it), then "tensor ... is NaN or Inf on the calibration data" in calibration.
    res = lowbit.quantize(m, calib=calib, progress=False)
    nodes = res.plan.nodes
    assert nodes["scores"].quantized and nodes["out"].quantized
    assert not nodes["softmax"].quantized and nodes["softmax"].code is Reason.SENTINEL
    assert not nodes["mask"].quantized and nodes["mask"].code is Reason.SENTINEL
    # The plan is strict JSON: the -inf edge is recorded as float32's extreme (Python wrote "-Infinity" before).
    text = res.plan.to_json()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"plan holds {c}"))
    assert nodes["mask"].details["edge"] == -float(np.finfo(np.float32).max)
    held = _bias_feeds(16, 2)
    ref = run(m, held, float_model=True)[0]
    got = run(res.model, held, mode="kernels")[0]
    assert np.isfinite(got).all() and rel_rms(ref, got) < 0.05


def test_a_weight_holding_infinities_stays_float_with_the_reason() -> None:
    w = np.random.default_rng(0).normal(0, 0.5, (D, D)).astype(np.float32)
    w[3, 5] = np.inf
    m = helper.make_model(
        helper.make_graph(
            [
                helper.make_node("MatMul", ["x", "w"], ["h"], name="inf_weight"),
                helper.make_node("Relu", ["h"], ["r"], name="relu"),
                helper.make_node("MatMul", ["x", "w2"], ["y"], name="plain"),
            ],
            "inf_weight",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", D])],
            [
                helper.make_tensor_value_info("r", TensorProto.FLOAT, ["N", D]),
                helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", D]),
            ],
            [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.full((D, D), 0.25, np.float32), "w2")],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    feeds = [{"x": np.random.default_rng(k).uniform(-1, 1, (1, D)).astype(np.float32)} for k in range(8)]
    for mode in ("static", "dynamic"):
        res = lowbit.quantize(m, calib=feeds, recipe=lowbit.Recipe(default=lowbit.Scheme(mode=mode)), progress=False)
        d = res.plan.nodes["inf_weight"]
        assert not d.quantized and d.code is Reason.NONFINITE_WEIGHT, (mode, d.reason)
        assert "1 NaN or infinite values of 256" in d.reason
        assert res.plan.nodes["plain"].quantized


TIED = 288  # 82944 elements: past what constant folding copies (a small Identity was folded into a copy before)


def _tied_layers(layers: int = 4) -> onnx.ModelProto:
    """The same layer applied `layers` times, as PyTorch exports a weight-tied stack: the first reader reads the
    initializer, every later one an Identity of it."""
    r = np.random.default_rng(0)
    nodes, x = [], "x"
    for i in range(layers):
        w = "w" if i == 0 else f"w_again{i}"
        if i:
            nodes.append(helper.make_node("Identity", ["w"], [w], name=f"tie{i}"))
        nodes += [
            helper.make_node("MatMul", [x, w], [f"m{i}"], name=f"layer{i}"),
            helper.make_node("Relu", [f"m{i}"], [f"h{i}"], name=f"relu{i}"),
        ]
        x = f"h{i}"
    graph = helper.make_graph(
        nodes,
        "tied",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", TIED])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", TIED])],
        [numpy_helper.from_array(r.normal(0, 0.06, (TIED, TIED)).astype(np.float32), "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_weight_reused_through_identity_is_quantized_as_a_weight_and_stored_once() -> None:
    m = _tied_layers()
    feeds = [{"x": np.random.default_rng(k).uniform(0, 1, (1, TIED)).astype(np.float32)} for k in range(16)]
    res = lowbit.quantize(m, calib=feeds, progress=False)
    # Before: layers 1-3 read the weight as a second activation (quantized on every run), and the float weight
    # stayed in the file beside the int8 one: 125% of the float model's size.
    for i in range(4):
        assert f"layer{i}:1" in res.plan.tensors and res.plan.tensors[f"layer{i}:1"].kind == "weight"
    big = [numpy_helper.to_array(t) for t in res.model.graph.initializer if np.prod(t.dims) >= TIED * TIED]
    assert [a.dtype for a in big] == [np.int8]
    assert res.quantized_bytes < 0.5 * res.float_bytes
    ref = run(m, feeds, float_model=True)[0]
    assert rel_rms(ref, run(res.model, feeds, mode="kernels")[0]) < 0.05


def test_the_simulation_pass_joins_outputs_without_a_batch_axis_as_run_all_does() -> None:
    """An input fixed at batch 1 and an output [S, S] with no batch axis (an attention map of the one sequence):
    the pass that finds where kernels and simulation part gave [samples * S, S], the check [samples, S, S], and
    comparing them raised numpy's broadcast error."""
    s = 6
    w = np.random.default_rng(0).normal(0, 0.5, (s, s)).astype(np.float32)
    m = helper.make_model(
        helper.make_graph(
            [
                helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
                helper.make_node("Squeeze", ["h", "axes"], ["sq"], name="squeeze"),
                helper.make_node("Unsqueeze", ["sq", "last"], ["col"], name="col"),
                helper.make_node("Mul", ["col", "sq"], ["y"], name="outer"),
            ],
            "no_batch_axis",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, s])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [s, s])],
            [
                numpy_helper.from_array(w, "w"),
                numpy_helper.from_array(np.array([0], np.int64), "axes"),
                numpy_helper.from_array(np.array([1], np.int64), "last"),
            ],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    feeds = [{"x": np.random.default_rng(k).uniform(-1, 1, (1, s)).astype(np.float32)} for k in range(5)]
    res = lowbit.quantize(m, calib=feeds, progress=False)
    kernels = run_all(session(res.model, mode="kernels"), feeds)[0]
    assert kernels.shape == (5, s, s)
    _, sims = compare(res.model, feeds)
    assert sims[0].shape == kernels.shape


def _message_passing() -> onnx.ModelProto:
    """A graph network's inputs, none with a batch axis: node features [num_nodes, 4], edges [2, num_edges] and
    edge weights [num_edges, 1]; the output sums the weighted messages into one row."""
    w = np.random.default_rng(0).normal(0, 0.5, (4, 4)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["feat", "w"], ["h"], name="embed"),
        helper.make_node("Gather", ["edge_index", "zero"], ["src"], name="src", axis=0),
        helper.make_node("Gather", ["h", "src"], ["msg"], name="msg", axis=0),
        helper.make_node("Mul", ["msg", "edge_w"], ["weighted"], name="weigh"),
        helper.make_node("ReduceSum", ["weighted", "zero_axes"], ["y"], name="pool", keepdims=1),
    ]
    graph = helper.make_graph(
        nodes,
        "gnn",
        [
            helper.make_tensor_value_info("feat", TensorProto.FLOAT, ["num_nodes", 4]),
            helper.make_tensor_value_info("edge_index", TensorProto.INT64, [2, "num_edges"]),
            helper.make_tensor_value_info("edge_w", TensorProto.FLOAT, ["num_edges", 1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(np.array(0, np.int64), "zero"),
            numpy_helper.from_array(np.array([0], np.int64), "zero_axes"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_inputs_with_no_batch_axis_at_all_get_the_whole_batch_axis_option(tmp_path: Path) -> None:
    r = np.random.default_rng(0)
    path = tmp_path / "gnn.onnx"
    onnx.save(_message_passing(), path)
    calib = tmp_path / "calib"
    calib.mkdir()
    for k in range(8):
        np.savez(
            calib / f"{k}.npz",
            feat=r.random((10, 4), dtype=np.float32),
            edge_index=r.integers(0, 10, (2, 18)).astype(np.int64),
            edge_w=r.random((18, 1), dtype=np.float32),
        )
    out = tmp_path / "out.onnx"
    run = run_cli("quantize", str(path), "--calib", str(calib), "-o", str(out), "--quiet")
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0, run.stderr
    # Before: "--batch-axis feat=none edge_index=none ... takes each file whole", edge_w left to guess.
    option = "--batch-axis feat=none edge_index=none edge_w=none"
    assert option in run.stderr, run.stderr
    run = run_cli("quantize", str(path), "--calib", str(calib), "-o", str(out), "--quiet", *option.split())
    assert run.returncode == 0, run.stderr
    assert out.exists()


def test_a_time_frequency_mask_is_compared_as_values_not_as_detector_scores() -> None:
    """VoiceFilter-Lite's `mask` [N, time, 128]: sigmoid gains per frame and bin. Read as 128 anchors x 10 classes,
    its int8 twin at 52 dB SQNR scored 62% "top-class agreement" and a warning."""
    r = np.random.default_rng(0)
    gains = 1 / (1 + np.exp(-r.normal(0, 1, (8, 10, 128))))
    kind = classify(gains, "mask")
    assert kind.kind == "values", kind
    assert classify(gains, "scores").kind == "boxes"  # the same values named as a detector's stay scores


def test_a_molecular_fingerprint_is_an_embedding() -> None:
    """MiniMol's `fingerprint` [N, 512] has a dominant maximum per row, so it read as class logits ("top-1 agreement
    87.5%" and a warning) though nothing ranks its entries."""
    r = np.random.default_rng(0)
    x = r.normal(0, 0.3, (8, 512))
    x[:, 7] += 6.0
    assert classify(x, "fingerprint").kind == "embedding"
    assert classify(x, "output").kind == "class_scores"


def test_the_tflite_shape_advice_is_spelled_from_the_inputs_own_dims() -> None:
    """`--shape edge_index=1x...` told a graph network's user to put a batch of 1 before [2, num_edges]."""
    with pytest.raises(LowbitError, match=r"--shape edge_index=2xnum_edges with every name replaced"):
        static_shapes(_message_passing(), 1, {"feat": (10, 4)})


def test_a_state_whose_shape_names_the_batch_on_axis_1_is_named_in_the_error() -> None:
    """VoiceFilter-Lite's h0/c0 [3, 'batch', 512] beside stacked_logmel ['batch', 'time', 512]: the error gave the
    generic "--batch-axis state=1"; the model's own shapes say h0=1 c0=1."""
    specs = [
        InputSpec("x", np.dtype(np.float32), ("batch", "time", 8)),
        InputSpec("h0", np.dtype(np.float32), (3, "batch", 8)),
        InputSpec("c0", np.dtype(np.float32), (3, "batch", 8)),
    ]
    sample = {"x": np.zeros((1, 4, 8), np.float32), "h0": np.zeros((3, 1, 8), np.float32)}
    sample["c0"] = sample["h0"]
    with pytest.raises(LowbitError, match=r"their shapes put the batch there: --batch-axis h0=1 c0=1\)"):
        list(open_data([sample], specs, batch_size=1))
    with_axes = open_data([sample], specs, batch_size=1, batch_axes={"h0": 1, "c0": 1})
    assert sum(len(b["x"]) for b in with_axes) == 1
