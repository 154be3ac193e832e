"""An `If` on a run-time value (Silero VAD's sample-rate switch) exports as TFLite's IF with one subgraph per
branch (issue 12), float and int8, and LiteRT takes the branch the input asks for."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import lowbit
from lowbit.export.tflite import export_tflite
from lowbit.runtimes.litert import LiteRTSession
from lowbit.runtimes.ort import session
from test_branches import _feeds, _switch_model


def _subgraphs(data: bytes) -> int:
    import importlib

    return importlib.import_module("tflite.Model").Model.GetRootAs(data, 0).SubgraphsLength()


def _run(path: Path, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    sess = LiteRTSession(path, threads=1)
    return np.concatenate([sess.run(None, f)[0] for f in feeds])


def test_float_if_runs_the_branch_the_input_picks(tmp_path: Path):
    model = _switch_model()
    out = tmp_path / "f.tflite"
    result = export_tflite(model, out)
    assert result.ops["IF"] == 1 and _subgraphs(out.read_bytes()) == 3
    ref = session(model)
    for sr in (16000, 8000):
        feeds = _feeds(3, 4, sr)
        want = np.concatenate([ref.run(None, f)[0] for f in feeds])
        np.testing.assert_allclose(_run(out, feeds), want, rtol=1e-5, atol=1e-5)
    # the two branches really differ on this input, so the test sees which one ran
    a, b = (np.concatenate([ref.run(None, f)[0] for f in _feeds(1, 4, sr)]) for sr in (16000, 8000))
    assert np.abs(a - b).max() > 0.1


def test_int8_if_exports_without_fallback_and_agrees_with_the_int8_onnx(tmp_path: Path):
    model = _switch_model()
    calib = _feeds(16, 1, 16000) + _feeds(16, 2, 8000)  # both branches taken: both quantized
    q = tmp_path / "q.onnx"
    lowbit.quantize(model, q, calib=calib, progress=False)
    out = tmp_path / "q.tflite"
    result = export_tflite(q, out)
    assert result.quantized and result.ops["IF"] == 1 and _subgraphs(out.read_bytes()) == 3
    assert result.fallbacks == [] and result.float_nodes == []
    assert result.ops["CONV_2D"] == 4  # two per branch, int8
    ref = session(q)
    for sr in (16000, 8000):
        feeds = _feeds(4, 7, sr)
        want = np.concatenate([ref.run(None, f)[0] for f in feeds])
        got = _run(out, feeds)
        # measured: every value equal (64 inputs per branch), so no tolerance
        np.testing.assert_array_equal(got, want)
