"""`lowbit eval`: accuracy against labels, fidelity against a reference, and every user mistake as one line."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lowbit
from conftest import CliRun, run_cli, tiny_cnn
from lowbit.errors import LowbitError
from lowbit.evaluate.evaluate import evaluate

# Scores whose ranks are known by hand: label rank 1, 3, 6 and 5 -> top-1 1/4, top-5 3/4.
SCORES = np.array(
    [
        [9, 1, 2, 3, 4, 5, 6, 7],  # label 0 ranks 1st
        [1, 2, 3, 4, 5, 6, 7, 8],  # label 5 ranks 3rd
        [8, 7, 6, 5, 4, 3, 2, 1],  # label 5 ranks 6th
        [0, 9, 8, 7, 6, 5, 4, 3],  # label 5 ranks 5th
    ],
    np.float32,
)
LABELS = np.array([0, 5, 5, 5])


def linear(classes: int = 8, out: str = "y", batch: int | str = "N", seed: int | None = None) -> onnx.ModelProto:
    """x (N, 8) -> Gemm -> out (N, classes); with seed=None the weight is the identity, so out == x."""
    w = (
        np.eye(8, classes, dtype=np.float32)
        if seed is None
        else np.random.default_rng(seed).normal(0, 1, (8, classes)).astype(np.float32)
    )
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w"], [out], name="fc")],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 8])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, [batch, classes])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def save(model: onnx.ModelProto, path: Path) -> str:
    onnx.save(model, str(path))
    return str(path)


def lowbit_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lowbit.cli.main", "eval", *args], capture_output=True, text=True)


def strict_json(text: str) -> dict:
    def refuse(name: str) -> None:
        raise ValueError(f"not valid JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def assert_user_error(proc: CliRun | subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(err.splitlines()) == 1, err
    assert err.startswith("lowbit: error:"), err
    for w in words:
        assert w.lower() in err.lower(), err


@pytest.fixture
def scored(tmp_path: Path) -> dict[str, str]:
    """The identity model, the hand-ranked scores as data, and labels as .npy and as text."""
    np.save(tmp_path / "scores.npy", SCORES)
    np.save(tmp_path / "labels.npy", LABELS)
    (tmp_path / "labels.txt").write_text("\n".join(map(str, LABELS)) + "\n\n")
    return {
        "model": save(linear(), tmp_path / "id.onnx"),
        "data": str(tmp_path / "scores.npy"),
        "npy": str(tmp_path / "labels.npy"),
        "txt": str(tmp_path / "labels.txt"),
    }


def test_accuracy_matches_hand_computed_ranks(scored: dict[str, str]) -> None:
    for labels in (scored["npy"], scored["txt"], LABELS.tolist()):
        r = evaluate(scored["model"], scored["data"], labels=labels, batch_size=3, progress=False)
        assert r.samples == 4
        assert r.accuracy == {"top1": 0.25, "top5": 0.75}
        assert r.outputs is None and r.reference is None
    # --limit takes the first labels with the first samples: ranks 1 and 3 -> both in the top 5.
    r = evaluate(scored["model"], scored["data"], labels=scored["npy"], limit=2, progress=False)
    assert r.samples == 2 and r.accuracy == {"top1": 0.5, "top5": 1.0}


def test_top5_is_absent_with_fewer_than_five_classes() -> None:
    x = np.array([[3, 1, 0, 0, 0, 0, 0, 0], [0, 0, 0, 2, 0, 0, 0, 0]], np.float32)
    r = evaluate(linear(classes=4), [x], labels=[0, 2], progress=False)
    assert r.accuracy == {"top1": 0.5, "top5": None}


def test_model_against_itself_is_exact_and_json_stays_valid(scored: dict[str, str]) -> None:
    proc = lowbit_cli(
        scored["model"], "--data", scored["data"], "--reference", scored["model"], "--labels", scored["txt"], "--json"
    )
    assert proc.returncode == 0, proc.stderr
    r = strict_json(proc.stdout)
    assert r["samples"] == 4 and r["mode"] == "kernels" and r["reference"] == scored["model"]
    assert r["accuracy"] == {"top1": 0.25, "top5": 0.75}
    f = r["outputs"]["y"]
    # identical outputs: SQNR +inf, written as null (lowbit/evaluate/jsonable.py); the result object keeps inf
    assert f["top1_agreement"] == 1.0 and f["max_abs_error"] == 0.0 and f["sqnr_db"] is None
    assert f["cosine"] == pytest.approx(1.0, abs=1e-12)
    direct = evaluate(scored["model"], scored["data"], reference=scored["model"], progress=False)
    assert direct.outputs["y"]["sqnr_db"] == float("inf") and direct.to_dict()["outputs"]["y"]["sqnr_db"] is None


def test_quantized_tiny_cnn_is_close_to_float(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    calib = rng.normal(0, 1, (32, 3, 16, 16)).astype(np.float32)
    evals = [rng.normal(0, 1, (16, 3, 16, 16)).astype(np.float32) for _ in range(4)]  # other samples than calib
    float_model = tiny_cnn()
    quant = lowbit.quantize(float_model, calib=[calib], progress=False).model
    for mode in ("kernels", "simulate"):
        r = evaluate(quant, evals, reference=float_model, mode=mode, batch_size=10, progress=False)
        assert r.samples == 64 and r.mode == mode and r.model == "<in-memory model>"
        f = r.outputs["y"]
        assert f["top1_agreement"] > 0.8, f
        assert f["cosine"] > 0.99, f
        assert 0 < f["max_abs_error"] < 1, f
        assert isinstance(f["sqnr_db"], float) and f["sqnr_db"] > 20, f
    json.dumps(r.to_dict(), allow_nan=False)


def test_human_output_is_a_table(scored: dict[str, str], tmp_path: Path) -> None:
    other = save(linear(seed=1), tmp_path / "other.onnx")
    proc = lowbit_cli(other, "--data", scored["data"], "--labels", scored["npy"], "--reference", scored["model"])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("accuracy") and "top-1" in line and "top-5" in line for line in lines), proc.stdout
    header = next(line for line in lines if line.startswith("output"))
    row = next(line for line in lines if line.startswith("y "))
    assert row.index("%") < header.index("cosine")  # agreement sits in its column


def test_generator_data_streams_and_label_count_is_checked_after_the_run() -> None:
    pulled = []

    def batches():
        for i in range(4):
            pulled.append(i)
            yield SCORES[i : i + 1]

    r = evaluate(linear(), batches(), labels=LABELS, batch_size=2, progress=False)
    assert r.accuracy["top5"] == 0.75 and pulled == [0, 1, 2, 3]
    with pytest.raises(LowbitError, match="5 labels but .* gave 4 samples"):
        evaluate(linear(), (s[None] for s in SCORES), labels=[0, 5, 5, 5, 1], progress=False)


def test_fixed_batch_model_counts_labels_before_dropping_the_partial_batch(tmp_path: Path) -> None:
    data = np.tile(SCORES, (3, 1))[:10]  # 10 samples, model batch fixed at 4: the last 2 are dropped
    np.save(tmp_path / "d.npy", data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = evaluate(linear(batch=4), tmp_path / "d.npy", labels=np.tile(LABELS, 3)[:10], progress=False)
    assert r.samples == 8 and r.accuracy == {"top1": 0.25, "top5": 0.75}


def test_error_outputs_with_different_names(scored: dict[str, str], tmp_path: Path) -> None:
    ref = save(linear(out="logits"), tmp_path / "ref.onnx")
    assert_user_error(
        run_cli("eval", scored["model"], "--data", scored["data"], "--reference", ref), "'y'", "logits", "same outputs"
    )


def test_error_outputs_with_different_shapes(scored: dict[str, str], tmp_path: Path) -> None:
    ref = save(linear(classes=5), tmp_path / "ref.onnx")
    assert_user_error(
        run_cli("eval", scored["model"], "--data", scored["data"], "--reference", ref), "output 'y'", "(N, 8)", "(N, 5)"
    )


def test_error_data_of_the_wrong_shape(scored: dict[str, str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((4, 7), np.float32))
    assert_user_error(
        run_cli("eval", scored["model"], "--data", str(bad), "--labels", scored["npy"]), str(bad), "(N, 8)", "(4, 7)"
    )


def test_error_label_count_differs(scored: dict[str, str], tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("0\n1\n5\n")
    assert_user_error(
        run_cli("eval", scored["model"], "--data", scored["data"], "--labels", str(short)),
        "3 labels",
        "4 samples",
        str(short),
    )
    # --limit does not hide labels written for other data
    assert_user_error(
        run_cli("eval", scored["model"], "--data", scored["data"], "--labels", str(short), "--limit", "2"),
        "3 labels",
        "4 samples",
    )


def test_error_labels_out_of_range(scored: dict[str, str], tmp_path: Path) -> None:
    for name, values in (("high.npy", [0, 5, 8, 5]), ("neg.npy", [0, -1, 5, 5])):
        np.save(tmp_path / name, np.array(values))
        assert_user_error(
            run_cli("eval", scored["model"], "--data", scored["data"], "--labels", str(tmp_path / name)),
            "out of range",
            "8 classes",
        )


def test_error_label_file_missing_or_unreadable(scored: dict[str, str], tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    assert_user_error(
        run_cli("eval", scored["model"], "--data", scored["data"], "--labels", str(missing)), "not found", str(missing)
    )
    words = tmp_path / "words.txt"
    words.write_text("0\ncat\n")
    assert_user_error(
        run_cli("eval", scored["model"], "--data", scored["data"], "--labels", str(words)), "line 2", "'cat'", "integer"
    )
    broken = tmp_path / "broken.npy"
    broken.write_bytes(b"not an array")
    assert_user_error(
        run_cli("eval", scored["model"], "--data", scored["data"], "--labels", str(broken)),
        "cannot read label file",
        str(broken),
    )
    floats = tmp_path / "floats.npy"
    np.save(floats, LABELS.astype(np.float32))
    assert_user_error(
        run_cli("eval", scored["model"], "--data", scored["data"], "--labels", str(floats)), "float32", "integers"
    )
