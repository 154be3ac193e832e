"""After quantizing: is the quantized model faster than the float one on this machine, at one thread?

A short paired measurement, not a benchmark (`lowbit bench` is that): enough rounds to tell "clearly faster" from
"not faster", bounded in time so a large model does not add minutes to `lowbit quantize`. Rounds come in blocks of
`BLOCK`; after each block the measurement stops if the rounds so far are clearly on one side of the verdict's band:
so many of them below it (or above) that a sign test puts the chance of that, were the true median on the band's
edge, under `ALPHA` (7 of 8, 12 of 16, 17 of 24). That is the usual case for a model that int8 makes clearly faster
or slower, and a round or two hit by a slow spell of a shared machine does not prevent it. Otherwise rounds go on
until `max_rounds` or the time budget. The summary reports the ratio with the CPU it was measured on, and says so
when int8 is not faster.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import onnx

from ..runtimes.ort import run_batch, session
from .bench import machine
from .latency import interleaved_latency, paired_ratio

# Below this ratio the quantized model is faster; between the two, too close to call on a noisy machine.
FASTER = 0.95
SLOWER = 1.05
BLOCK = 8  # even: each block starts with the model that started the first
ALPHA = 0.05


def clear_count(n: int) -> int:
    """The fewest of n rounds that must fall on one side for a sign test below ALPHA (n + 1: never)."""
    tail = 0.0
    for k in range(n, -1, -1):
        tail += math.comb(n, k) / 2.0**n
        if tail >= ALPHA:
            return k + 1
    return n + 1


def speed_check(
    float_model: str | bytes | onnx.ModelProto,
    quant_model: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    max_rounds: int = 30,
    budget_s: float = 4.0,
) -> dict[str, Any]:
    """Median per-round latency ratio quantized / float at one thread, on one batch of `feeds`.

    Rounds alternate which model runs first (as `interleaved_latency` does), in blocks of BLOCK until the rounds so
    far are clearly on one side (module docstring), `max_rounds`, or `budget_s` seconds of measuring."""
    sessions = {
        "float": session(float_model, "kernels", threads=1),
        "quantized": session(quant_model, "kernels", threads=1),
    }
    rows = max((int(v.shape[0]) for v in feeds.values() if v.ndim), default=1)
    for name, s in sessions.items():  # a model that fails on these feeds: one line, never a timing loop's traceback
        run_batch(s, None, feeds, rows, f"the {name} model (speed check)")
    start = time.perf_counter()
    times: dict[str, list[float]] = {"float": [], "quantized": []}
    while len(times["float"]) < max_rounds:
        left = budget_s - (time.perf_counter() - start)
        if times["float"] and left <= 0:
            break
        runs = min(BLOCK, max_rounds - len(times["float"]))
        first = not times["float"]  # warm up once; at least 5 rounds (a large model's may exceed the budget)
        more = interleaved_latency(
            sessions, feeds, runs=runs, warmup=int(first), budget_s=max(left, 0.0), min_runs=5 if first else 0
        )
        times = {k: times[k] + more[k] for k in times}
        ratios = np.asarray(times["quantized"]) / np.asarray(times["float"])
        need = clear_count(len(ratios))
        if np.sum(ratios < FASTER) >= need or np.sum(ratios > SLOWER) >= need:
            break
    rounds = len(times["float"])
    ratio = paired_ratio(times, "quantized", "float")
    float_ms = 1e3 * float(np.median(times["float"]))
    quantized_ms = 1e3 * float(np.median(times["quantized"]))
    return {
        "ratio": ratio,
        "verdict": verdict(ratio, quantized_ms / float_ms),
        "rounds": rounds,
        "threads": 1,
        "float_ms": float_ms,
        "quantized_ms": quantized_ms,
        "cpu": machine()["cpu"],
    }


def verdict(paired: float, of_medians: float) -> str:
    """Faster or slower only when the median of the paired ratios and the ratio of the two medians agree: on a
    busy machine they can fall on opposite sides (1.09x paired beside 37.98 vs 39.08 ms), and a line that
    contradicts itself is a measurement too close to call."""
    if paired < FASTER and of_medians < FASTER:
        return "faster"
    if paired > SLOWER and of_medians > SLOWER:
        return "slower"
    return "same"


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
    # Always name the faster choice this measurement shows (the float model), and where the lint knows why, the
    # way to a faster quantized model: a user reading only this line knows what to run.
    choice = f"the float model is the faster choice on this CPU ({speed['float_ms']:.2f} ms)"
    if kinds:
        fix = f"{choice}, unless the fixes of the performance lint below ({', '.join(kinds)}) make int8 faster"
    else:
        fix = (
            f"{choice}; phones differ, so measure there before deciding "
            "(`lowbit bench FLOAT.onnx OUT.onnx` on the device's runtime)"
        )
    return f"{line}\n  warning: the quantized model runs {what} float here: {fix}"


__all__ = ["speed_check", "speed_text", "verdict"]
