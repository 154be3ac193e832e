"""Calibration data for inputs that are not batch-first: recurrent state [2, B, H], a scalar sample rate, a 0-d
input; the batch axis is said per input (API `batch_axes`, CLI `--batch-axis`)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import lowbit
from conftest import run_cli
from helpers import model, node, rel_rms, run, weight
from lowbit.data import InputSpec, open_data
from lowbit.errors import LowbitError

H = 16


def _vad() -> onnx.ModelProto:
    """A VAD-style step: x [B, 32] and state [2, B, H] -> prob [B, 1], new state [2, B, H]. The sample rate `sr`
    (a 0-d float) scales the input, as Silero-style models branch on it."""
    inits = {
        "w": weight((32, H), 1),
        "ws": weight((H, H), 2),
        "wo": weight((H, 1), 3),
        "ref": np.array(16000.0, np.float32),
        "idx0": np.array(0, np.int64),
    }
    nodes = [
        node("Div", ["sr", "ref"], ["k"]),
        node("Mul", ["x", "k"], ["xs"]),
        node("MatMul", ["xs", "w"], ["a"]),
        node("Gather", ["state", "idx0"], ["s0"], axis=0),  # [B, H]
        node("MatMul", ["s0", "ws"], ["b"]),
        node("Add", ["a", "b"], ["c"]),
        node("Tanh", ["c"], ["h"]),
        node("Unsqueeze", ["h", "ax0"], ["h1"]),
        node("Concat", ["h1", "h1"], ["new_state"], axis=0),
        node("MatMul", ["h", "wo"], ["logit"]),
        node("Sigmoid", ["logit"], ["prob"]),
    ]
    inits["ax0"] = np.array([0], np.int64)
    return model(
        nodes, {"x": ("B", 32), "state": (2, "B", H), "sr": ()}, {"prob": ("B", 1), "new_state": (2, "B", H)}, inits
    )


def _samples(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Per-sample items: x [32], state [2, H] (its batch axis left out), sr 0-d."""
    r = np.random.default_rng(seed)
    return [
        {
            "x": r.normal(0, 1, 32).astype(np.float32),
            "state": r.normal(0, 0.5, (2, H)).astype(np.float32),
            "sr": np.array(16000.0, np.float32),
        }
        for _ in range(n)
    ]


def _batched(items: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {
        "x": np.stack([i["x"] for i in items]),
        "state": np.stack([i["state"] for i in items], axis=1),
        "sr": items[0]["sr"],
    }


def _specs() -> list[InputSpec]:
    return [
        InputSpec("x", np.dtype(np.float32), ("B", 32)),
        InputSpec("state", np.dtype(np.float32), (2, "B", H)),
        InputSpec("sr", np.dtype(np.float32), ()),
    ]


def test_state_batched_on_axis_1_and_scalar_constant() -> None:
    items = _samples(10, 1)
    batches = list(open_data(items, _specs(), batch_size=4, batch_axes={"state": 1}))
    assert [b["state"].shape for b in batches] == [(2, 4, H), (2, 4, H), (2, 2, H)]
    assert [b["x"].shape[0] for b in batches] == [4, 4, 2] and all(b["sr"].shape == () for b in batches)
    np.testing.assert_array_equal(batches[0]["state"][:, 1], items[1]["state"])
    # A whole batch given at once, state [2, 10, H]: the same batches.
    again = list(open_data([_batched(items)], _specs(), batch_size=4, batch_axes={"state": 1}))
    for a, b in zip(batches, again):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_without_the_axis_the_state_is_refused() -> None:
    with pytest.raises(LowbitError, match="state"):
        list(open_data([_batched(_samples(4, 1))], _specs(), batch_size=4))


def test_a_constant_that_changes_starts_a_new_batch() -> None:
    items = _samples(4, 2)
    items[2]["sr"] = np.array(8000.0, np.float32)
    items[3]["sr"] = np.array(8000.0, np.float32)
    batches = list(open_data(items, _specs(), batch_size=4, batch_axes={"state": 1}))
    assert [float(b["sr"]) for b in batches] == [16000.0, 8000.0]
    assert [b["x"].shape[0] for b in batches] == [2, 2]


def test_bad_batch_axes_are_one_line_errors() -> None:
    with pytest.raises(LowbitError, match="not a model input"):
        open_data(_samples(2, 1), _specs(), batch_axes={"stat": 1})
    with pytest.raises(LowbitError, match="does not fit its rank 3"):
        open_data(_samples(2, 1), _specs(), batch_axes={"state": 3})
    with pytest.raises(LowbitError, match="constant across samples"):
        open_data([{"x": np.zeros(32, np.float32), "state": np.zeros((2, H), np.float32), "sr": np.zeros(2)}], _specs())


@pytest.mark.parametrize("batch_size", [1, 4])
def test_vad_model_calibrates_batched_or_per_sample(batch_size: int) -> None:
    m = _vad()
    res = lowbit.quantize(
        m,
        calib=_samples(16, 1),
        recipe=lowbit.Recipe(batch_size=batch_size),
        batch_axes={"state": 1},
        progress=False,
    )
    assert res.plan.calibration_samples == 16
    assert res.plan.nodes["MatMul_a"].quantized
    feeds = [_batched(_samples(4, 5))]
    ref, got = run(m, feeds, float_model=True), run(res.model, feeds)
    assert rel_rms(ref[0], got[0]) < 0.05 and rel_rms(ref[1], got[1]) < 0.05


def test_cli_batch_axis(tmp_path) -> None:
    m = _vad()
    onnx.save(m, tmp_path / "vad.onnx")
    np.savez(tmp_path / "calib.npz", **_batched(_samples(8, 1)))
    args = ["quantize", str(tmp_path / "vad.onnx"), "--calib", str(tmp_path / "calib.npz"), "--quiet"]
    ok = run_cli(*args, "-o", str(tmp_path / "q.onnx"), "--batch-axis", "state=1", "sr=none", "--check", "4")
    assert ok.returncode == 0, ok.stderr
    assert "calibrated on 8 samples" in ok.stdout
    bad = run_cli(*args, "-o", str(tmp_path / "r.onnx"), "--batch-axis", "state:1")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "INPUT=AXIS" in bad.stderr


def test_eval_takes_the_batch_axis_too(tmp_path) -> None:
    m = _vad()
    onnx.save(m, tmp_path / "vad.onnx")
    np.savez(tmp_path / "calib.npz", **_batched(_samples(8, 1)))
    np.savez(tmp_path / "eval.npz", **_batched(_samples(8, 7)))
    quantize = ["quantize", str(tmp_path / "vad.onnx"), "--calib", str(tmp_path / "calib.npz"), "--quiet"]
    assert run_cli(*quantize, "-o", str(tmp_path / "q.onnx"), "--batch-axis", "state=1").returncode == 0
    args = ["eval", str(tmp_path / "q.onnx"), "--data", str(tmp_path / "eval.npz"), "--quiet", "--json"]
    args += ["--reference", str(tmp_path / "vad.onnx")]
    without = run_cli(*args)
    assert without.returncode == 2 and "--batch-axis state=1" in without.stderr
    done = run_cli(*args, "--batch-axis", "state=1", "sr=none")
    assert done.returncode == 0, done.stderr
    assert '"samples": 8' in done.stdout


def test_diagnose_takes_the_batch_axis(tmp_path) -> None:
    m = _vad()
    onnx.save(m, tmp_path / "vad.onnx")
    np.savez(tmp_path / "calib.npz", **_batched(_samples(8, 1)))
    quantize = ["quantize", str(tmp_path / "vad.onnx"), "--calib", str(tmp_path / "calib.npz"), "--quiet"]
    assert run_cli(*quantize, "-o", str(tmp_path / "q.onnx"), "--batch-axis", "state=1").returncode == 0
    args = ["diagnose", str(tmp_path / "vad.onnx"), str(tmp_path / "q.onnx"), "--data", str(tmp_path / "calib.npz")]
    done = run_cli(*args, "--quiet", "--json", "--batch-axis", "state=1", "-o", str(tmp_path / "fixed.onnx"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "fixed.onnx").exists()


def _audio() -> onnx.ModelProto:
    """x [N, 1, T] with T dynamic -> Conv1d -> Relu -> GlobalAveragePool: clips of any length."""
    inits = {"w": weight((4, 1, 3), 1), "b": np.zeros(4, np.float32)}
    nodes = [
        node("Conv", ["x", "w", "b"], ["c"]),
        node("Relu", ["c"], ["r"]),
        node("GlobalAveragePool", ["r"], ["y"]),
    ]
    return model(nodes, {"x": ("N", 1, "T")}, {"y": ("N", 4, 1)}, inits)


def test_folder_of_clips_of_several_lengths_calibrates(tmp_path) -> None:
    """Files whose samples differ in a dynamic dimension: each length is batched on its own."""
    r = np.random.default_rng(0)
    lengths = [50, 50, 50, 80, 80, 120]
    for i, t in enumerate(lengths):
        np.save(tmp_path / f"clip{i}.npy", r.normal(0, 1, (1, 1, t)).astype(np.float32))
    spec = [InputSpec("x", np.dtype(np.float32), ("N", 1, "T"))]
    batches = list(open_data(tmp_path, spec, batch_size=4))
    assert [b["x"].shape for b in batches] == [(3, 1, 50), (2, 1, 80), (1, 1, 120)]
    res = lowbit.quantize(_audio(), calib=tmp_path, progress=False)
    assert res.plan.calibration_samples == 6 and res.plan.nodes["Conv_c"].quantized
