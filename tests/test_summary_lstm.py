"""A static-mode summary says when LSTM nodes kept their float weights, and names dynamic mode, which stores them int8
(madmom's bidirectional LSTMs: 102% of their float size in static mode, 30% in dynamic; bench/RESULTS_CORPUS.md,
seventh session)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from conftest import run_cli
from test_recurrent import IN, B, T, lstm_model


def test_static_summary_points_lstm_weights_to_dynamic_mode(tmp_path: Path) -> None:
    path = tmp_path / "lstm.onnx"
    onnx.save(lstm_model("bidirectional"), path)
    calib = tmp_path / "x.npz"
    rng = np.random.default_rng(0)
    np.savez(calib, x=rng.standard_normal((T, B, IN)).astype(np.float32))
    args = ("--calib", str(calib), "--no-speed-check", "--batch-axis", "x=1")
    run = run_cli("quantize", str(path), "-o", str(tmp_path / "s.onnx"), *args)
    assert run.returncode == 0, run.stderr
    assert "1 LSTM node kept its float weights" in run.stdout and "--mode dynamic" in run.stdout, run.stdout
    run = run_cli("quantize", str(path), "-o", str(tmp_path / "d.onnx"), *args, "--mode", "dynamic")
    assert run.returncode == 0, run.stderr
    assert "LSTM node" not in run.stdout
