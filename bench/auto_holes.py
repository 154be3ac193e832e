"""One float run from the stem through block K (the edge run `lowbit auto` finds on EfficientNet-Lite0) with a
block, a pair of blocks or one conv of it put back at int8: lost search and held-out answers (integer kernels)
and latency paired against float (1 thread, interleaved rounds). What a trim that opens a run's middle can win.

Usage: PYTHONPATH=src:examples python bench/auto_holes.py [--out /tmp/auto8/art] [--base onnxruntime] [--last 5]
       [--rounds 30] [--save "3-4"]   # --save: these holes (and the whole prefix) as rows of `auto.py table`
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import auto  # noqa: E402
from auto import block, save  # noqa: E402
from lowbit.evaluate.latency import interleaved_latency, paired_ratio  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=auto.ART)
    ap.add_argument("--base", default="onnxruntime", choices=sorted(auto.BASES))
    ap.add_argument("--last", type=int, default=5, help="the prefix's last block")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--save", default="", help="holes to save as table rows: blocks 'first-last', comma-separated")
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--search", type=int, default=128)
    ap.add_argument("--heldout", type=int, default=256)
    args = ap.parse_args()
    setup = auto.span_setup(args)
    calib, search, heldout, able = setup[1], setup[2], setup[3], setup[7]
    prefix = [n for n in able if block(n) <= args.last]
    name = f"prefix 0-{args.last}"
    runs: dict[str, list[str]] = {"int8": [], name: prefix}
    holes = {f"{b}-{b}": [b] for b in range(1, args.last + 1)}
    holes |= {f"{b}-{b + 1}": [b, b + 1] for b in range(1, args.last)}
    for key, blocks in holes.items():
        runs[f"{name} minus blocks {key}"] = [n for n in prefix if block(n) not in blocks]
    for n in prefix:
        if "expand" in n or "project" in n:
            runs[f"{name} minus {n.split('/_blocks.')[1]}"] = [m for m in prefix if m != n]
    found, sessions, models = auto.measure_runs(setup, runs)
    wanted = {f"{name} minus blocks {k}" for k in args.save.split(",") if k} | ({name} if args.save else set())
    for label in wanted & set(models):
        info = {"seconds": 0.0, "float_layers": runs[label]}
        save(args.out, f"{label} ({args.base} base, no auto)", models[label], info)
    times = interleaved_latency(sessions, {"input": calib[:1]}, runs=args.rounds, warmup=3)
    ratio = {k: paired_ratio(times, k, "float") for k in sessions}
    print(f"\nfloat {1e3 * float(np.median(times['float'])):.2f} ms/crop, 1 thread, {args.rounds} paired rounds\n")
    print(
        f"| float run | layers | lost search (of {len(search)}) | lost held-out (of {len(heldout)}) "
        "| latency vs float |"
    )
    print("|---|---|---|---|---|")
    for label, (n, lost) in found.items():
        print(f"| {label} | {n} | {lost['search']} | {lost['heldout']} | {ratio[label]:.3f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
