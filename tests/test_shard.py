"""Calibration sharded over Ray: same statistics and bytes as one process; a dead worker is retried or the run
stops with one line and writes nothing. Each test starts (and stops) a local 2-worker Ray cluster."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import lowbit
from conftest import run_cli, tiny_cnn
from lowbit.calibrate import calibrate, chunk_batches
from lowbit.data import input_specs, open_data
from lowbit.errors import LowbitError
from lowbit.evaluate.evaluate import evaluate
from lowbit.shard import calibrate_sharded, check_workers

RECIPE = lowbit.Recipe(calibration_samples=600, batch_size=4)


@pytest.fixture
def model_and_data(tmp_path: Path) -> tuple[Path, Path]:
    model, data = tmp_path / "tiny.onnx", tmp_path / "calib.npy"
    onnx.save(tiny_cnn(), str(model))
    # 600 samples in batches of 4: five chunks of 32 batches, so the shares split inside the data.
    np.save(data, np.random.default_rng(3).normal(0, 1, (600, 3, 16, 16)).astype(np.float32))
    return model, data


@pytest.mark.slow  # starts a Ray cluster
def test_statistics_and_model_are_bit_identical(model_and_data: tuple[Path, Path]) -> None:
    model_path, data = model_and_data
    assert chunk_batches(600, 4) == 32
    model = ir.from_proto(onnx.load(str(model_path)))
    specs = input_specs(str(model_path))
    tensors = {"x", "r1", "s", "f"}
    axes = {"r1": 1, "s": 1}
    one = calibrate(model, tensors, axes, open_data(str(data), specs, batch_size=4), progress=False)
    two = calibrate_sharded(model, tensors, axes, str(data), specs, 4, None, None, workers=2, progress=False)
    assert one.samples == two.samples == 600
    for name in tensors:
        a, b = one.histograms[name], two.histograms[name]
        assert (a.e, a.i0, a.min, a.max) == (b.e, b.i0, b.min, b.max)
        assert np.array_equal(a.counts, b.counts)
    for name in axes:
        a, b = one.channels[name], two.channels[name]
        assert a.count == b.count
        for x, y in ((a.min, b.min), (a.max, b.max), (a.sum, b.sum)):
            assert x is not None and y is not None and x.tobytes() == y.tobytes()

    single = lowbit.quantize(str(model_path), calib=str(data), recipe=RECIPE, progress=False)
    sharded = lowbit.quantize(str(model_path), calib=str(data), recipe=RECIPE, progress=False, workers=2)
    assert single.model.SerializeToString() == sharded.model.SerializeToString()
    assert single.plan.to_json() == sharded.plan.to_json()


@pytest.mark.slow  # starts a Ray cluster
def test_a_killed_worker_is_retried(model_and_data: tuple[Path, Path], tmp_path: Path, monkeypatch) -> None:
    model_path, data = model_and_data
    marker = tmp_path / "killed"
    monkeypatch.setenv("LOWBIT_TEST_KILL_SHARD_ONCE", str(marker))
    sharded = lowbit.quantize(str(model_path), calib=str(data), recipe=RECIPE, progress=False, workers=2)
    assert marker.exists()  # the first attempt really died
    monkeypatch.delenv("LOWBIT_TEST_KILL_SHARD_ONCE")
    single = lowbit.quantize(str(model_path), calib=str(data), recipe=RECIPE, progress=False)
    assert single.model.SerializeToString() == sharded.model.SerializeToString()


@pytest.mark.slow  # starts a Ray cluster
def test_a_worker_that_keeps_dying_ends_the_run_with_one_line(
    model_and_data: tuple[Path, Path], tmp_path: Path, monkeypatch
) -> None:
    model_path, data = model_and_data
    monkeypatch.setenv("LOWBIT_TEST_KILL_SHARD_ALWAYS", "1")
    out = tmp_path / "out.onnx"
    run = run_cli("quantize", str(model_path), "-o", str(out), "--calib", str(data), "--workers", "2", "--quiet")
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith("lowbit: error: a calibration worker failed twice") and run.stderr.count("\n") == 1
    assert "Traceback" not in run.stderr
    assert not out.exists() and not out.with_suffix(".plan.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("out")] == []
    # The real command in a process of its own: Ray's driver prints the raylet's notices from a thread to the
    # process's stdout, which only a subprocess sees as the user does. Everything said is lowbit's one line.
    env = {**os.environ, "LOWBIT_TEST_KILL_SHARD_ALWAYS": "1"}
    args = ["quantize", str(model_path), "-o", str(out), "--calib", str(data), "--workers", "2", "--quiet"]
    proc = subprocess.run([sys.executable, "-m", "lowbit.cli.main", *args], capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert proc.stdout == "" and "(raylet)" not in proc.stderr, proc.stdout + proc.stderr
    assert proc.stderr.startswith("lowbit: error: a calibration worker failed twice") and proc.stderr.count("\n") == 1
    assert not out.exists()


def test_what_sharding_cannot_do_is_refused_before_work(tmp_path: Path) -> None:
    with pytest.raises(LowbitError, match="must be a path"):
        check_workers(2, [np.zeros((1, 3, 16, 16), np.float32)], None)
    with pytest.raises(LowbitError, match="positive integer"):
        check_workers(0, "data.npy", None)
    check_workers(2, None, None)  # nothing to calibrate (a plan or a data-free mode): nothing to refuse


@pytest.mark.slow  # starts a Ray cluster
def test_sharded_eval_gives_the_same_numbers(model_and_data: tuple[Path, Path], tmp_path: Path) -> None:
    model_path, data = model_and_data
    quantized = tmp_path / "q.onnx"
    lowbit.quantize(str(model_path), quantized, calib=str(data), recipe=RECIPE, progress=False)
    labels = np.random.default_rng(4).integers(0, 10, 600)
    kw = {"labels": labels, "reference": str(model_path), "batch_size": 4, "progress": False}
    one = evaluate(str(quantized), str(data), **kw)
    two = evaluate(str(quantized), str(data), workers=2, **kw)
    assert one.samples == two.samples == 600
    assert one.to_json() == two.to_json()


@pytest.mark.slow  # starts a Ray cluster
def test_sharded_diagnose_gives_the_same_report(model_and_data: tuple[Path, Path], tmp_path: Path) -> None:
    from lowbit.evaluate.diagnose import diagnose

    model_path, data = model_and_data
    quantized = tmp_path / "q.onnx"
    lowbit.quantize(str(model_path), quantized, calib=str(data), recipe=RECIPE, progress=False)
    one = diagnose(str(model_path), str(quantized), str(data), limit=24, progress=False)
    two = diagnose(str(model_path), str(quantized), str(data), limit=24, progress=False, workers=2)
    alone = [x for x in one.layers if "alone_sqnr_db" in x]
    assert len(alone) >= 3 and one.trials >= len(alone)  # several layers measured alone, split across 2 workers
    assert one.to_json() == two.to_json()
    run = run_cli("diagnose", str(model_path), str(quantized), "--data", str(data), "--limit", "24", "--workers", "2")
    assert run.returncode == 0, run.stderr
    assert (
        run.stdout == run_cli("diagnose", str(model_path), str(quantized), "--data", str(data), "--limit", "24").stdout
    )


def test_diagnose_refuses_bad_workers_before_work(model_and_data: tuple[Path, Path], tmp_path: Path) -> None:
    from lowbit.evaluate.diagnose import diagnose

    model_path, data = model_and_data
    with pytest.raises(LowbitError, match="positive integer"):
        diagnose(str(model_path), str(tmp_path / "missing.onnx"), str(data), workers=0)


@pytest.mark.slow  # starts a Ray cluster
def test_sharded_eval_with_a_batch_axis(tmp_path: Path) -> None:
    """State stacked on axis 1 and a 0-d sample rate: the workers read their shares with the same batch axes."""
    from test_batch_axes import _batched, _samples, _vad

    onnx.save(_vad(), tmp_path / "vad.onnx")
    np.savez(tmp_path / "eval.npz", **_batched(_samples(24, 7)))
    kw = {"reference": str(tmp_path / "vad.onnx"), "batch_size": 4, "progress": False, "batch_axes": {"state": 1}}
    one = evaluate(str(tmp_path / "vad.onnx"), str(tmp_path / "eval.npz"), **kw)
    two = evaluate(str(tmp_path / "vad.onnx"), str(tmp_path / "eval.npz"), workers=2, **kw)
    assert one.samples == two.samples == 24 and one.to_json() == two.to_json()
