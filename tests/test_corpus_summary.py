"""bench/corpus.py's summary: each done criterion of the real-world corpus is checked against the measured rows and
names what fails (with what lowbit's own summary said), or says that it holds."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from corpus import ORT_TARGET, summary  # noqa: E402


def _row(name: str, lat: float, ort_lat: float | None = None, ks: float = 1.0, said: dict | None = None) -> dict:
    lowbit = {"task": 0.9, "cosine": 0.99, "latency": lat, "kern_vs_sim": ks, "kern_vs_sim_output": "y"}
    row = {"name": name, "lowbit": {**lowbit, "summary": said or {}}, "ORT MinMax": {"task": 0.8, "cosine": 0.98}}
    if ort_lat is not None:
        row[ORT_TARGET] = {**lowbit, "latency": ort_lat}
    return row


def _line(lines: list[str], label: str) -> str:
    return next(x for x in lines if x.startswith(f"- {label}"))


def test_mobilenet_speed_criterion_says_which_target_meets_it() -> None:
    lines = summary([_row("mobilenet_v3_small_op17", 1.04, 0.77), _row("mobilenet_v3_large_op17", 0.85, 0.83)])
    line = _line(lines, "MobileNetV3-style")
    assert "mobilenet_v3_small_op17 1.04x default, 0.77x --target onnxruntime: met with --target onnxruntime" in line
    assert "mobilenet_v3_large_op17 0.85x default, 0.83x --target onnxruntime: NOT met" in line


def test_slower_rows_quote_what_the_quantize_summary_said() -> None:
    warned = {"speed": "speed: 1.05x float latency ...\n  warning: the quantized model runs slower than float here"}
    quiet = {"speed": "speed: 0.88x float latency at 1 thread"}
    lines = summary([_row("a", 1.05, said=warned), _row("b", 1.02), _row("c", 0.9), _row("d", 1.03, said=quiet)])
    line = _line(lines, "lowbit int8 (default target) slower")
    assert 'a (1.05x float; lowbit\'s summary: "warning: the quantized model runs slower than float here")' in line
    assert "b (1.02x float; lowbit's summary says nothing)" in line
    assert "c (" not in line
    assert 'd (1.03x float; lowbit\'s summary does not warn: "speed: 0.88x float latency at 1 thread")' in line
    assert _line(lines, "lowbit's task metric below") == "- lowbit's task metric below the better peer: none"


def test_a_kernel_gap_row_quotes_the_op_the_summary_names() -> None:
    gap = {"gap": "kernels vs simulation part at Conv 'dw3' (region Conv): its inputs agree"}
    lines = summary([_row("m", 0.7, ks=0.98, said=gap), _row("n", 0.7, ks=0.9995)])
    line = _line(lines, "integer kernels vs simulation")
    assert "m (0.9800 on output y; lowbit's summary: \"kernels vs simulation part at Conv 'dw3'" in line
    assert "n (" not in line
