"""Patterns from the fourth sweep (models built with PyTorch's exporters from torchvision, timm, ultralytics and
transformers, as users bring them). Each test reproduces one pattern on a small graph or array and fails without
its fix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import lowbit
from conftest import run_cli
from helpers import rel_rms, run
from lowbit.data import input_specs, open_data
from lowbit.evaluate.check import runtime_check
from lowbit.evaluate.kernel_gap import gap_text
from lowbit.evaluate.outputs import classify, output_fidelity
from test_kernel_gap import _requantized

D = 8


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def test_an_ssd_heads_softmax_scores_are_a_detectors_not_a_ctc_sequence() -> None:
    # torchvision's SSDLite exported without its postprocess: scores [N, 3234, 91], a softmax over background + 90
    # classes per anchor. Read as CTC probabilities, the check reported "decoded sequence match 0.0%" at cosine 0.9994.
    r = np.random.default_rng(0)
    logits = r.normal(0, 1, (4, 1500, 21))
    logits[..., 0] += 3.0  # background wins on most anchors, as in a trained SSD
    logits[:, :40, 7] += 6.0  # a few anchors see an object
    scores = _softmax(logits, 2).astype(np.float32)
    got = classify(scores, "output_1")
    assert (got.kind, got.variant) == ("boxes", "scores_anchors_first"), got
    assert classify(scores[:, :300], "scores").kind == "boxes"  # fewer anchors, named like a detector's scores
    assert classify(scores[:, :300], "output").kind == "sequence"  # the same, unnamed: CTC steps stay CTC
    assert classify(scores, "ctc_probs").kind == "sequence"  # a sequence's name keeps it a sequence
    noisy = scores + r.normal(0, 1e-3, scores.shape).astype(np.float32)
    f = output_fidelity(scores, noisy, "output_1")
    assert f["task"]["metric"] == "class_agreement" and f["task"]["value"] > 0.9


def _decoder_with_past() -> onnx.ModelProto:
    """A decoder step's shape: x [N, D] and a key cache past [N, 2, T, D] (T = 0 on the first step) ->
    y = (x @ W) + sum over the cache, and present = Concat(past, x as one more step) on the time axis."""
    r = np.random.default_rng(0)
    w = numpy_helper.from_array(r.normal(0, 0.5, (D, D)).astype(np.float32), "w")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
        helper.make_node("ReduceSum", ["past", "axes"], ["s"], name="sum", keepdims=0),
        helper.make_node("ReduceSum", ["s", "axis1"], ["s1"], name="sum1", keepdims=0),
        helper.make_node("Add", ["h", "s1"], ["y"], name="add"),
        helper.make_node("Unsqueeze", ["h", "axes12"], ["step"], name="unsq"),
        helper.make_node("Expand", ["step", "shape2"], ["step2"], name="expand"),
        helper.make_node("Concat", ["past", "step2"], ["present"], name="cat", axis=2),
    ]
    consts = [
        numpy_helper.from_array(np.array([2], np.int64), "axes"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(np.array([1, 2], np.int64), "axes12"),
        numpy_helper.from_array(np.array([1, 2, 1, 1], np.int64), "shape2"),
    ]
    graph = helper.make_graph(
        nodes,
        "decoder_past",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", D]),
            helper.make_tensor_value_info("past", TensorProto.FLOAT, ["batch", 2, "past_seq", D]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", D]),
            helper.make_tensor_value_info("present", TensorProto.FLOAT, ["batch", 2, "total_seq", D]),
        ],
        [w, *consts],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    return m


def test_a_zero_length_kv_cache_input_reads_with_a_sample_limit(tmp_path: Path) -> None:
    # The first decoding step of an exported transformers decoder: past key/values [N, heads, 0, head_dim]. In a
    # .npz beside non-empty inputs, the empty member (nothing to memory-map) was read cut to --samples while the
    # others were mapped whole: "inputs hold different numbers of samples ... {'x': 16, 'past': 8}" after the
    # whole first calibration pass.
    r = np.random.default_rng(1)
    data = tmp_path / "calib.npz"
    np.savez(data, x=r.normal(size=(16, D)).astype(np.float32), past=np.zeros((16, 2, 0, D), np.float32))
    m = _decoder_with_past()
    src = open_data(data, input_specs(m), batch_size=4, limit=8)
    counts = [src.count(b) for b in src]
    assert counts == [4, 4]
    model = tmp_path / "dec.onnx"
    onnx.save(m, model)
    out = tmp_path / "dec.int8.onnx"
    res = run_cli("quantize", str(model), "--calib", str(data), "-o", str(out), "--samples", "8", "--quiet")
    assert res.returncode == 0, res.stderr
    assert out.exists()


def test_a_kv_cache_output_is_compared_as_values_not_as_a_segmentation_map() -> None:
    # present.0.key [N, heads, T, head_dim] looked like [N, K, H, W] segmentation logits: "per-pixel arg-max
    # agreement" over attention heads.
    r = np.random.default_rng(2)
    kv = r.normal(size=(4, 2, 20, 64)).astype(np.float32)
    for name in ("present.0.key", "present_value_1", "past_key_values.3.value", "cache", "layer.1.value"):
        assert classify(kv, name).kind == "values", name
    assert classify(kv, "output").kind == "dense_map"  # an unnamed [N, 2, H, W] map is still a map
    tokens = r.normal(size=(4, 30, 128)).astype(np.float32)
    assert classify(tokens, "last_hidden_state").kind == "embedding"


def _weight_norm_conv() -> onnx.ModelProto:
    """A conv whose weight is computed from constants as the dynamo exporter writes PyTorch's weight_norm
    (wav2vec2's positional conv, HiFi-GAN's, EnCodec's): w = g * v / ReduceL2(v) over all but the output axis,
    with more elements than a fold of a small tensor into a big one may make."""
    r = np.random.default_rng(3)
    v = r.normal(0, 1, (128, 64, 3, 3)).astype(np.float32)
    g = r.uniform(0.5, 1.5, (128, 1, 1, 1)).astype(np.float32)
    nodes = [
        helper.make_node("ReduceL2", ["v", "axes"], ["norm"], name="norm", keepdims=1),
        helper.make_node("Div", ["v", "norm"], ["unit"], name="div"),
        helper.make_node("Mul", ["g", "unit"], ["w"], name="mul"),
        helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["y"], ["z"], name="relu"),
    ]
    inits = [
        numpy_helper.from_array(v, "v"),
        numpy_helper.from_array(g, "g"),
        numpy_helper.from_array(np.array([1, 2, 3], np.int64), "axes"),
    ]
    graph = helper.make_graph(
        nodes,
        "weight_norm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64, 8, 8])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 128, 8, 8])],
        inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(m)
    return m


def test_a_weight_norm_conv_from_the_dynamo_exporter_gets_an_int8_weight() -> None:
    # Before: the computed weight (73728 elements) was over the folding limit, so the conv stayed float ("weight
    # is not a constant (computed at run time)") between quantized neighbours, and its float weight stayed.
    m = _weight_norm_conv()
    r = np.random.default_rng(4)
    calib = [{"x": r.normal(size=(1, 64, 8, 8)).astype(np.float32)} for _ in range(8)]
    res = lowbit.quantize(m, calib=calib, progress=False)
    assert res.plan.nodes["conv"].quantized
    q = res.model
    assert not any(n.op_type in ("ReduceL2", "Div") for n in q.graph.node)
    assert q.ByteSize() < m.ByteSize() / 3  # int8 weight, the float v and g gone
    x = r.normal(size=(4, 64, 8, 8)).astype(np.float32)
    ref, out = run(m, [{"x": x}], float_model=True)[0], run(q, [{"x": x}])[0]
    assert rel_rms(ref, out) < 0.05


def _yolo_head(r: np.random.Generator, classes: int, extras: np.ndarray) -> np.ndarray:
    """ultralytics' exported head, [N, 4 + classes + extras, anchors]: pixel boxes, sigmoid scores, then extras."""
    n, _, a = extras.shape
    boxes = r.uniform(0, 320, (n, 4, a))
    scores = 1 / (1 + np.exp(-r.normal(-3, 2, (n, classes, a))))
    return np.concatenate([boxes, scores, extras], 1).astype(np.float32)


def test_yolo_seg_and_pose_heads_are_scored_on_their_classes_not_their_extras() -> None:
    # yolo11n-seg: 4 + 80 classes + 32 mask coefficients; the arg-max ran over the coefficients too ("top-class
    # agreement 38%" at cosine 0.991). yolov8n-pose: 4 + 1 score + 17 x 3 keypoints, read as token vectors (cosine).
    r = np.random.default_rng(5)
    seg = _yolo_head(r, 3, r.normal(0, 3, (4, 8, 600)))
    got = classify(seg, "output0")
    assert (got.kind, got.variant, got.classes) == ("boxes", "anchors_last", 3), got
    out = seg.copy()
    out[:, 7:] += r.normal(0, 3, out[:, 7:].shape).astype(np.float32)  # the coefficients move, not the classes
    f = output_fidelity(seg, out, "output0")
    assert f["task"]["metric"] == "class_agreement" and f["task"]["value"] == 1.0
    out[:, 4:7] = out[:, [5, 6, 4]]  # now the classes move
    assert output_fidelity(seg, out, "output0")["task"]["value"] < 0.5

    kpts = np.concatenate([r.uniform(0, 320, (4, 2, 600)), r.uniform(0, 1, (4, 1, 600))], 1)
    pose = _yolo_head(r, 1, np.tile(kpts, (1, 3, 1)))
    got = classify(pose, "output0")
    assert (got.kind, got.classes) == ("boxes", 1), got
    out = pose.copy()
    out[:, 4] = np.where(out[:, 4] > 0.25, 0.1, out[:, 4])  # every scored anchor loses its score
    f = output_fidelity(pose, out, "output0")
    assert f["anchors"] > 0 and f["task"]["value"] == 0.0


def _two_outputs_second_parts() -> onnx.ModelProto:
    """test_kernel_gap's requantization (output `b`: Relu after a change of scale with no op between, which ONNX
    Runtime's optimizer folds into one rounding while the simulation rounds twice) behind a first output `a` =
    Relu(x), the same under kernels and simulation."""
    m = _requantized()
    g = m.graph
    g.node.insert(0, helper.make_node("Relu", ["x"], ["a"], name="plain"))
    g.node[-1].output[0] = "b"
    del g.output[:]
    g.output.extend([helper.make_tensor_value_info(n, TensorProto.FLOAT, (4, 64)) for n in ("a", "b")])
    return m


def test_the_check_names_where_kernels_part_on_any_output_not_only_the_first() -> None:
    # yolo11n-seg: boxes (output0) agreed at 0.9992, the mask prototypes (output1) at 0.9333, and the summary named
    # no op: only the first output was looked at.
    m = _two_outputs_second_parts()
    batches = [{"x": np.random.default_rng(i).normal(0, 1, (4, 64)).astype(np.float32)} for i in range(4)]
    check = runtime_check(m, m, batches, locate_gap=True)
    by_name = {o["name"]: o["kernels_vs_simulation"]["cosine"] for o in check["outputs"]}
    assert by_name["a"] > 0.9999 and by_name["b"] < 0.999
    gap = check.get("kernel_gap")
    assert gap is not None and gap["first"] is not None and gap["first"]["node"] == "relu"
    assert gap["output_cosine"] < 0.999
    assert "part at Relu 'relu'" in gap_text(gap)


def _dfl_head() -> onnx.ModelProto:
    """ultralytics' DFL box decoding: [N, 64, A] -> [N, 4, 16, A] -> [N, 16, 4, A] -> softmax over the 16 bins
    (axis 1) -> a 1x1 conv with weights 0..15 (the expected bin) -> [N, 4, A]. A conv before it, as in the head."""
    a = 20
    r = np.random.default_rng(6)
    inits = [
        numpy_helper.from_array(r.normal(0, 0.5, (64, 64, 1)).astype(np.float32), "w0"),
        numpy_helper.from_array(np.array([1, 4, 16, a], np.int64), "s4"),
        numpy_helper.from_array(np.arange(16, dtype=np.float32).reshape(1, 16, 1, 1), "bins"),
        numpy_helper.from_array(np.array([1, 4, a], np.int64), "s3"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c"], name="head"),
        helper.make_node("Reshape", ["c", "s4"], ["r"], name="split"),
        helper.make_node("Transpose", ["r"], ["t"], name="bins_first", perm=[0, 2, 1, 3]),
        helper.make_node("Softmax", ["t"], ["p"], name="dfl_softmax", axis=1),
        helper.make_node("Conv", ["p", "bins"], ["e"], name="expect"),
        helper.make_node("Reshape", ["e", "s3"], ["y"], name="boxes"),
    ]
    graph = helper.make_graph(
        nodes,
        "dfl",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, a])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, a])],
        inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_a_softmax_over_a_middle_axis_exports_to_tflite() -> None:
    # Every YOLOv8/YOLO11 head: "softmax over axis 1 of 4; TFLite's SOFTMAX works on the last axis only".
    from lowbit.export.tflite import convert
    from test_tflite import run_ort, run_tflite

    r = np.random.default_rng(7)
    calib = [{"x": r.normal(0, 1, (1, 64, 20)).astype(np.float32)} for _ in range(8)]
    q = lowbit.quantize(_dfl_head(), calib=calib, progress=False).model
    res = convert(q)
    assert res.quantized and res.ops.get("SOFTMAX") == 1 and res.ops.get("TRANSPOSE", 0) >= 2
    for _ in range(3):
        x = r.normal(0, 1, (1, 64, 20)).astype(np.float32)
        want = run_ort(q, x)
        got = run_tflite(res.data, x, dequantize=True)
        assert got.shape == want.shape
        assert rel_rms(want, got) < 0.02  # the same computation; int8 softmax rounds alike up to a step
