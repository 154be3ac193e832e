"""Paired latency of several ONNX files on one feed, in one run: 1 thread, every model once per round in a fresh
seeded order (`lowbit.evaluate.latency.interleaved_latency`), sessions created in both orders. Prints each model's
median per-round ratio to the first and to the last model named.

    python bench/paired.py FEEDS.npz ROUNDS NAME=MODEL.onnx [NAME=MODEL.onnx ...]

FEEDS.npz holds one array per model input (by input name). Used for the repeat runs in bench/RESULTS_DLRM.md.
"""

from __future__ import annotations

import sys

import numpy as np

from lowbit.evaluate.latency import interleaved_latency, paired_ratio
from lowbit.runtimes.ort import session


def main(argv: list[str]) -> int:
    feeds_file, rounds, *named = argv
    paths = dict(a.split("=", 1) for a in named)
    with np.load(feeds_file) as z:
        feeds = {k: z[k] for k in z.files}
    times: dict[str, list[float]] = {k: [] for k in paths}
    for order in (list(paths), list(reversed(paths))):
        sessions = {k: session(paths[k], "kernels", threads=1) for k in order}
        for k, v in interleaved_latency(sessions, feeds, runs=int(rounds) // 2, warmup=5).items():
            times[k].extend(v)
    first, last = list(paths)[0], list(paths)[-1]
    for k in paths:
        print(
            f"{k:28s} p50 {1e3 * np.median(times[k]):.3f} ms  vs {first} {paired_ratio(times, k, first):.3f}  "
            f"vs {last} {paired_ratio(times, k, last):.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
