"""`lowbit export --to ort`: the ORT-format model ONNX Runtime Mobile loads, its operator config, and .ort files
in eval and bench."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import lowbit
from conftest import run_cli
from lowbit.errors import LowbitError
from lowbit.evaluate.metrics import top1_agreement
from lowbit.export import export_ort
from lowbit.runtimes.ort import run_all, session


def _inputs(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, 3, 16, 16)).astype(np.float32)


@pytest.fixture
def quantized(tiny_model: Path, tmp_path: Path) -> Path:
    out = tmp_path / "tiny.int8.onnx"
    lowbit.quantize(tiny_model, out, calib=_inputs(32, 1), progress=False)
    return out


def _agree(onnx_path: Path, ort_path: Path) -> None:
    x = _inputs(64, 7)
    batches = [{"x": x[i : i + 16]} for i in range(0, 64, 16)]
    ref = run_all(session(onnx_path), batches)[0]
    out = run_all(session(ort_path), batches)[0]
    assert top1_agreement(ref, out) == 1.0
    assert np.abs(ref - out).max() <= 1e-6


def test_float_model_to_ort(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "tiny.ort"
    result = export_ort(tiny_model, out)
    assert out.read_bytes() == result.data and not result.quantized
    config = tmp_path / "tiny.required_operators.config"
    assert result.config_path == config and config.read_text() == result.config
    _agree(tiny_model, out)
    ops = {op for names in result.ops.values() for op in names}
    assert {"Gemm", "GlobalAveragePool"} <= ops
    assert not list(tmp_path.glob(".*"))  # no temporary files left


def test_quantized_model_to_ort(quantized: Path, tmp_path: Path) -> None:
    run = run_cli("export", str(quantized), "--to", "ort", "-o", str(tmp_path / "q.ort"), "--json")
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["format"] == "ort" and summary["quantized"] and summary["output"] == str(tmp_path / "q.ort")
    _agree(quantized, tmp_path / "q.ort")
    # The config is ONNX Runtime's: domain;opset;ops lines, here the fused integer kernels it built.
    lines = [ln for ln in (tmp_path / "q.required_operators.config").read_text().splitlines() if ln[:1] != "#"]
    assert any(ln.startswith("com.microsoft;1;") and "QLinearConv" in ln for ln in lines)
    assert any(ln.startswith("ai.onnx;") and "QuantizeLinear" in ln for ln in lines)
    assert summary["ops"] == {ln.rsplit(";", 1)[0]: ln.rsplit(";", 1)[1].split(",") for ln in lines}
    # Text output names both files, and the config names the .ort, not the temporary folder.
    text = run_cli("export", str(quantized), "--to", "ort", "-o", str(tmp_path / "q.ort"))
    assert text.returncode == 0 and "q.required_operators.config" in text.stdout
    assert f"# - {tmp_path / 'q.ort'}" in (tmp_path / "q.required_operators.config").read_text()


def test_eval_and_bench_run_ort(quantized: Path, tmp_path: Path) -> None:
    export_ort(quantized, tmp_path / "q.ort")
    data = tmp_path / "d.npy"
    np.save(data, _inputs(24, 3))
    run = run_cli(
        "eval", str(tmp_path / "q.ort"), "--data", str(data), "--reference", str(quantized), "--json", "--quiet"
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)["outputs"]["y"]
    assert out["top1_agreement"] == 1.0 and out["max_abs_error"] <= 1e-6
    bench = run_cli("bench", str(quantized), str(tmp_path / "q.ort"), "--runs", "3", "--warmup", "1", "--json")
    assert bench.returncode == 0, bench.stderr
    entry = json.loads(bench.stdout)["models"][str(tmp_path / "q.ort")]
    assert entry["runtime"] == "onnxruntime" and entry["energy"] is None and entry["op_time_ms"]


def test_bad_inputs_are_one_line_errors(quantized: Path, tmp_path: Path) -> None:
    q = str(quantized)
    cases = {
        ("-o", str(tmp_path / "q.tflite")): "must end in .ort",
        ("-o", q): "is the input model",
        ("-o", str(tmp_path / "missing" / "q.ort")): "does not exist",
        ("-o", str(tmp_path / "q.ort"), "--io", "int8"): "only for --to tflite",
    }
    for args, message in cases.items():
        run = run_cli("export", q, "--to", "ort", *args)
        assert run.returncode != 0 and message in run.stderr and len(run.stderr.strip().splitlines()) == 1, run
    assert not (tmp_path / "q.ort").exists()
    export_ort(quantized, tmp_path / "q.ort")
    ort_file = str(tmp_path / "q.ort")
    data = tmp_path / "d.npy"
    np.save(data, _inputs(4, 3))
    # Where a .ort cannot be used: anything that reads the ONNX graph, and float simulation.
    for args in (
        ("export", ort_file, "--to", "ort", "-o", str(tmp_path / "again.ort")),
        ("diagnose", str(quantized), ort_file, "--data", str(data)),
        ("eval", ort_file, "--data", str(data), "--mode", "simulate", "--quiet"),
    ):
        run = run_cli(*args)
        assert run.returncode != 0 and "ORT-format" in run.stderr, run
        assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    with pytest.raises(LowbitError, match="ORT-format"):
        lowbit.quantize(ort_file, tmp_path / "z.onnx", calib=_inputs(4, 1), progress=False)


@pytest.mark.slow
def test_efficientnet_lite0_int8_ort_agrees(tmp_path: Path, efficientnet_lite0: Path) -> None:
    from lowbit_zoo.zoo import photo_crops

    q = tmp_path / "q.onnx"
    lowbit.quantize(efficientnet_lite0, q, calib=photo_crops(64, "calib"), progress=False)
    result = export_ort(q, tmp_path / "q.ort")
    assert result.quantized and "QLinearConv" in result.ops["com.microsoft;1"]
    crops = photo_crops(64, "eval")
    batches = [{"input": crops[i : i + 16]} for i in range(0, len(crops), 16)]
    ref = run_all(session(q), batches)[0]
    out = run_all(session(tmp_path / "q.ort"), batches)[0]
    assert top1_agreement(ref, out) == 1.0
    assert np.abs(ref - out).max() <= 1e-6
