"""Latency for bench/run.py: float, lowbit and ORT-quantized models timed interleaved in one process."""

from __future__ import annotations

import statistics


def latency_block(paths: dict, x1, threads: int, runs: int, warmup: int):
    """Two halves with the sessions created in opposite orders: on this machine the order of session creation
    alone shifted the ratio of two identical-kernel models by ~2.5% (memory placement), so each half
    cancels the other's bias."""
    from lowbit.evaluate.latency import interleaved_latency, paired_ratio
    from lowbit.runtimes.ort import session

    times: dict = {k: [] for k in paths}
    for order in (list(paths), list(reversed(paths))):
        sessions = {k: session(str(paths[k]), "kernels", threads=threads) for k in order}
        half = interleaved_latency(sessions, {"input": x1}, runs=runs // 2, warmup=warmup)
        for k, v in half.items():
            times[k].extend(v)
        del sessions
    return {
        "median_ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
        "lowbit/float": paired_ratio(times, "lowbit", "float"),
        "lowbit/ort": paired_ratio(times, "lowbit", "ort"),
        "ort/float": paired_ratio(times, "ort", "float"),
    }
