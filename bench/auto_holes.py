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
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import auto  # noqa: E402
import lowbit  # noqa: E402
from auto import base_recipe, batched_agreement, data, save  # noqa: E402
from lowbit.auto.assign import Builder, find_layers  # noqa: E402
from lowbit.evaluate.latency import interleaved_latency, paired_ratio  # noqa: E402
from lowbit.runtimes.ort import run_all, session  # noqa: E402
from lowbit_zoo.zoo import photo_crops  # noqa: E402


def block(node: str) -> int:  # the head (conv, pool, classifier) is block 16
    return int(node.split("/_blocks.")[1].split("/")[0]) if "/_blocks." in node else 16


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
    float_path, calib, search = data(args)
    heldout = photo_crops(args.heldout, "eval")
    model = onnx.load(str(float_path))
    base = lowbit.quantize(model, calib=calib, recipe=base_recipe(args.base), progress=False)
    builder = Builder(model, base.plan, find_layers(model, base.plan))
    int8 = builder.everywhere("int8")
    able = [x.node for x in builder.layers if "float" in builder.precisions(x)]
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
    fl = session(str(float_path))
    refs = {k: run_all(fl, [{"input": x}])[0].argmax(1) for k, x in (("search", search), ("heldout", heldout))}
    sessions = {"float": session(str(float_path), threads=1)}
    found = {}
    wanted = {f"{name} minus blocks {k}" for k in args.save.split(",") if k} | ({name} if args.save else set())
    for label, part in runs.items():
        m = builder.build({**int8, **dict.fromkeys(part, "float")})[0]
        s = session(m, "kernels")
        lost = {
            k: len(x) - int(sum(batched_agreement(s, x, refs[k])))
            for k, x in (("search", search), ("heldout", heldout))
        }
        found[label] = (len(part), lost)
        sessions[label] = session(m, threads=1)
        if label in wanted:
            save(args.out, f"{label} ({args.base} base, no auto)", m, {"seconds": 0.0, "float_layers": part})
        print(f"{label}: {len(part)} float, lost search {lost['search']}, held-out {lost['heldout']}", flush=True)
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
