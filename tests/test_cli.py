"""The command line: a working run, and every user mistake as one line, non-zero exit, no partial file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import CliRun, run_cli


def lowbit(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lowbit.cli.main", *args], capture_output=True, text=True, cwd=cwd)


def assert_user_error(proc: CliRun | subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(err.splitlines()) == 1, err
    assert err.startswith("lowbit: error:")
    for w in words:
        assert w.lower() in err.lower(), err


def no_outputs(folder: Path, stem: str = "out") -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(stem) or p.name.startswith(f".{stem}")]


def test_quantize_writes_model_plan_and_summary(tiny_model: Path, tiny_calib: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    proc = lowbit("quantize", str(tiny_model), "-o", str(out), "--calib", str(tiny_calib), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "quantized 8 of 8 nodes" in proc.stdout
    assert "kernels vs simulation" in proc.stdout
    onnx.checker.check_model(onnx.load(str(out)))
    plan = json.loads((tmp_path / "out.plan.json").read_text())
    assert plan["nodes"]["relu1"]["reason"].startswith("folded into")
    assert plan["tensors"]["s"]["dtype"] == "uint8"
    assert "y" not in plan["tensors"]  # the Gemm's model output stays float (QGemm writes float)


def test_json_summary(tiny_model: Path, tiny_calib: Path, tmp_path: Path) -> None:
    proc = lowbit(
        "quantize",
        str(tiny_model),
        "-o",
        str(tmp_path / "out.onnx"),
        "--calib",
        str(tiny_calib),
        "--quiet",
        "--json",
        "--check",
        "8",
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["check"]["samples"] == 8
    assert data["nodes"]["conv1"]["quantized"] is True
    assert data["check"]["kernels_vs_simulation"]["cosine"] > 0.99


def test_corrupt_model(tmp_path: Path, tiny_calib: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage that is not protobuf \xff\xff\xff")
    assert_user_error(
        run_cli("quantize", str(bad), "-o", str(tmp_path / "out.onnx"), "--calib", str(tiny_calib)), "bad.onnx"
    )
    assert no_outputs(tmp_path)


def test_truncated_model(tmp_path: Path, tiny_model: Path, tiny_calib: Path) -> None:
    data = tiny_model.read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    assert_user_error(
        run_cli("quantize", str(cut), "-o", str(tmp_path / "out.onnx"), "--calib", str(tiny_calib)), "cut.onnx"
    )
    assert no_outputs(tmp_path)


def test_missing_model(tmp_path: Path, tiny_calib: Path) -> None:
    assert_user_error(
        run_cli("quantize", str(tmp_path / "nope.onnx"), "-o", str(tmp_path / "out.onnx"), "--calib", str(tiny_calib)),
        "not found",
    )


def test_empty_calibration_folder(tmp_path: Path, tiny_model: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_user_error(
        run_cli("quantize", str(tiny_model), "-o", str(tmp_path / "out.onnx"), "--calib", str(empty)), "empty"
    )
    assert no_outputs(tmp_path)


def test_missing_calibration_folder(tmp_path: Path, tiny_model: Path) -> None:
    assert_user_error(
        run_cli("quantize", str(tiny_model), "-o", str(tmp_path / "out.onnx"), "--calib", str(tmp_path / "nowhere")),
        "not found",
    )
    assert no_outputs(tmp_path)


def test_no_calibration_given(tmp_path: Path, tiny_model: Path) -> None:
    # through the real entry point: argparse's error, its exit code and one line from `python -m lowbit.cli.main`
    assert_user_error(lowbit("quantize", str(tiny_model), "-o", str(tmp_path / "out.onnx")), "--calib")


def test_wrong_shape(tmp_path: Path, tiny_model: Path) -> None:
    data = tmp_path / "calib.npy"
    np.save(data, np.zeros((4, 3, 20, 20), np.float32))
    assert_user_error(
        run_cli("quantize", str(tiny_model), "-o", str(tmp_path / "out.onnx"), "--calib", str(data)), "shape"
    )
    assert no_outputs(tmp_path)


def test_wrong_dtype(tmp_path: Path, tiny_model: Path) -> None:
    data = tmp_path / "calib.npy"
    np.save(data, np.zeros((4, 3, 16, 16), np.int32))
    assert_user_error(
        run_cli("quantize", str(tiny_model), "-o", str(tmp_path / "out.onnx"), "--calib", str(data)), "int32"
    )
    assert no_outputs(tmp_path)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_inf_in_calibration(tmp_path: Path, tiny_model: Path, bad: float) -> None:
    arr = np.zeros((4, 3, 16, 16), np.float32)
    arr[2, 1, 3, 3] = bad
    data = tmp_path / "calib.npy"
    np.save(data, arr)
    assert_user_error(
        run_cli("quantize", str(tiny_model), "-o", str(tmp_path / "out.onnx"), "--calib", str(data)), "nan"
    )
    assert no_outputs(tmp_path)


def test_unknown_recipe_key(tmp_path: Path, tiny_model: Path, tiny_calib: Path) -> None:
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"default": {"activation": "uint8"}}))
    assert_user_error(
        run_cli(
            "quantize",
            str(tiny_model),
            "-o",
            str(tmp_path / "out.onnx"),
            "--calib",
            str(tiny_calib),
            "--recipe",
            str(recipe),
        ),
        "activation",
    )
    assert no_outputs(tmp_path)


def test_output_equal_to_input(tmp_path: Path, tiny_model: Path, tiny_calib: Path) -> None:
    before = tiny_model.read_bytes()
    assert_user_error(run_cli("quantize", str(tiny_model), "-o", str(tiny_model), "--calib", str(tiny_calib)), "input")
    assert tiny_model.read_bytes() == before


def test_recipe_show_round_trips(tmp_path: Path, tiny_model: Path, tiny_calib: Path) -> None:
    proc = lowbit("recipe", "--show", "accurate")
    assert proc.returncode == 0
    recipe = tmp_path / "r.json"
    recipe.write_text(proc.stdout)
    proc = lowbit(
        "quantize",
        str(tiny_model),
        "-o",
        str(tmp_path / "out.onnx"),
        "--calib",
        str(tiny_calib),
        "--recipe",
        str(recipe),
        "--quiet",
        "--check",
        "0",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    plan = json.loads((tmp_path / "out.plan.json").read_text())
    assert plan["recipe"]["default"]["calibration"] == "layer_error"


def test_help_lists_commands() -> None:
    proc = lowbit("--help")
    assert proc.returncode == 0
    assert "quantize" in proc.stdout and "recipe" in proc.stdout and "examples:" in proc.stdout
