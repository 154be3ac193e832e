"""How well `lowbit auto`'s expected drop (flips.expected_lost) reads a quantized classifier's lost answers, on
models unlike EfficientNet-Lite0: MobileNetV3-Small and -Large, untrained (no trained weights install offline),
whose flat scores flip a third or more of the answers. Each is quantized with two recipes; the count of flipped
top-1 answers and the expected flips are measured on the search crops (128, the calibration photographs) and on
held-out crops (other photographs), each per 128 crops.

Usage: PYTHONPATH=src:examples python bench/expected_drop.py [--heldout 1024] [--out /tmp/lowbit-bench-expected]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

import lowbit
from lowbit.auto.flips import expected_lost
from lowbit.runtimes.ort import run_all, session
from lowbit_zoo.mobilenet import mobilenet_v3_onnx
from lowbit_zoo.zoo import photo_crops

RECIPES = {"default": lowbit.Recipe(), "minmax": lowbit.Recipe(default=lowbit.Scheme(calibration="minmax"))}


def outputs(model: object, x: np.ndarray) -> np.ndarray:
    return run_all(session(model, "kernels"), [{"input": x[i : i + 32]} for i in range(0, len(x), 32)])[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heldout", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "lowbit-bench-expected")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    calib, search, held = (
        photo_crops(128, "calib"),
        photo_crops(128, "calib", seed=1),
        photo_crops(args.heldout, "eval"),
    )
    print("| model | recipe | search: flips / expected (of 128) | held-out: flips / expected (per 128) |")
    print("|---|---|---|---|")
    for variant in ("small", "large"):
        path = str(mobilenet_v3_onnx(args.out / f"mnv3_{variant}.onnx", variant, 13))
        refs = {"search": outputs(path, search), "held": outputs(path, held)}
        for name, recipe in RECIPES.items():
            q = lowbit.quantize(path, calib=calib, recipe=recipe, progress=False).model
            cells = []
            for part, x in (("search", search), ("held", held)):
                ref, out = refs[part], outputs(q, x)
                per = 128 / len(x)
                flips = int(np.sum(out.argmax(1) != ref.argmax(1)))
                cells.append(f"{flips * per:.1f} / {expected_lost(ref, out) * per:.1f}")
            print(f"| MobileNetV3-{variant.capitalize()} (untrained) | {name} | {cells[0]} | {cells[1]} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
