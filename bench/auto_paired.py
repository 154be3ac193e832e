"""Every model saved in --out against one of them (--against NAME), paired on the same held-out crops: answers
lost (top-1 differs from float's) by each, with McNemar's exact test on the crops where only one of the two
loses its answer, and the output noise per crop (|model - float|^2 / |float|^2) with the Wilcoxon signed-rank
test. On the first --first crops and on all --heldout of them.

Why: models that lose 2-3% of their answers differ by a few answers in a few hundred crops, by chance as often as
not; the noise is continuous and separates them (bench/RESULTS_AUTO.md, ninth round).

Usage: PYTHONPATH=src:examples python bench/auto_paired.py --out /tmp/auto11/table
       --against "NNCF accuracy control (ranking subset 32)" [--heldout 1024] [--first 256]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy.stats import binomtest, wilcoxon

sys.path.insert(0, str(Path(__file__).resolve().parent))
import auto  # noqa: E402
from lowbit.auto.sensitivity import noise_per_sample  # noqa: E402
from lowbit.runtimes.ort import run_all, session  # noqa: E402
from lowbit_zoo.zoo import photo_crops  # noqa: E402


def outputs(model: str, x: np.ndarray) -> np.ndarray:
    return run_all(session(model, "kernels"), [{"input": x[i : i + 32]} for i in range(0, len(x), 32)])[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=auto.ART)
    ap.add_argument("--against", required=True, help="the saved model's name (its JSON's \"name\")")
    ap.add_argument("--heldout", type=int, default=1024)
    ap.add_argument("--first", type=int, default=256)
    args = ap.parse_args()
    held = photo_crops(args.heldout, "eval")
    found = sorted(p for p in args.out.glob("*.json") if p.with_suffix(".onnx").exists())
    names = {json.loads(p.read_text())["name"]: str(p.with_suffix(".onnx")) for p in found}
    if args.against not in names:
        print(f"no saved model named {args.against!r} in {args.out}; saved: {', '.join(names)}", file=sys.stderr)
        return 2
    ref = outputs(str(args.out / "efficientnet_lite0.onnx"), held)
    other = outputs(names[args.against], held)
    spans = sorted({min(args.first, len(held)), len(held)})
    answers = {n: ref[:n].argmax(1) for n in spans}
    theirs = {n: (other[:n].argmax(1) != answers[n], noise_per_sample([ref[:n]], [other[:n]])) for n in spans}
    print(f"| model | crops | lost, model / {args.against} (McNemar p) | noise 1e-3, model / it (Wilcoxon p) |")
    print("|---|---|---|---|")
    for name, path in names.items():
        if name == args.against:
            continue
        mine = outputs(path, held)
        for n in spans:
            (lost_b, nb), lost_a = theirs[n], mine[:n].argmax(1) != answers[n]
            only_a, only_b = int(np.sum(lost_a & ~lost_b)), int(np.sum(~lost_a & lost_b))
            p_lost = binomtest(only_a, only_a + only_b).pvalue if only_a + only_b else 1.0
            na = noise_per_sample([ref[:n]], [mine[:n]])
            print(
                f"| {name} | {n} | {lost_a.sum()} / {lost_b.sum()} ({p_lost:.2f}) | "
                f"{1e3 * na.mean():.2f} / {1e3 * nb.mean():.2f} ({wilcoxon(na, nb).pvalue:.0e}) |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
