"""Where ONNX Runtime spends a model's time, at 1 thread: kernel time by op type and the slowest nodes (ORT's
profiler), and CPU time vs a reference model as the median of interleaved per-run ratios of the calling thread's
CPU time (`time.thread_time`: ORT runs a 1-thread session on the calling thread, so other processes' load on a
shared machine moves it far less than wall time).

Usage: PYTHONPATH=src:examples python bench/ort_profile.py REF.onnx MODEL.onnx [MODEL.onnx ...] [--runs 60]
       [--pairs 150] [--top 8]; the input is one photo crop (224x224, ImageNet-normalised).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from lowbit_zoo.zoo import photo_crops  # noqa: E402


def _session(path: str, profile_dir: str | None = None) -> ort.InferenceSession:
    o = ort.SessionOptions()
    o.intra_op_num_threads = o.inter_op_num_threads = 1
    o.log_severity_level = 3
    if profile_dir:
        o.enable_profiling = True
        o.profile_file_prefix = os.path.join(profile_dir, "p")
    return ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])


def profile(path: str, feed: dict[str, np.ndarray], runs: int) -> tuple[collections.Counter, collections.Counter]:
    """Microseconds per run by op type and by (node, op type)."""
    with tempfile.TemporaryDirectory() as tmp:
        s = _session(path, tmp)
        for _ in range(runs):
            s.run(None, feed)
        events = json.loads(Path(s.end_profiling()).read_text())
    by_op: collections.Counter = collections.Counter()
    by_node: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"] / runs
            by_node[(e["name"].removesuffix("_kernel_time"), e["args"]["op_name"])] += e["dur"] / runs
    return by_op, by_node


def cpu_ratio(ref: str, path: str, feed: dict[str, np.ndarray], pairs: int) -> tuple[float, float, float]:
    f, q = _session(ref), _session(path)
    for _ in range(5):
        f.run(None, feed), q.run(None, feed)
    ratios, tf, tq = [], [], []
    for _ in range(pairs):
        t0 = time.thread_time()
        f.run(None, feed)
        t1 = time.thread_time()
        q.run(None, feed)
        t2 = time.thread_time()
        ratios.append((t2 - t1) / max(t1 - t0, 1e-9))
        tf.append(t1 - t0)
        tq.append(t2 - t1)
    return statistics.median(ratios), 1e3 * statistics.median(tf), 1e3 * statistics.median(tq)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ref")
    ap.add_argument("models", nargs="+")
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--pairs", type=int, default=150)
    ap.add_argument("--top", type=int, default=8)
    args = ap.parse_args()
    name = _session(args.ref).get_inputs()[0].name
    feed = {name: photo_crops(1, "eval", seed=1)[0][None]}
    for path in [args.ref, *args.models]:
        by_op, by_node = profile(path, feed, args.runs)
        total = sum(by_op.values())
        print(f"{Path(path).name}: kernel time {total / 1e3:.2f} ms/run")
        print("  by op: " + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in by_op.most_common(args.top)))
        for (node, op), v in by_node.most_common(args.top):
            print(f"    {100 * v / total:4.1f}%  {op:18s} {node}")
        if path != args.ref:
            r, tf, tq = cpu_ratio(args.ref, path, feed, args.pairs)
            ref = Path(args.ref).name
            print(f"  CPU time vs {ref}: {r:.3f} (median of {args.pairs} pairs; {tq:.2f} vs {tf:.2f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
