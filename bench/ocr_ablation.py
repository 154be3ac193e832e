"""Where PP-OCRv4's recognizer loses its CTC strings under static int8: lowbit's row of `bench/corpus.py --sweep` for
`ppocrv4_rec` under recipes that keep one part of the network at higher precision.

The parts are found from the graph, not named by hand: the backbone is every node before the first AveragePool
(PP-LCNetV3, the convolutional part), the neck everything from it on (the SVTR block: LayerNorms in pieces,
attention, the final projection). Each recipe is written to a temporary JSON file and measured with the same
samples, metric and code as the sweep.

Usage: PYTHONPATH=src:examples python bench/ocr_ablation.py [--out bench/RESULTS_OCR_ABLATION.md]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import corpus  # noqa: E402
from lowbit_zoo.corpus.registry import ROOT  # noqa: E402
from lowbit_zoo.corpus.sweep import SWEEP  # noqa: E402


def parts(model: Path) -> tuple[list[str], list[str]]:
    nodes = [n.name for n in onnx.load(str(model)).graph.node if n.op_type != "Constant"]
    ops = {n.name: n.op_type for n in onnx.load(str(model)).graph.node}
    cut = next(i for i, n in enumerate(nodes) if ops[n] == "AveragePool")
    return nodes[:cut], nodes[cut:]


def recipes(backbone: list[str], neck: list[str]) -> dict[str, dict | str]:
    u16 = {"activations": "uint16"}
    return {
        "default (all int8)": {},
        "backbone float": {"exclude_names": backbone},
        "neck float": {"exclude_names": neck},
        "backbone uint16 activations": {"rules": [{"names": backbone, "scheme": u16}]},
        "all uint16 activations (preset int16-activations)": "int16-activations",
        "weight-only int8 (preset weight-only-int8)": "weight-only-int8",
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).with_name("RESULTS_OCR_ABLATION.md")))
    args = ap.parse_args()
    entry = next(e for e in SWEEP if e.name == "ppocrv4_rec")
    model = entry.get(ROOT)
    backbone, neck = parts(model)
    corpus.NO_PEERS = True
    rows = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for label, recipe in recipes(backbone, neck).items():
            if isinstance(recipe, dict):
                path = Path(tmp) / "recipe.json"
                path.write_text(json.dumps(recipe))
                corpus.RECIPE = str(path) if recipe else None
            else:
                corpus.RECIPE = recipe
            row = corpus.measure(entry, Path(tmp))
            q = Path(tmp) / f"{entry.name}.lowbit.onnx"
            size = q.stat().st_size / model.stat().st_size if q.exists() else float("nan")
            rows.append((label, row.get("lowbit", {}), size))
            print(label, rows[-1][1].get("task"), flush=True)
    lines = [
        "# PP-OCRv4 recognizer: which part loses the CTC strings",
        "",
        "Command: `PYTHONPATH=src:examples python bench/ocr_ablation.py`  ",
        f"{len(backbone)} backbone nodes (before the first AveragePool), {len(neck)} neck nodes; samples "
        f"{entry.n_calib} calib / {entry.n_eval} eval, as in the sweep; run took {time.perf_counter() - start:.0f} s "
        "on a shared 2-core machine (latency ratios are noisy).",
        "",
        "| lowbit recipe | CTC exact strings vs float | lowest cosine | latency / float | size / float |",
        "|---|---|---|---|---|",
    ]
    for label, r, size in rows:
        if "task" not in r:
            lines.append(f"| {label} | error: {r.get('error', '?')} | | | |")
            continue
        lines.append(f"| {label} | {r['task']:.3f} | {r['cosine']:.4f} | {r['latency']:.2f} | {size:.2f} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
