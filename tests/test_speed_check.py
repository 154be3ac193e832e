"""`lowbit quantize` measures quantized vs float latency briefly and says so when int8 is not faster."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from lowbit.evaluate.speed import speed_text, verdict


def lowbit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lowbit.cli.main", *args], capture_output=True, text=True)


def _speed(ratio: float, said: str) -> dict:
    return {"ratio": ratio, "verdict": said, "rounds": 5, "float_ms": 1.0, "quantized_ms": ratio, "cpu": "X"}


def test_json_has_speed_and_stage_timings(tiny_model: Path, tiny_calib: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    proc = lowbit("quantize", str(tiny_model), "-o", str(out), "--calib", str(tiny_calib), "--quiet", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    speed = data["speed"]
    assert speed["threads"] == 1 and speed["rounds"] >= 5
    assert speed["ratio"] > 0 and speed["verdict"] in ("faster", "same", "slower")
    assert speed["cpu"]
    assert {"prepare", "calibrate", "decide", "rewrite", "check", "speed check", "lint"} <= set(data["timings"])


def test_verbose_prints_stages_and_speed_can_be_skipped(tiny_model: Path, tiny_calib: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    args = ("quantize", str(tiny_model), "-o", str(out), "--calib", str(tiny_calib), "--quiet")
    proc = lowbit(*args, "--verbose", "--no-speed-check")
    assert proc.returncode == 0, proc.stderr
    assert "stages: prepare" in proc.stdout and "lint" in proc.stdout
    assert "speed:" not in proc.stdout and "speed check" not in proc.stdout
    proc = lowbit(*args)
    assert "speed: " in proc.stdout and "x float latency at 1 thread" in proc.stdout
    assert "stages:" not in proc.stdout


def test_not_faster_is_said_with_the_way_out() -> None:
    assert "warning" not in speed_text(_speed(0.5, "faster"), [])
    slow = speed_text(_speed(1.4, "slower"), [])
    assert "1.40x float latency" in slow and "runs slower than float" in slow and "float model is the faster" in slow
    same = speed_text(_speed(1.0, "same"), [{"kind": "float island", "message": "m", "fix": "f"}])
    assert "no faster than float" in same and "float island" in same
    assert "float model is the faster choice" in same  # the lint's fixes are a way on, not instead of the choice


def test_a_verdict_needs_the_paired_ratio_and_the_medians_to_agree() -> None:
    assert verdict(0.5, 0.6) == "faster" and verdict(1.3, 1.2) == "slower"
    # a busy machine's contradiction (1.09x paired, medians 39.08 vs 37.98 ms) is too close to call, not "slower"
    assert verdict(1.09, 37.98 / 39.08) == "same" and verdict(0.9, 1.01) == "same"
