"""Where several models' time goes, node by node, measured in the same rounds: ONNX Runtime's per-node profiler at
1 thread, each round running every model once (load from other processes falls on all of them alike).

Per model: the median over rounds of each node's kernel time, the median per-round total, and the median of the
per-round ratios to the first model. With `--by-block`, node times are summed by EfficientNet-style block
(`/_blocks.K/` in the node's name; `stem` for `/_swish/`, `boundary` for layout Transposes/Reorders and the Q/DQ of
a float/int8 boundary (`*_Q`, `*_DQ`), `head` for the rest), one column per model.

Usage: PYTHONPATH=src:examples python bench/ort_profile_paired.py FLOAT.onnx MODEL.onnx ... [--rounds 200]
       [--by-block] [--nodes] [--json OUT.json]; the input is one photo crop (224x224, ImageNet-normalised).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from lowbit_zoo.zoo import photo_crops  # noqa: E402

WARMUP = 5


def profiled(path: str, folder: str, tag: str) -> ort.InferenceSession:
    o = ort.SessionOptions()
    o.intra_op_num_threads = o.inter_op_num_threads = 1
    o.log_severity_level = 3
    o.enable_profiling = True
    o.profile_file_prefix = os.path.join(folder, tag)
    return ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])


def per_run(events: list[dict]) -> tuple[list[dict[str, float]], dict[str, str]]:
    """Node kernel times (us) grouped per run (the node events before each `model_run`), and each node's op."""
    runs, current, ops = [], collections.defaultdict(float), {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            name = e["name"].removesuffix("_kernel_time")
            current[name] += e["dur"]
            ops.setdefault(name, e["args"]["op_name"])
        elif e.get("cat") == "Session" and e.get("name") == "model_run":
            runs.append(current)
            current = collections.defaultdict(float)
    return runs[WARMUP:], ops


def part(node: str) -> str:
    if node.startswith(("Transpose", "Reorder")) or re.search(r"_D?Q(/duplicated)?$", node):
        return "boundary, layout"
    if m := re.search(r"/_blocks\.(\d+)/", node):
        return f"block {int(m.group(1)):02d}"
    if node.startswith("/_swish/"):
        return "stem"
    return "head"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--by-block", action="store_true")
    ap.add_argument("--nodes", action="store_true", help="print every node's median time")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    feed = {"input": photo_crops(1, "eval", seed=1)[0][None]}
    with tempfile.TemporaryDirectory() as tmp:
        sessions = [profiled(p, tmp, f"m{i}") for i, p in enumerate(args.models)]
        for _ in range(args.rounds + WARMUP):
            for s in sessions:
                s.run(None, feed)
        found = [per_run(json.loads(Path(s.end_profiling()).read_text())) for s in sessions]
    totals = [np.array([sum(r.values()) for r in runs]) for runs, _ in found]
    out = {}
    for path, (runs, ops), total in zip(args.models, found, totals):
        nodes = {n: float(np.median([r.get(n, 0.0) for r in runs])) for n in ops}
        out[path] = {"ms": float(np.median(total)) / 1e3, "ratio": float(np.median(total / totals[0]))}
        out[path] |= {"nodes": nodes, "ops": ops}
        print(f"{Path(path).name}: {out[path]['ms']:.3f} ms kernel time, {out[path]['ratio']:.3f}x the first model")
        if args.nodes:
            for n, v in nodes.items():
                print(f"    {v:8.1f} us  {ops[n]:18s} {n}")
    print(f"({args.rounds} rounds, medians; 1 thread)")
    if args.by_block:
        sums = {p: collections.Counter() for p in args.models}
        for p in args.models:
            for n, v in out[p]["nodes"].items():
                sums[p][part(n)] += v
        names = sorted({k for c in sums.values() for k in c})
        print("\n| part (us) | " + " | ".join(Path(p).stem for p in args.models) + " |")
        print("|---" * (len(args.models) + 1) + "|")
        for k in names:
            print(f"| {k} | " + " | ".join(f"{sums[p][k]:.0f}" for p in args.models) + " |")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
