"""After quantizing: is the quantized model faster than the float one on this machine, at one thread?

A short paired measurement, not a benchmark (`lowbit bench` is that): enough rounds to tell "clearly faster" from
"not faster", bounded in time so a large model does not add minutes to `lowbit quantize`. The summary reports
the ratio with the CPU it was measured on, and says so when int8 is not faster.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from ..runtimes.ort import session
from .bench import machine
from .latency import interleaved_latency, paired_ratio

# Below this ratio the quantized model is faster; between the two, too close to call on a noisy machine.
FASTER = 0.95
SLOWER = 1.05


def speed_check(
    float_model: str | bytes | onnx.ModelProto,
    quant_model: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    max_rounds: int = 30,
    budget_s: float = 4.0,
) -> dict[str, Any]:
    """Median per-round latency ratio quantized / float at one thread, on one batch of `feeds`.

    Rounds alternate which model runs first (as `interleaved_latency` does); at least 5 rounds, then more until
    `max_rounds` or `budget_s` seconds of measuring."""
    sessions = {
        "float": session(float_model, "kernels", threads=1),
        "quantized": session(quant_model, "kernels", threads=1),
    }
    times = interleaved_latency(sessions, feeds, runs=max_rounds, warmup=1, budget_s=budget_s)
    rounds = len(times["float"])
    ratio = paired_ratio(times, "quantized", "float")
    verdict = "faster" if ratio < FASTER else "slower" if ratio > SLOWER else "same"
    return {
        "ratio": ratio,
        "verdict": verdict,
        "rounds": rounds,
        "threads": 1,
        "float_ms": 1e3 * float(np.median(times["float"])),
        "quantized_ms": 1e3 * float(np.median(times["quantized"])),
        "cpu": machine()["cpu"],
    }


def speed_text(speed: dict[str, Any], lint_findings: list[dict]) -> str:
    """The summary's speed lines: the ratio, and when int8 is not faster, what to do about it."""
    line = (
        f"speed: {speed['ratio']:.2f}x float latency at 1 thread ({speed['quantized_ms']:.2f} vs "
        f"{speed['float_ms']:.2f} ms, median of {speed['rounds']} paired runs on {speed['cpu']})"
    )
    if speed["verdict"] == "faster":
        return line
    what = "slower than" if speed["verdict"] == "slower" else "no faster than"
    kinds = sorted({f["kind"] for f in lint_findings})
    if kinds:
        fix = f"the performance lint below names why ({', '.join(kinds)}) and the fix for each"
    else:
        fix = (
            "on this CPU the float model is the faster choice; phones differ, so measure there before deciding "
            "(`lowbit bench FLOAT.onnx OUT.onnx` on the device's runtime)"
        )
    return f"{line}\n  warning: the quantized model runs {what} float here: {fix}"


__all__ = ["speed_check", "speed_text"]
