"""Recognizers exported with the batch fixed at 1 give time-first outputs, [T, 1, C] (ddddocr's CRNN, declared as
[1, seqlen]): samples must be joined on the axis of size 1, not read as T * N samples, and decoded per sample along T.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import lowbit
from helpers import model, node
from lowbit.evaluate import metrics as m
from lowbit.evaluate.outputs import classify, output_fidelity
from lowbit.runtimes.ort import join, run_all, session

T, C = 12, 40


def _recognizer(gain: float = 5.0, nudge: float = 0.0, time_first_input: bool = False) -> onnx.ModelProto:
    """x [1, T, C] (batch fixed at 1) -> logits [T, 1, C]: per-step scores, time first. `nudge` adds to class 1's
    score, so two such models disagree where class 1 is near the top. `time_first_input`: x is [T, 1, C] too."""
    w = (np.eye(C) * gain).astype(np.float32)
    bias = np.zeros(C, np.float32)
    bias[1] = nudge
    nodes = [
        node("MatMul", ["x", "w"], ["s"]),
        node("Add", ["s", "b"], ["s1"]),
        node(
            "Identity" if time_first_input else "Transpose",
            ["s1"],
            ["logits"],
            **({} if time_first_input else {"perm": [1, 0, 2]}),
        ),
    ]
    x_shape = (T, 1, C) if time_first_input else (1, T, C)
    return model(nodes, {"x": x_shape}, {"logits": (T, 1, C)}, {"w": w, "b": bias})


def _lines(n: int, seed: int = 0) -> np.ndarray:
    """n samples [n, T, C]: one-hot steps, blank (0) on most, with noise; class 1 is a close second on some steps."""
    r = np.random.default_rng(seed)
    x = np.zeros((n, T, C), np.float32)
    cls = np.where(r.random((n, T)) < 0.6, 0, r.integers(2, C, (n, T)))
    np.put_along_axis(x, cls[..., None], 1.0, axis=2)
    x[..., 1] += np.where(r.random((n, T)) < 0.05, 0.97, 0.0)
    return (x + r.normal(0, 0.01, x.shape)).astype(np.float32)


def _per_sample(m_: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = session(m_.SerializeToString(), "kernels")
    return np.stack([sess.run(None, {"x": x[i : i + 1]})[0][:, 0] for i in range(len(x))])  # [N, T, C]


def test_join_finds_the_batch_axis_of_time_first_chunks() -> None:
    chunks = [np.full((T, 1, C), i, np.float32) for i in range(5)]
    joined = join(chunks, 0, samples=5)
    assert joined.shape == (5, T, C)
    assert [float(joined[i].mean()) for i in range(5)] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert join(chunks, 0).shape == (5 * T, 1, C)  # without the count, as before: the shapes do not say


def test_join_stacks_per_sample_outputs_that_have_no_batch_axis() -> None:
    chunks = [np.full((T, C), i, np.float32) for i in range(3)]
    assert join(chunks, 0, samples=3).shape == (3, T, C)
    batch_first = [np.zeros((4, C), np.float32), np.zeros((2, C), np.float32)]
    assert join(batch_first, 0, samples=6).shape == (6, C)  # axis 0 adds up: unchanged


def test_run_all_returns_time_first_outputs_samples_first() -> None:
    x = _lines(6)
    got = run_all(session(_recognizer().SerializeToString(), "kernels"), [{"x": x[i : i + 1]} for i in range(6)])[0]
    np.testing.assert_allclose(got, _per_sample(_recognizer(), x), rtol=1e-6)


def test_eval_decodes_time_first_ctc_per_sample(tmp_path) -> None:
    x = _lines(24)
    np.save(tmp_path / "x.npy", x)
    ref_m, out_m = _recognizer(), _recognizer(nudge=0.3)
    onnx.save(ref_m, tmp_path / "ref.onnx")
    onnx.save(out_m, tmp_path / "out.onnx")
    res = lowbit.evaluate_model(
        str(tmp_path / "out.onnx"), str(tmp_path / "x.npy"), reference=str(tmp_path / "ref.onnx"), progress=False
    )
    f = res.outputs["logits"]
    assert res.samples == 24 and f["kind"] == "sequence"
    ref, out = _per_sample(ref_m, x), _per_sample(out_m, x)
    want = np.mean([a == b for a, b in zip(m.ctc_greedy_decode(ref, 0), m.ctc_greedy_decode(out, 0))])
    assert 0.0 < want < 1.0  # the nudge changes some lines and not others
    assert f["sequence_match"] == pytest.approx(want)
    assert f["sequence_match"] * 24 == pytest.approx(round(f["sequence_match"] * 24))  # a count of the 24 lines


def test_eval_with_a_batch_axis_keeps_time_first_outputs_right(tmp_path) -> None:
    """A time-first input too ([T, 1, C], samples stacked on axis 1: --batch-axis x=1): outputs joined per sample."""
    x = _lines(10)
    np.save(tmp_path / "x.npy", np.ascontiguousarray(x.transpose(1, 0, 2)))  # [T, N, C]
    ref_m, out_m = _recognizer(time_first_input=True), _recognizer(nudge=0.3, time_first_input=True)
    onnx.save(ref_m, tmp_path / "ref.onnx")
    onnx.save(out_m, tmp_path / "out.onnx")
    res = lowbit.evaluate_model(
        str(tmp_path / "out.onnx"),
        str(tmp_path / "x.npy"),
        reference=str(tmp_path / "ref.onnx"),
        progress=False,
        batch_axes={"x": 1},
    )
    assert res.samples == 10 and res.outputs["logits"]["kind"] == "sequence"
    ref, out = _per_sample(_recognizer(), x), _per_sample(_recognizer(nudge=0.3), x)  # the same function
    want = np.mean([a == b for a, b in zip(m.ctc_greedy_decode(ref, 0), m.ctc_greedy_decode(out, 0))])
    assert 0.0 < want < 1.0
    assert res.outputs["logits"]["sequence_match"] == pytest.approx(want)


def test_raw_ctc_logits_over_a_large_alphabet_are_a_sequence() -> None:
    """Thousands of classes (a Chinese recognizer): peaked rows with the blank on top of most steps; token vectors
    with one outlier feature on top of every step stay embeddings."""
    r = np.random.default_rng(1)
    n, t, c = 6, 20, 3000
    logits = r.normal(0, 1, (n, t, c))
    top = np.where(r.random((n, t)) < 0.7, 0, r.integers(1, c, (n, t)))
    np.put_along_axis(logits, top[..., None], 12.0, axis=2)
    assert classify(logits).kind == "sequence"
    tokens = r.normal(0, 1, (n, t, 384))
    tokens[..., 7] = 20.0  # a transformer's outlier feature: the top of every token
    assert classify(tokens).kind == "embedding"
    f = output_fidelity(logits, logits.copy())
    assert f["sequence_match"] == 1.0 and f["blank"] == 0


def test_diagnose_counts_time_first_samples_and_decodes_them(tmp_path) -> None:
    """diagnose on a quantized time-first recognizer (input [T, 1, C], --batch-axis x=1): 10 samples, not T * 10,
    and the sequence metric over them."""
    x = _lines(10)
    data = np.ascontiguousarray(x.transpose(1, 0, 2))  # [T, N, C]
    np.save(tmp_path / "x.npy", data)
    float_m = _recognizer(time_first_input=True)
    onnx.save(float_m, tmp_path / "f.onnx")
    lowbit.quantize(
        str(tmp_path / "f.onnx"),
        tmp_path / "q.onnx",
        calib=str(tmp_path / "x.npy"),
        batch_axes={"x": 1},
        progress=False,
    )
    res = lowbit.diagnose(
        str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"), str(tmp_path / "x.npy"), progress=False, batch_axes={"x": 1}
    )
    assert res.samples == 10
    assert res.before["kind"] == "sequence" and res.before["sequence_match"] is not None
    assert res.before["sequence_match"] * 10 == pytest.approx(round(res.before["sequence_match"] * 10))
