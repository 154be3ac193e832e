"""A corpus model's task metric over four orderings of its calibration samples (as given, first 4 dropped, last 4
dropped, reversed), for the default's measured-sample counts and min-max: how much a range choice depends on
which samples it was measured on. ONNX Runtime integer kernels, the entry's held-out samples.

Usage: PYTHONPATH=src:examples:bench python bench/calib_orderings.py mobilenet_v3_large_op17 [--samples 8 32]
Prints one line per variant: task metric / cosine per ordering, and their means.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--samples", nargs="*", type=int, default=[8, 32], help="layer_error_fast's measured samples")
    args = ap.parse_args()

    import lowbit
    from corpus import run, session
    from lowbit import ranges_by_error
    from lowbit.recipe import Recipe
    from lowbit_zoo.corpus.metrics import cosine
    from lowbit_zoo.corpus.registry import ENTRIES, ROOT

    base = ranges_by_error.METHODS["layer_error_fast"]
    minmax = Recipe(default=dataclasses.replace(Recipe().default, calibration="minmax"))
    variants = [(f"layer_error_fast, {n} samples", n) for n in args.samples] + [("minmax", 0)]
    with tempfile.TemporaryDirectory() as work:
        for name in args.models:
            entry = next(e for e in ENTRIES if e.name == name)
            model = entry.get(ROOT)
            calib, held = entry.calib(model), entry.eval(model)
            ref = run(session(str(model)), held)
            primary = entry.outputs[0].name
            orders = [calib, calib[4:], calib[:-4], calib[::-1]]
            for label, n in variants:
                res = []
                for k, c in enumerate(orders):
                    if n:
                        ranges_by_error.METHODS["layer_error_fast"] = dataclasses.replace(base, samples=n)
                    out = Path(work) / f"{name}.{n}.{k}.onnx"
                    try:
                        recipe = Recipe() if n else minmax
                        lowbit.quantize(
                            str(model),
                            output=str(out),
                            calib=c,
                            recipe=recipe,
                            progress=False,
                            batch_axes=entry.batch_axes,
                        )
                    finally:
                        ranges_by_error.METHODS["layer_error_fast"] = base
                    got = run(session(str(out)), held)
                    res.append(
                        (entry.outputs[0].metric(ref[primary], got[primary]), cosine(ref[primary], got[primary]))
                    )
                cells = " ".join(f"{t:.3f}/{c:.4f}" for t, c in res)
                mean = np.mean(res, axis=0)
                print(f"{name} | {label} | {cells} | mean {mean[0]:.3f} / {mean[1]:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
