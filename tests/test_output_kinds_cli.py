"""End to end: a model with a probability-map output and a class-score output. `quantize`'s check and `eval`
measure every output with what fits it: IoU for the map, top-1 for the scores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import run_cli


def two_head_model() -> onnx.ModelProto:
    """x [N, 3, 16, 16] -> Conv-Relu -> (Conv 1x1 -> Sigmoid: "prob" [N, 1, 16, 16]) and
    (GlobalAveragePool -> Flatten -> Gemm: "logits" [N, 10]), a text detector's map beside a classifier."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.5, (1, 8, 1, 1)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.array([-0.5], np.float32), "b2"),
        numpy_helper.from_array(rng.normal(0, 0.5, (8, 10)).astype(np.float32), "w3"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2"),
        helper.make_node("Sigmoid", ["c2"], ["prob"], name="sigmoid"),
        helper.make_node("GlobalAveragePool", ["r1"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w3"], ["logits"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "two_heads",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [
            helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 1, 16, 16]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.fixture
def two_heads(tmp_path: Path) -> tuple[Path, Path]:
    path, data = tmp_path / "heads.onnx", tmp_path / "x.npy"
    onnx.save(two_head_model(), str(path))
    np.save(data, np.random.default_rng(1).normal(0, 1, (16, 3, 16, 16)).astype(np.float32))
    return path, data


def _quantize(model: Path, data: Path, out: Path) -> None:
    r = run_cli("quantize", str(model), "-o", str(out), "--calib", str(data), "--quiet", "--check", "0")
    assert r.returncode == 0, r.stderr


def test_quantize_check_measures_every_output_with_its_own_metric(two_heads: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = two_heads
    args = ["quantize", str(model), "-o", str(tmp_path / "q.onnx"), "--calib", str(data), "--quiet", "--check", "8"]
    r = run_cli(*args, "--json")
    assert r.returncode == 0, r.stderr
    check = json.loads(r.stdout)["check"]
    outs = {o["name"]: o for o in check["outputs"]}
    assert list(outs) == ["prob", "logits"]
    prob = outs["prob"]
    assert prob["kind"] == "dense_map" and "[0, 1]" in prob["why"]
    for run in ("kernels", "simulate", "kernels_vs_simulation"):
        f = prob[run]
        assert f["top1_agreement"] is None and f["task"]["metric"] == "map_iou"
        assert 0.5 < f["map_iou"] <= 1.0 and f["task"]["value"] == f["map_iou"]
    assert outs["logits"]["kind"] == "class_scores"
    assert outs["logits"]["kernels"]["task"]["metric"] == "top1_agreement"
    assert check["kernels"] == prob["kernels"]  # the top-level fidelity is still the first output's

    text = run_cli(*args[:3], str(tmp_path / "q2.onnx"), *args[4:])
    assert text.returncode == 0, text.stderr
    line = next(x for x in text.stdout.splitlines() if x.strip().startswith("prob"))
    assert "IoU of maps > 0.5" in line and "top-1" not in line
    assert any(x.strip().startswith("logits (class_scores): top-1 agreement") for x in text.stdout.splitlines())


def test_eval_json_reports_iou_for_the_map(two_heads: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = two_heads
    q = tmp_path / "q.onnx"
    assert (
        run_cli("quantize", str(model), "-o", str(q), "--calib", str(data), "--quiet", "--check", "0").returncode == 0
    )
    r = run_cli("eval", str(q), "--data", str(data), "--reference", str(model), "--json", "--quiet")
    assert r.returncode == 0, r.stderr
    outs = json.loads(r.stdout)["outputs"]
    assert outs["prob"]["kind"] == "dense_map" and outs["prob"]["top1_agreement"] is None
    assert outs["prob"]["task"]["metric"] == "map_iou" and 0.5 < outs["prob"]["map_iou"] <= 1.0
    assert outs["logits"]["task"]["metric"] == "top1_agreement" and outs["logits"]["top1_agreement"] is not None

    text = run_cli("eval", str(q), "--data", str(data), "--reference", str(model), "--quiet")
    assert "IoU of maps > 0.5" in text.stdout and "dense_map" in text.stdout

    # the user's kind wins, and says so
    r = run_cli(
        "eval", str(q), "--data", str(data), "--reference", str(model), "--json", "--quiet",
        "--output-kind", "prob=values",
    )  # fmt: skip
    prob = json.loads(r.stdout)["outputs"]["prob"]
    assert prob["kind"] == "values" and prob["why"] == "given by the user" and prob["task"]["metric"] == "sqnr_db"


def test_eval_warns_when_fidelity_is_poor(two_heads: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = two_heads
    other = two_head_model()
    w = numpy_helper.to_array(other.graph.initializer[3])
    other.graph.initializer[3].CopyFrom(numpy_helper.from_array(-w, "w3"))  # negated scores: top-1 never agrees
    worse = tmp_path / "worse.onnx"
    onnx.save(other, str(worse))
    r = run_cli("eval", str(worse), "--data", str(data), "--reference", str(model), "--quiet")
    assert r.returncode == 0, r.stderr
    warns = [x for x in r.stdout.splitlines() if x.startswith("warning:")]
    assert len(warns) == 1 and "'logits'" in warns[0] and "lowbit diagnose" in warns[0]


@pytest.mark.parametrize(
    ("kind", "words"),
    [("nope=dense_map", "not an output"), ("prob=blob", "not one of"), ("prob", "NAME=KIND")],
)
def test_bad_output_kind_is_one_line_before_any_work(
    two_heads: tuple[Path, Path], tmp_path: Path, kind: str, words: str
) -> None:
    model, data = two_heads
    out = tmp_path / "q.onnx"
    r = run_cli("quantize", str(model), "-o", str(out), "--calib", str(data), "--quiet", "--output-kind", kind)
    assert r.returncode == 2 and r.stderr.startswith("lowbit: error:") and words in r.stderr
    assert r.stderr.strip().count("\n") == 0 and not out.exists()
    r = run_cli("eval", str(model), "--data", str(data), "--reference", str(model), "--output-kind", kind)
    assert r.returncode == 2 and words in r.stderr and r.stderr.strip().count("\n") == 0


def test_diagnose_and_report_use_the_map_metric(two_heads: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = two_heads
    q = tmp_path / "q.onnx"
    assert (
        run_cli("quantize", str(model), "-o", str(q), "--calib", str(data), "--quiet", "--check", "0").returncode == 0
    )
    r = run_cli("diagnose", str(model), str(q), "--data", str(data), "--quiet", "--json", "--limit", "8")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    for when in ("before", "after"):
        f = d[when]
        assert f["kind"] == "dense_map" and f["top1_agreement"] is None and f["task"]["metric"] == "map_iou"
        assert set(f["outputs"]) == {"prob", "logits"}
        assert f["outputs"]["logits"]["task"]["metric"] == "top1_agreement"
    assert d["gain"]["top1_agreement"] is None
    assert d["gain"]["task"] == pytest.approx(d["after"]["task"]["value"] - d["before"]["task"]["value"])
    text = run_cli("diagnose", str(model), str(q), "--data", str(data), "--quiet", "--limit", "8").stdout
    before = next(x for x in text.splitlines() if x.startswith("before:"))
    assert before.startswith("before: IoU of maps > 0.5") and "top-1" not in before

    r = run_cli(
        "report", str(model), str(q), "--data", str(data), "-o", str(tmp_path / "r.html"), "--quiet", "--no-bench",
        "--json",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    variants = json.loads(r.stdout)["variants"]
    assert [v["task"]["metric"] for v in variants] == ["map_iou", "map_iou"]
    assert variants[0]["task"]["value"] == 1.0 and variants[0]["top1_agreement"] is None  # float vs itself
    assert variants[1]["top1_agreement"] is None and 0.5 < variants[1]["task"]["value"] <= 1.0
    html = (tmp_path / "r.html").read_text()
    assert "IoU of maps &gt; 0.5 with float" in html  # the chart's axis names the metric that fits


def test_report_takes_the_users_kind(two_heads: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = two_heads
    q = tmp_path / "q.onnx"
    _quantize(model, data, q)
    r = run_cli(
        "report", str(model), str(q), "--data", str(data), "-o", str(tmp_path / "r.html"), "--quiet", "--no-bench",
        "--no-diagnose", "--json", "--output-kind", "prob=values",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    variants = json.loads(r.stdout)["variants"]
    assert [v["kind"] for v in variants] == ["values", "values"]
    assert variants[0]["task"]["value"] is None  # float against itself: infinite SQNR, null in JSON
    assert variants[1]["task"]["metric"] == "sqnr_db" and variants[1]["task"]["value"] > 20
    args = ["report", str(model), str(q), "--data", str(data), "-o", str(tmp_path / "r.html"), "--quiet"]
    text = run_cli(*args, "--no-bench", "--no-diagnose", "--output-kind", "prob=values").stdout
    assert any(x.startswith("q.onnx: SQNR dB ") for x in text.splitlines()), text
