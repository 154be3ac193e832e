"""After quantizing: is the quantized model faster than the float one on this machine, at one thread?

A short paired measurement, not a benchmark (`lowbit bench` is that): enough rounds to tell "clearly faster" from
"not faster", bounded in time so a large model does not add minutes to `lowbit quantize`. It stops after
`FIRST_ROUNDS` rounds when at least 7 of the 8 rounds' ratios fall on the same side of the verdict's band (a sign
test: under 4% by chance if the true median sat on the band's edge; one round may be hit by a slow spell of a
shared machine), the usual case for a model that int8 makes clearly faster or slower. The summary reports the
ratio with the CPU it was measured on, and says so when int8 is not faster.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import onnx

from ..runtimes.ort import session
from .bench import machine
from .latency import interleaved_latency, paired_ratio

# Below this ratio the quantized model is faster; between the two, too close to call on a noisy machine.
FASTER = 0.95
SLOWER = 1.05
FIRST_ROUNDS = 8  # even: the next round starts with the model that started the first


def speed_check(
    float_model: str | bytes | onnx.ModelProto,
    quant_model: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    max_rounds: int = 30,
    budget_s: float = 4.0,
) -> dict[str, Any]:
    """Median per-round latency ratio quantized / float at one thread, on one batch of `feeds`.

    Rounds alternate which model runs first (as `interleaved_latency` does); `FIRST_ROUNDS` rounds, then, unless
    they all agree (module docstring), more until `max_rounds` or `budget_s` seconds of measuring."""
    sessions = {
        "float": session(float_model, "kernels", threads=1),
        "quantized": session(quant_model, "kernels", threads=1),
    }
    start = time.perf_counter()
    times = interleaved_latency(sessions, feeds, runs=min(FIRST_ROUNDS, max_rounds), warmup=1)
    ratios = np.asarray(times["quantized"]) / np.asarray(times["float"])
    need = len(ratios) - 1 if len(ratios) == FIRST_ROUNDS else len(ratios) + 1  # fewer rounds asked: never clear
    clear = bool(np.sum(ratios < FASTER) >= need or np.sum(ratios > SLOWER) >= need)
    if not clear and max_rounds > FIRST_ROUNDS:
        left = max(budget_s - (time.perf_counter() - start), 0.0)
        more = interleaved_latency(sessions, feeds, runs=max_rounds - FIRST_ROUNDS, warmup=0, budget_s=left, min_runs=0)
        times = {k: times[k] + more[k] for k in times}
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
