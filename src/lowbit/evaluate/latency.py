"""Latency of several models measured interleaved, so a noisy machine slows them alike and ratios hold."""

from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort


def interleaved_latency(
    sessions: dict[str, ort.InferenceSession],
    feeds: dict[str, np.ndarray],
    runs: int = 50,
    warmup: int = 5,
    budget_s: float | None = None,
    min_runs: int = 5,
) -> dict[str, list[float]]:
    """Seconds per run for each session; run i of every session happens before run i+1 of any. With `budget_s`,
    rounds stop once that many seconds were spent measuring (after at least `min_runs`)."""
    for s in sessions.values():
        for _ in range(warmup):
            s.run(None, feeds)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    shuffle = np.random.default_rng(0)
    start = time.perf_counter()
    for i in range(runs):
        if budget_s is not None and i >= min_runs and time.perf_counter() - start > budget_s:
            break
        # Two models alternate. More run in a fresh (seeded) order each round: reversing the order every other
        # round ran the first and last models twice in a row, warm, and an identical copy of a model in the middle
        # measured 2-6% slower than the original at an end (DLRM example, 5-7 models); a fixed rotation still
        # gives each model the same neighbour.
        items = list(sessions.items())
        order = (
            items[i % 2 :] + items[: i % 2] if len(items) <= 2 else [items[j] for j in shuffle.permutation(len(items))]
        )
        for name, s in order:
            t = time.perf_counter()
            s.run(None, feeds)
            times[name].append(time.perf_counter() - t)
    return times


def paired_ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median of per-round ratios: robust to slow spells that hit both models of a round."""
    return float(np.median(np.asarray(times[num]) / np.asarray(times[den])))
